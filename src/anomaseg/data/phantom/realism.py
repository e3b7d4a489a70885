"""The phantom's realism features (off by default): FLAIR's normal variants and lesions that are
not the brightest tissue (see the package docstring for what each one is).

Normal variants (`draw_variants`) are box-local weights and the intensities they bring, never
labelled; the realistic lesion families (`draw_mass`, `draw_infarct`) are shapes that
`lesion_maps` labels (labels 6-8; black holes, label 5, are MS lesions of their own stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit

from anomaseg.data.phantom.fields import Warp, invert_warp, random_rotation
from anomaseg.data.phantom.lesions import Blob, ellipsoid_radius, irregular_radius, lesion_box
from anomaseg.data.phantom.seeds import STREAM_VARIANTS
from anomaseg.data.phantom.template import Template, load_ventricles

# Realism features (`make_phantom(..., realism=True)` turns on all): normal variants, never labelled,
# in healthy and lesioned subjects alike; and lesions that are not the brightest tissue on FLAIR.
NORMAL_VARIANTS = ("caps", "choroid_plexus", "septum", "flow_artefacts", "pv_rims")
REALISTIC_LESIONS = ("black_holes", "infarcts", "isointense_masses")
REALISM = NORMAL_VARIANTS + REALISTIC_LESIONS

# Normal variants (all relative to the subject's own tissue intensities, see draw_variants).
_CAP_THICKNESS_MM = (2.0, 5.0)  # e-folding distance of the caps' brightness from the ventricle wall
_CAP_FLAIR_GAIN = (0.5, 1.0)  # FLAIR at the ventricle wall: WM x (1 + gain) at the horns
_BAND_FRACTION = 0.4  # along the ventricles' bodies: a band of this fraction of the caps' gain and thickness
_SEPTUM_HALF_MM = (0.7, 1.4)  # Gaussian width of the septum pellucidum sheet
_PV_FLAIR_GAIN = (0.2, 0.45)  # extra FLAIR signal at 50/50 CSF/tissue voxels by the ventricles, x WM
_PV_CORTEX_FRACTION = 0.25  # ... and this fraction of it at CSF/tissue boundaries elsewhere
_FLOW_STREAKS = (2, 7)
_MASS_EFFECT_ISO = (0.35, 0.55)


def realism_features(realism) -> tuple[str, ...]:
    """True / "all" -> every feature; False / None -> none; else names (a list or "a,b"), in REALISM order."""
    if realism is True or realism == "all":
        return REALISM
    if realism is False or realism is None:
        return ()
    if isinstance(realism, str):
        realism = [f.strip() for f in realism.split(",") if f.strip()]
    wanted = set(realism)
    unknown = sorted(wanted - set(REALISM))
    if unknown:
        raise ValueError(f"unknown realism feature(s) {', '.join(unknown)}; known: {', '.join(REALISM)}")
    return tuple(f for f in REALISM if f in wanted)


def _feature_rng(seed: int, index: int, lesioned: bool, feature: str) -> np.random.Generator:
    """Each realism feature draws from its own stream: turning one on or off changes no other."""
    return np.random.default_rng([int(seed), int(index), int(bool(lesioned)), STREAM_VARIANTS,
                                  REALISM.index(feature)])


def _template_mm(tpl: Template, coords: np.ndarray, axis: int) -> np.ndarray:
    """Template world coordinate (mm) along `axis` of template voxel coordinates (3, ...)."""
    a = tpl.affine.astype(np.float32)
    return a[axis, 0] * coords[0] + a[axis, 1] * coords[1] + a[axis, 2] * coords[2] + a[axis, 3]


def _nearest_lookup(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    idx = [np.clip(np.rint(coords[a]).astype(np.intp), 0, volume.shape[a] - 1) for a in range(3)]
    return volume[idx[0], idx[1], idx[2]]


@dataclass
class Variants:
    """Normal variants of one subject: box-local weights and the intensities they bring."""

    caps: np.ndarray | None = None  # strength in [0, 1] of the periventricular cap / band
    replace: list = field(default_factory=list)  # (name, weight, {modality: intensity or field}): tissue in CSF
    pv: np.ndarray | None = None  # partial-volume rim strength in [0, 1]
    gains: dict = field(default_factory=dict)  # per-modality gains of caps / pv (x the subject's WM)
    masks: dict = field(default_factory=dict)  # name -> box-local bool: where the variant shows
    info: dict = field(default_factory=dict)

    def term(self, mod: str, tissue_i: np.ndarray) -> np.ndarray | None:
        """Signal to add for modality `mod` (subject tissue intensities `tissue_i` = CSF, GM, WM)."""
        c, _, w = (np.float32(v) for v in tissue_i)
        out = None

        def add(x):
            nonlocal out
            out = x if out is None else out + x

        if self.caps is not None:
            add(self.caps * np.float32(self.gains["caps"][mod] * w))
        if self.pv is not None and mod == "flair":
            add(self.pv * np.float32(self.gains["pv_rims"] * w))
        for _, weight, intensity in self.replace:
            value = intensity.get(mod)
            if value is not None:
                add(weight * (value(tissue_i) - c))
        return out


def draw_variants(features, seed, index, lesioned, tpl: Template, warp: Warp, coords, box, csf, gm, wm):
    """The normal variants asked for in `features`, drawn for one subject (see `make_phantom`)."""
    vox = tpl.voxel_mm
    vent = load_ventricles(int(round(vox)))
    v = Variants()
    origin = np.array([s.start for s in box], float)
    if "caps" in features:
        rng = _feature_rng(seed, index, lesioned, "caps")
        thickness, gain = rng.uniform(*_CAP_THICKNESS_MM), rng.uniform(*_CAP_FLAIR_GAIN)
        # contrast of the caps relative to their WM on each sequence (FLAIR gain drawn above)
        t2_ratio, t1_ratio = rng.uniform(0.5, 0.8), rng.uniform(0.1, 0.25)
        near = (wm > 0.05) & (_nearest_lookup(vent.distance_mm, coords) < 20.0)
        pts = coords[:, near]
        # distance from the ventricle wall (the distance map is to the centres of CSF voxels)
        d = np.maximum(ndi.map_coordinates(vent.distance_mm, pts, order=1, mode="nearest", prefilter=False)
                       - np.float32(vox / 2), 0)
        y = _template_mm(tpl, pts, 1)
        # caps at the frontal and occipital horns; a thinner, fainter band along the bodies
        horn = np.maximum(expit((y - np.float32(vent.y_front_mm - 14.0)) / np.float32(3.0)),
                          expit((np.float32(vent.y_back_mm + 14.0) - y) / np.float32(3.0)))
        level = _BAND_FRACTION + (1 - _BAND_FRACTION) * horn
        strength = level * np.exp(-d / (np.float32(thickness) * level))
        v.caps = np.zeros(wm.shape, np.float32)
        v.caps[near] = strength * wm[near]
        v.masks["caps"] = (v.caps >= 0.5 * _BAND_FRACTION) & (wm > 0.5)
        v.gains["caps"] = {"flair": gain, "t2": gain * t2_ratio, "t1": -gain * t1_ratio, "t1ce": -gain * t1_ratio}
        v.info["caps"] = {"thickness_mm": round(float(thickness), 2), "flair_gain": round(float(gain), 3)}
    csf_left = csf.copy()  # variants that put tissue into CSF share what CSF there is
    if "septum" in features:
        rng = _feature_rng(seed, index, lesioned, "septum")
        half = rng.uniform(*_SEPTUM_HALF_MM)
        flair_r, t2_r = rng.uniform(1.0, 1.2), rng.uniform(1.05, 1.3)
        region = (csf > 0.05) & _nearest_lookup(vent.septum_region, coords)
        x = _template_mm(tpl, coords[:, region], 0)
        weight = np.zeros(csf.shape, np.float32)
        weight[region] = np.exp(-0.5 * (x / np.float32(half)) ** 2) * csf_left[region]
        csf_left -= weight
        v.masks["septum"] = weight >= 0.5
        # thin tissue (white-matter like: fornix fibres, glia) between the frontal horns
        v.replace.append(("septum", weight, {"t1": lambda t: np.float32(0.92 * t[2]),
                                             "t1ce": lambda t: np.float32(0.92 * t[2]),
                                             "t2": lambda t: np.float32(t2_r * t[2]),
                                             "flair": lambda t: np.float32(flair_r * t[2])}))
        v.info["septum"] = {"half_width_mm": round(float(half), 2)}
    if "choroid_plexus" in features:
        rng = _feature_rng(seed, index, lesioned, "choroid_plexus")
        weight = np.zeros(csf.shape, np.float32)
        texture = np.zeros(csf.shape, np.float32)
        for centre_tpl in vent.atria:
            blob = Blob(centre_tpl=centre_tpl + rng.normal(0, 2.0 / vox, 3), radius_mm=0.0,
                           axes_mm=np.array([rng.uniform(2.5, 4.5), rng.uniform(4.0, 8.0), rng.uniform(2.5, 4.5)]),
                           rotation=np.eye(3), core_fraction=0.0, oedema_extent=1.0,
                           irregularity=rng.uniform(0.1, 0.2), mass_effect=0.0)
            blob.radius_mm = float(blob.axes_mm.max())
            blob.centre = invert_warp(warp, blob.centre_tpl) - origin
            sub, r = irregular_radius(rng, blob, vox, 1.0, csf.shape)
            m = expit((1 - r) * np.float32(blob.radius_mm / 0.8)) * csf_left[sub]
            weight[sub] = np.maximum(weight[sub], m)
            inside = m > 0.01  # mixed: the centre brighter or darker than the edge (cyst or tissue)
            texture[sub][inside] = np.float32(rng.choice([-1.0, 1.0])) * (1 - 2 * r[inside])
        csf_left -= weight
        v.masks["choroid_plexus"] = weight >= 0.5
        t1ce_r, flair_r, t2_r = rng.uniform(1.25, 1.6), rng.uniform(0.7, 1.6), rng.uniform(1.0, 1.4)
        texture = np.clip(texture, -1.0, 1.0)
        # enhancing (T1ce bright), GM-like on T1/T2, mixed on FLAIR (part cyst, part tissue)
        v.replace.append(("choroid_plexus", weight, {
            "t1": lambda t: np.float32(0.95 * t[1]),
            "t1ce": lambda t: np.float32(t1ce_r * t[2]),
            "t2": lambda t: np.float32(t2_r * t[1]),
            "flair": lambda t: np.float32(flair_r * t[2]) * (1 + np.float32(0.25) * texture)}))
        v.info["choroid_plexus"] = {"t1ce_ratio": round(float(t1ce_r), 3), "flair_ratio": round(float(flair_r), 3)}
    if "flow_artefacts" in features:
        rng = _feature_rng(seed, index, lesioned, "flow_artefacts")
        n = int(rng.integers(_FLOW_STREAKS[0], _FLOW_STREAKS[1] + 1))
        seeds = rng.choice(vent.flow_seeds, size=n)
        weight = np.zeros(csf.shape, np.float32)
        for flat in seeds:
            centre = invert_warp(warp, np.array(np.unravel_index(flat, tpl.brain.shape), float)) - origin
            # streaks along y: the phase-encoding direction of an axial scan, where pulsation ghosts
            axes = np.array([rng.uniform(1.5, 3.0), rng.uniform(4.0, 12.0), rng.uniform(2.0, 4.0)]) / vox
            sub, rel = lesion_box(centre, axes.max() + 2, csf.shape)
            r = ellipsoid_radius(rel, np.eye(3), axes)
            m = expit((1 - r) * np.float32(4.0)) * np.float32(rng.uniform(0.8, 1.0)) * csf_left[sub]
            weight[sub] = np.maximum(weight[sub], m)
        csf_left -= weight
        v.masks["flow_artefacts"] = weight >= 0.5
        flair_r = rng.uniform(1.0, 2.0)
        v.replace.append(("flow_artefacts", weight, {"flair": lambda t: np.float32(flair_r * t[2])}))
        v.info["flow_artefacts"] = {"streaks": n, "flair_ratio": round(float(flair_r), 3)}
    if "pv_rims" in features:
        rng = _feature_rng(seed, index, lesioned, "pv_rims")
        # voxels that mix CSF and tissue (after the variants that fill CSF), strongest around the
        # ventricles (ependyma); at the cortex's sulci a fraction of it
        mix = np.clip(4 * csf_left * (1 - csf_left) * (csf + gm + wm), 0, 1)
        ventricular = _nearest_lookup(vent.distance_mm, coords) < 6.0
        v.pv = mix * np.where(ventricular, np.float32(1.0), np.float32(_PV_CORTEX_FRACTION))
        v.masks["pv_rims"] = v.pv >= 0.5
        v.gains["pv_rims"] = rng.uniform(*_PV_FLAIR_GAIN)
        v.info["pv_rims"] = {"flair_gain": round(float(v.gains["pv_rims"]), 3)}
    return v


def draw_mass(rng: np.random.Generator, tpl: Template, avoid: Blob | None) -> Blob:
    """An isointense mass: solid, irregular, with strong mass effect, centred in the white matter
    under the cortex (so it borders grey matter of its own intensity on one side)."""
    radius = rng.uniform(12.0, 22.0)
    ok = (tpl.tissue[2] > 0.5) & (tpl.depth_mm >= 0.6 * radius) & (tpl.depth_mm <= radius + 4.0)
    cand = np.argwhere(ok).astype(float)
    if avoid is not None:  # keep clear of the other tumour
        far = np.linalg.norm(cand - avoid.centre_tpl, axis=1) * tpl.voxel_mm > 1.3 * (radius + avoid.radius_mm)
        cand = cand[far] if far.any() else cand
    centre = cand[rng.integers(len(cand))] + rng.uniform(-0.5, 0.5, 3)
    return Blob(centre_tpl=centre, radius_mm=radius, axes_mm=radius * rng.uniform(0.8, 1.2, 3),
                   rotation=random_rotation(rng), core_fraction=0.0, oedema_extent=1.0,
                   irregularity=rng.uniform(0.05, 0.12), mass_effect=rng.uniform(*_MASS_EFFECT_ISO))


def draw_infarct(rng: np.random.Generator, tpl: Template, cortical: bool) -> tuple[Blob, float]:
    """A chronic infarct (blob, gliotic rim width 2-4 mm): cortical-subcortical (centred in cortex,
    7-15 mm) or lacunar (deep grey or white matter, 3-7 mm)."""
    if cortical:
        radius = rng.uniform(7.0, 15.0)
        ok = (tpl.tissue[1] > 0.5) & (tpl.depth_mm >= 3.0) & (tpl.depth_mm <= 12.0)
    else:
        radius = rng.uniform(3.0, 7.0)
        ok = (tpl.tissue[0] < 0.2) & (tpl.brain > 0.9) & (tpl.depth_mm > 30.0)
    cand = np.flatnonzero(ok)
    centre = np.array(np.unravel_index(cand[rng.integers(cand.size)], tpl.brain.shape), float)
    blob = Blob(centre_tpl=centre + rng.uniform(-0.5, 0.5, 3), radius_mm=radius,
                   axes_mm=radius * rng.uniform(0.7, 1.3, 3), rotation=random_rotation(rng),
                   core_fraction=0.0, oedema_extent=1.0, irregularity=rng.uniform(0.1, 0.2), mass_effect=0.0)
    return blob, rng.uniform(2.0, 4.0)
