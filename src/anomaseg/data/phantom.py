"""The built-in brain MR phantom: MNI152 anatomy (shipped with nilearn) + synthetic lesions.

Every subject is the MNI152 tissue model (grey matter, white matter, CSF probability maps) pushed
through its own random smooth deformation, rendered as T1, T1ce, T2 and FLAIR with per-subject
contrast jitter, a smooth bias field and Rician noise. Lesioned subjects additionally carry MS-like
white-matter lesions and/or a tumour (necrotic core, enhancing rim, oedema) with a label map.

Realism (off by default; ``make_phantom(..., realism=True)`` or ``anomaseg phantom --realistic``, or
a subset of `REALISM` by name). Real FLAIR has bright tissue that is normal, and lesions that are not
its brightest tissue; a FLAIR threshold is fooled by both, so these decide how methods rank.

- Normal variants, in healthy and lesioned subjects alike, never labelled (``PhantomSubject.variants``
  holds where they show): ``caps`` (FLAIR/T2-bright periventricular caps at the frontal and occipital
  horns of the lateral ventricles, fading over 2-5 mm, and a fainter thin band along their bodies);
  ``choroid_plexus`` (a glomus in each atrium: enhancing on T1ce, GM-like on T1/T2, mixed on FLAIR);
  ``septum`` (the septum pellucidum, a ~1-3 mm tissue sheet between the frontal horns, absent from
  the MNI152 maps); ``flow_artefacts`` (2-7 FLAIR-bright streaks, 8-24 mm long, along the
  phase-encoding axis in the third and fourth ventricles, basal cisterns and medial lateral
  ventricles: CSF pulsation);
  ``pv_rims`` (partial-volume CSF/tissue voxels brighter on FLAIR than either, strongly along the
  ventricles, a quarter as much at the sulci). Each varies per subject (thickness, brightness,
  position, count: see ``info["variants"]``).
- Lesions (labels 5-8): ``black_holes`` (in MS subjects, 30-60% of the lesion load is T1 black holes:
  T1 dark, FLAIR only mildly above WM and below GM); ``infarcts`` (a lesion family: 1-2 chronic
  infarcts, cortical-subcortical or lacunar, with a fluid core dark on FLAIR and a 2-4 mm FLAIR-bright
  gliotic rim); ``isointense_masses`` (a lesion family: a solid mass near the cortex, within ~10% of
  GM on every contrast, that pushes the anatomy aside with a stronger mass effect than the tumours).
  With ``infarcts`` / ``isointense_masses`` the primary family of lesioned subjects cycles over
  MS, tumour, infarct and mass instead of MS and tumour.

The realism features draw from their own random streams: without them every subject is the one of
PHANTOM_VERSION (same seed, same volumes); with them, it is deterministic per seed as well. All of
them cost about a quarter more time per subject (benchmarks/README.md, "Phantom realism").

Output follows the project's data contract (BraTS-style case folders)::

    out_dir/train/healthy_000/healthy_000_{t1,t1ce,t2,flair,mask}.nii.gz
    out_dir/test/lesioned_000/lesioned_000_{t1,t1ce,t2,flair,mask,seg}.nii.gz
    out_dir/phantom.json

Determinism: each subject draws its randomness from seeds derived from ``(seed, index, lesioned,
stream)`` only, so a subject is the same whatever the number of other subjects or the modalities
requested. Image intensities are arbitrary units (T1 white matter ~ 1000) rounded to whole numbers,
as scanner data are; the arrays are still stored as float32. Rounding costs nothing in realism
(noise sigma is 8-30 units) and halves the gzip time and size.

Design notes:
- Anatomy: nilearn's native 1 mm GM/WM maps and brain mask (CSF = mask - GM - WM, renormalised);
  coarser resolutions are box-averaged from 1 mm on the grid nilearn uses (same shape and affine as
  ``load_mni152_template(resolution=r)``), so tissue maps carry partial volume at the brain edge.
- One resampling per tissue map: the random affine, the smooth non-linear displacement (cubic
  B-spline free-form deformation) and the tumour's mass effect are composed into a single
  coordinate field for ``scipy.ndimage.map_coordinates``.
- Only a box that can contain the deformed brain is resampled; the rest is background (noise only).
- Smooth random fields (displacement, bias, lesion texture) are tensor-product cubic B-splines of
  random control points: three small matrix products instead of a 3-D Gaussian filter.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit

from anomaseg.atomic import atomic_path, write_text

__all__ = ["LABELS", "MODALITIES", "TISSUE_INTENSITY", "LESION_INTENSITY", "REALISTIC_LESION_INTENSITY",
           "NORMAL_VARIANTS", "REALISTIC_LESIONS", "REALISM", "make_phantom", "make_subject", "realism_features",
           "PhantomSubject"]

# Labels 1-4 occur in every phantom; 5-8 only with the realism features "black_holes", "infarcts"
# and "isointense_masses" (see REALISM).
LABELS = {1: "ms_lesion", 2: "tumour_necrotic_core", 3: "tumour_oedema", 4: "tumour_enhancing_rim",
          5: "ms_black_hole", 6: "infarct_core", 7: "infarct_gliotic_rim", 8: "isointense_mass"}
MODALITIES = ("t1", "t1ce", "t2", "flair")
# Realism features (`make_phantom(..., realism=True)` turns on all): normal variants, never labelled,
# in healthy and lesioned subjects alike; and lesions that are not the brightest tissue on FLAIR.
NORMAL_VARIANTS = ("caps", "choroid_plexus", "septum", "flow_artefacts", "pv_rims")
REALISTIC_LESIONS = ("black_holes", "infarcts", "isointense_masses")
REALISM = NORMAL_VARIANTS + REALISTIC_LESIONS

PHANTOM_VERSION = 1

# Mean tissue intensities (arbitrary units, T1 white matter = 1000) as (CSF, GM, WM). Relative
# orders follow the usual clinical appearance: T1/T1ce WM > GM > CSF; T2 CSF >> GM > WM;
# FLAIR GM > WM with CSF suppressed. Each value is multiplied per subject by U(0.9, 1.1).
TISSUE_INTENSITY = {
    "t1": (250.0, 620.0, 1000.0),
    "t1ce": (260.0, 640.0, 1000.0),
    "t2": (1000.0, 500.0, 380.0),
    "flair": (150.0, 700.0, 550.0),
}
# Lesion intensities per label (same units); multiplied per subject by U(0.93, 1.07).
# MS: T2/FLAIR hyperintense (FLAIR ~1.6x WM), T1 hypointense, not enhancing.
# Necrotic core: fluid-like (T1 dark, T2 bright, FLAIR dark-ish and heterogeneous).
# Enhancing rim: T1ce ~1.5x WM, mildly bright on T2/FLAIR. Oedema: T2/FLAIR bright, T1 slightly dark.
LESION_INTENSITY = {
    "t1": {1: 680.0, 2: 320.0, 3: 800.0, 4: 720.0},
    "t1ce": {1: 700.0, 2: 340.0, 3: 810.0, 4: 1500.0},
    "t2": {1: 700.0, 2: 950.0, 3: 720.0, 4: 600.0},
    "flair": {1: 900.0, 2: 450.0, 3: 880.0, 4: 800.0},
}
# Lesions of the realism features (drawn from their own random stream, so the default phantom keeps
# its values). Black hole (5): T1 dark (between CSF and GM), T2 bright, FLAIR only mildly above WM
# and below GM. Infarct core (6): fluid, like CSF on every contrast (dark on FLAIR). Gliotic rim (7):
# FLAIR/T2 bright, mildly T1 dark. Isointense mass (8): within ~10% of GM on every contrast, found
# by the anatomy it pushes aside (mass effect) rather than by its intensity.
REALISTIC_LESION_INTENSITY = {
    "t1": {5: 480.0, 6: 280.0, 7: 760.0, 8: 640.0},
    "t1ce": {5: 500.0, 6: 290.0, 7: 770.0, 8: 680.0},
    "t2": {5: 820.0, 6: 980.0, 7: 700.0, 8: 600.0},
    "flair": {5: 630.0, 6: 210.0, 7: 870.0, 8: 650.0},
}
# Relative amplitude of the smooth multiplicative lesion texture, per label (FLAIR core: its own).
_TEXTURE = {1: 0.04, 2: 0.12, 3: 0.05, 4: 0.08, 5: 0.05, 6: 0.08, 7: 0.06, 8: 0.06}
_TEXTURE_FLAIR_CORE = 0.20

_TISSUE_JITTER = 0.10
_LESION_JITTER = 0.07
_NOISE_SIGMA = (0.02, 0.03)  # Rician sigma as a fraction of the subject's WM intensity
_BIAS_MAX = (0.10, 0.15)  # max |log bias| over the resampled box: the field spans ~ +/-10-15%
_DEFORM_MAX_MM = (2.5, 4.5)  # max non-linear displacement
_DEFORM_SPACING_MM = 24.0
_BIAS_SPACING_MM = 60.0
_TEXTURE_SPACING_MM = 6.0
_ROT_MAX_DEG = 5.0
_SCALE_MAX = 0.05
_TRANSLATE_MAX_MM = 4.0
_MIN_LESION_FRACTION = 0.0025  # every lesioned subject has at least this fraction of brain labelled

# Normal variants (all relative to the subject's own tissue intensities, see _draw_variants).
_CAP_THICKNESS_MM = (2.0, 5.0)  # e-folding distance of the caps' brightness from the ventricle wall
_CAP_FLAIR_GAIN = (0.5, 1.0)  # FLAIR at the ventricle wall: WM x (1 + gain) at the horns
_BAND_FRACTION = 0.4  # along the ventricles' bodies: a band of this fraction of the caps' gain and thickness
_SEPTUM_HALF_MM = (0.7, 1.4)  # Gaussian width of the septum pellucidum sheet
_PV_FLAIR_GAIN = (0.2, 0.45)  # extra FLAIR signal at 50/50 CSF/tissue voxels by the ventricles, x WM
_PV_CORTEX_FRACTION = 0.25  # ... and this fraction of it at CSF/tissue boundaries elsewhere
_FLOW_STREAKS = (2, 7)
_MASS_EFFECT_ISO = (0.35, 0.55)

_MODALITY_STREAM = {m: 10 + i for i, m in enumerate(MODALITIES)}
_STREAM_ANATOMY, _STREAM_LESION = 1, 2
_STREAM_VARIANTS, _STREAM_REALISTIC_LESIONS = 3, 4  # used only with realism features
_CASE_RE = re.compile(r"^(healthy|lesioned)_\d{3,}$")


# --------------------------------------------------------------------------------------- template


@dataclass(frozen=True)
class _Template:
    tissue: np.ndarray  # (3, X, Y, Z) float32: CSF, GM, WM probabilities, summing to `brain`
    brain: np.ndarray  # (X, Y, Z) float32 brain fraction of each voxel (the tissue maps' sum)
    affine: np.ndarray  # (4, 4) RAS, mm
    voxel_mm: float
    centre: np.ndarray  # (3,) voxel coordinates of the brain's centre of mass
    bbox: tuple[np.ndarray, np.ndarray]  # bounding box of brain > 0 (voxel, inclusive lo / hi)
    near_brain: np.ndarray  # bool: voxels with some brain, dilated by one voxel
    depth_mm: np.ndarray  # distance to the brain surface
    ms_prior: np.ndarray  # relative density of MS lesion centres (periventricular, deep WM)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _downsample(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average `volume` over boxes of `factor` voxels centred on every `factor`-th voxel.

    This is the partial-volume (anti-aliased) version of the grid nilearn gives for
    ``resolution=factor`` (same origin, voxel size `factor`, shape ceil(n / factor)). nilearn
    itself interpolates with a cubic spline: about 1 s per map here and no anti-aliasing.
    """
    if factor == 1:
        return volume
    if factor % 2:
        weights = np.full(factor, 1.0 / factor)
    else:
        weights = np.r_[0.5, np.ones(factor - 1), 0.5] / factor
    out = volume
    for axis in range(volume.ndim):
        out = ndi.correlate1d(out, weights, axis=axis, mode="constant", cval=0.0)
    return np.ascontiguousarray(out[tuple(slice(None, None, factor) for _ in range(volume.ndim))])


def _coarse_distance(target: np.ndarray, voxel_mm: float, grid_mm: float = 2.0) -> np.ndarray:
    """Distance (mm) to the nearest True voxel, computed on a grid of about `grid_mm`: only used
    for priors, where a millimetre does not matter and the full-resolution transform is slow."""
    step = max(1, int(round(grid_mm / voxel_mm)))
    sub = target[::step, ::step, ::step]
    if not sub.any():
        return np.full(target.shape, np.inf, np.float32)
    d = ndi.distance_transform_edt(~sub, sampling=voxel_mm * step).astype(np.float32)
    for axis in range(3):
        d = np.repeat(d, step, axis=axis)
    return np.ascontiguousarray(d[: target.shape[0], : target.shape[1], : target.shape[2]])


@functools.lru_cache(maxsize=4)
def _template(resolution: int) -> _Template:
    """The MNI152 tissue model at `resolution` mm, built once per process (nilearn ships it)."""
    from nilearn import datasets  # imported here: nilearn is slow to import and only needed now

    # Always read the native 1 mm maps (fast) and average them down ourselves (see _downsample).
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    mask1 = np.asarray(mask_img.dataobj) > 0
    gm = np.clip(gm_img.get_fdata(dtype=np.float32), 0, 1) * mask1
    wm = np.clip(wm_img.get_fdata(dtype=np.float32), 0, 1) * mask1
    csf = np.clip(mask1 - gm - wm, 0, 1)
    total = gm + wm + csf
    total[~mask1] = 1.0
    tissue = np.stack([csf, gm, wm]) / total  # sums to 1 inside the brain, 0 outside
    # Partial volume at coarser resolutions: the tissue maps sum to the brain fraction.
    tissue = np.stack([_downsample(t, resolution) for t in tissue]).astype(np.float32)
    brain = tissue.sum(0)
    mask = brain > 0.5

    affine = np.asarray(mask_img.affine, dtype=np.float64) @ np.diag([resolution] * 3 + [1.0])
    voxel_mm = float(np.sqrt((affine[:3, :3] ** 2).sum(0)).mean())
    centre = np.array([i.mean() for i in np.nonzero(mask)])
    idx = np.nonzero(brain > 0)
    bbox = (np.array([i.min() for i in idx]), np.array([i.max() for i in idx]))

    # Depth below the brain surface (the volume's edge counts as surface: the mask touches z = 0).
    depth = _coarse_distance(np.pad(~mask, 1, constant_values=True), voxel_mm)[1:-1, 1:-1, 1:-1]
    # MS lesions cluster around the ventricles: weight deep white matter by the distance to deep
    # CSF (ventricles, plus some deep fissure, which is harmless for a prior).
    deep_csf = (tissue[0] > 0.5) & (depth > 25.0)
    dist_vent = _coarse_distance(deep_csf, voxel_mm)
    ms_prior = ((depth > 10.0) * (0.15 + np.exp(-dist_vent / 6.0))).astype(np.float32)
    near = (brain > 0).view(np.uint8)
    for axis in range(3):  # dilation by a 3x3x3 cube, separably
        near = ndi.maximum_filter1d(near, 3, axis=axis)
    return _Template(
        tissue=_readonly(tissue),
        brain=_readonly(brain.astype(np.float32)),
        affine=_readonly(affine),
        voxel_mm=voxel_mm,
        centre=_readonly(centre),
        bbox=bbox,
        near_brain=_readonly(near > 0),
        depth_mm=_readonly(depth.astype(np.float32)),
        ms_prior=_readonly(ms_prior),
    )


@dataclass(frozen=True)
class _Ventricles:
    """Where the normal variants live, in template space (built only when realism is asked for)."""

    distance_mm: np.ndarray  # (X, Y, Z) float32: distance to the lateral ventricles, capped at 20 mm
    septum_region: np.ndarray  # bool: midline between the frontal horns / bodies of the ventricles
    flow_seeds: np.ndarray  # flat indices of deep CSF where flow artefacts start
    y_front_mm: float  # anterior tip of the frontal horns (template y, mm)
    y_back_mm: float  # posterior end of the occipital horns
    atria: np.ndarray  # (2, 3) template voxel coordinates of the left and right atria


@functools.lru_cache(maxsize=4)
def _ventricles(resolution: int) -> _Ventricles:
    """Lateral ventricles of the MNI152 tissue model and the landmarks of the normal variants.

    The lateral ventricles are the largest connected body of deep CSF (CSF > 0.5, more than 12 mm
    below the brain surface) inside a box around them (|x| <= 36, -60 <= y <= 34, -6 <= z <= 34 mm,
    MNI): at 1 and 2 mm both ventricles form one body (the template has no septum, which is one of
    the variants added). Frontal horns: the front 14 mm of it; occipital horns: the back 14 mm;
    atria: the centroid of its voxels more than 18 mm from the midline in its back 16 mm.
    """
    tpl = _template(resolution)
    vox = tpl.voxel_mm
    a = tpl.affine
    shape = tpl.brain.shape
    x, y, z = (a[i, i] * np.arange(shape[i]) + a[i, 3] for i in range(3))
    box = ((np.abs(x) <= 36)[:, None, None] & ((y >= -60) & (y <= 34))[None, :, None]
           & ((z >= -6) & (z <= 34))[None, None, :])
    deep_csf = (tpl.tissue[0] > 0.5) & (tpl.depth_mm > 12.0)
    labels, n = ndi.label(deep_csf & box)
    sizes = ndi.sum_labels(np.ones(shape), labels, np.arange(1, n + 1))
    vent = labels == 1 + int(np.argmax(sizes))
    pts = np.argwhere(vent)
    mm = pts * np.diag(a)[:3] + a[:3, 3]
    y_front, y_back = float(mm[:, 1].max()), float(mm[:, 1].min())
    atria = []
    for side in (-1, 1):
        sel = (mm[:, 1] < y_back + 16) & (mm[:, 0] * side > 18)
        atria.append(pts[sel].mean(0))
    # distance to the ventricles, exact, inside a box 22 mm around them (capped outside)
    pad = int(np.ceil(22 / vox))
    lo = np.maximum(pts.min(0) - pad, 0)
    hi = np.minimum(pts.max(0) + pad + 1, shape)
    sub = tuple(slice(int(i), int(j)) for i, j in zip(lo, hi))
    dist = np.full(shape, 20.0, np.float32)
    dist[sub] = np.minimum(ndi.distance_transform_edt(~vent[sub], sampling=vox), 20.0)
    septum = (dist < 3.0) & (np.abs(x) < 4.0)[:, None, None] & (y > y_front - 40)[None, :, None]
    # flow: the third and fourth ventricles, the basal cisterns and the medial lateral ventricles
    flow = ((tpl.tissue[0] > 0.6) & (tpl.depth_mm > 18.0) & (np.abs(x) <= 12)[:, None, None]
            & (z <= 20)[None, None, :])
    return _Ventricles(distance_mm=_readonly(dist), septum_region=_readonly(septum),
                       flow_seeds=_readonly(np.flatnonzero(flow)), y_front_mm=y_front, y_back_mm=y_back,
                       atria=_readonly(np.array(atria)))


# ------------------------------------------------------------------------------ smooth fields


def _bspline_kernel(u: np.ndarray) -> np.ndarray:
    a = np.abs(u)
    return np.where(a < 1, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2, (2 - a) ** 3 / 6.0, 0.0))


def _n_ctrl(n: int | float, spacing: float) -> int:
    """Control points needed to cover positions 0..n-1 (control k sits at (k - 1) * spacing)."""
    return int(np.floor(max(n - 1, 0) / spacing)) + 4


def _bspline_weights(pos: np.ndarray, n_ctrl: int, spacing: float) -> np.ndarray:
    """(len(pos), n_ctrl) cubic B-spline weights; rows sum to 1 for 0 <= pos <= (n_ctrl-4)*spacing."""
    u = np.asarray(pos, dtype=np.float64)[:, None] / spacing + 1.0 - np.arange(n_ctrl)[None, :]
    return _bspline_kernel(u).astype(np.float32)


def _spline_field(ctrl: np.ndarray, ranges: Iterable[np.ndarray], spacing: float) -> np.ndarray:
    """Evaluate control points `ctrl` (C, nx, ny, nz) on the grid `ranges` (three 1-D voxel
    position arrays): (C, len(x), len(y), len(z)) float32. Tensor product, three small matmuls."""
    wx, wy, wz = (_bspline_weights(r, n, spacing) for r, n in zip(ranges, ctrl.shape[1:]))
    c = ctrl.astype(np.float32)
    t = np.einsum("kabc,yb->kayc", c, wy)
    t = np.einsum("kayc,xa->kxyc", t, wx)
    k, x, y, nz = t.shape
    return (t.reshape(-1, nz) @ wz.T).reshape(k, x, y, len(wz))


def _spline_points(ctrl: np.ndarray, pts: np.ndarray, spacing: float) -> np.ndarray:
    """Evaluate control points (C, nx, ny, nz) at points (P, 3): (P, C)."""
    w = [_bspline_weights(pts[:, a], ctrl.shape[1 + a], spacing) for a in range(3)]
    return np.einsum("pa,pb,pc,kabc->pk", w[0], w[1], w[2], ctrl.astype(np.float32))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _small_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# -------------------------------------------------------------------------------------- subject


@dataclass
class PhantomSubject:
    """One synthetic subject in memory (what `make_phantom` writes for a case)."""

    images: dict[str, np.ndarray]  # modality -> (X, Y, Z) float32
    mask: np.ndarray  # (X, Y, Z) uint8 0/1: the deformed brain mask
    seg: np.ndarray | None  # (X, Y, Z) uint8 labels per LABELS; None for healthy subjects
    affine: np.ndarray  # (4, 4)
    tissue_box: np.ndarray = field(repr=False)  # (3, *box shape) CSF, GM, WM inside `box`
    box: tuple[slice, ...]  # the part of the volume that can hold brain (the rest is background)
    info: dict = field(default_factory=dict)  # families, lesion voxel counts, contrast draws
    # realism's normal variants (never labelled): name -> (X, Y, Z) bool, where the variant shows
    variants: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def tissue(self) -> np.ndarray:
        """(3, X, Y, Z) float32 CSF, GM, WM probabilities in subject space (built on demand)."""
        full = np.zeros((3,) + self.mask.shape, np.float32)
        full[(slice(None),) + self.box] = self.tissue_box
        return full


def _rng(seed: int, index: int, lesioned: bool, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(bool(lesioned)), int(stream)])


@dataclass
class _Tumour:
    centre_tpl: np.ndarray  # template voxel coordinates
    radius_mm: float
    axes_mm: np.ndarray
    rotation: np.ndarray
    core_fraction: float
    oedema_extent: float
    irregularity: float
    mass_effect: float
    centre: np.ndarray | None = None  # subject voxel coordinates (after inverting the warp)


def _draw_tumour(rng: np.random.Generator, tpl: _Template) -> _Tumour:
    radius = rng.uniform(10.0, 25.0)
    min_depth = float(np.clip(0.8 * radius, 12.0, 22.0))
    cand = np.flatnonzero((tpl.tissue[2] > 0.5) & (tpl.depth_mm >= min_depth))
    if cand.size == 0:  # cannot happen with MNI152; keep a sane fallback anyway
        cand = np.array([np.argmax(tpl.depth_mm)])
    centre = np.array(np.unravel_index(cand[rng.integers(cand.size)], tpl.brain.shape), float)
    centre += rng.uniform(-0.5, 0.5, 3)
    return _Tumour(
        centre_tpl=centre,
        radius_mm=radius,
        axes_mm=radius * rng.uniform(0.8, 1.2, 3),
        rotation=_random_rotation(rng),
        core_fraction=rng.uniform(0.35, 0.7),
        oedema_extent=rng.uniform(1.6, 2.4),
        irregularity=rng.uniform(0.08, 0.18),
        mass_effect=rng.uniform(0.1, 0.3),
    )


@dataclass
class _Warp:
    """Output voxel x samples the template at c0 + M (x - c0) + t + d(x) + mass(x)."""

    matrix: np.ndarray
    shift: np.ndarray
    centre: np.ndarray
    ctrl: np.ndarray  # (3, nx, ny, nz) displacement control points, voxel units
    spacing: float  # control spacing, voxels
    bound: float  # |d(x)| <= bound (voxels)


def _draw_warp(rng: np.random.Generator, tpl: _Template) -> _Warp:
    vox = tpl.voxel_mm
    rot = _small_rotation(rng, _ROT_MAX_DEG)
    scale = rng.uniform(1 - _SCALE_MAX, 1 + _SCALE_MAX, 3)
    shift = rng.uniform(-_TRANSLATE_MAX_MM, _TRANSLATE_MAX_MM, 3) / vox
    spacing = _DEFORM_SPACING_MM / vox
    shape = tpl.brain.shape
    ctrl = rng.standard_normal((3,) + tuple(_n_ctrl(n, spacing) for n in shape))
    ctrl = ndi.gaussian_filter(ctrl, sigma=(0, 1, 1, 1), mode="nearest")
    # scale to the wanted maximum displacement, measured on a coarse grid over the brain's box
    coarse = [np.arange(lo, hi + 1, 2, dtype=np.float32) for lo, hi in zip(*tpl.bbox)]
    peak = np.sqrt((_spline_field(ctrl, coarse, spacing) ** 2).sum(0)).max()
    ctrl *= rng.uniform(*_DEFORM_MAX_MM) / vox / max(float(peak), 1e-6)
    ctrl = ctrl.astype(np.float32)
    bound = float(np.sqrt((ctrl**2).sum(0)).max())  # B-splines are convex weights: |d| <= bound
    return _Warp(rot @ np.diag(scale), shift, tpl.centre.copy(), ctrl, spacing, bound)


def _invert_warp(warp: _Warp, target: np.ndarray) -> np.ndarray:
    """Subject voxel x with c0 + M (x - c0) + t + d(x) = target (fixed point; d is small, smooth)."""
    minv = np.linalg.inv(warp.matrix)
    x = warp.centre + minv @ (target - warp.centre - warp.shift)
    for _ in range(20):
        d = _spline_points(warp.ctrl, x[None], warp.spacing)[0]
        x_new = warp.centre + minv @ (target - warp.centre - warp.shift - d)
        if np.abs(x_new - x).max() < 1e-4:
            return x_new
        x = x_new
    return x


def _output_box(tpl: _Template, warp: _Warp, margin: float) -> tuple[slice, slice, slice]:
    """Subject-space box outside which nothing maps into the template brain (conservative)."""
    lo = tpl.bbox[0] - margin - 1
    hi = tpl.bbox[1] + margin + 1
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    minv = np.linalg.inv(warp.matrix)
    out = warp.centre + (corners - warp.centre - warp.shift) @ minv.T
    shape = tpl.brain.shape
    a = np.clip(np.floor(out.min(0)).astype(int) - 1, 0, None)
    b = np.minimum(np.ceil(out.max(0)).astype(int) + 2, shape)
    return tuple(slice(int(i), int(j)) for i, j in zip(a, b))


def _coordinates(warp: _Warp, box, masses: list[_Tumour], vox: float) -> np.ndarray:
    """Template voxel coordinates (3, *box shape) float32 for every subject voxel in `box`."""
    ranges = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
    coords = _spline_field(warp.ctrl, ranges, warp.spacing)  # displacement d(x)
    m = warp.matrix.astype(np.float32)
    base = (warp.centre + warp.shift - warp.matrix @ warp.centre).astype(np.float32)
    for a in range(3):
        coords[a] += (m[a, 0] * ranges[0])[:, None, None]
        coords[a] += (m[a, 1] * ranges[1])[None, :, None]
        coords[a] += (m[a, 2] * ranges[2])[None, None, :] + base[a]
    for tumour in masses:
        if tumour.mass_effect <= 0:
            continue
        # Mass effect: near the tumour, sample the template closer to the centre, which pushes the
        # surrounding anatomy outwards. Radial map r -> r (1 - a exp(-r^2 / 2 s^2)) is monotone for a < 1.
        sigma = 1.2 * tumour.radius_mm / vox  # voxels
        rel = [r - c for r, c in zip(ranges, tumour.centre)]
        g = np.exp(-(rel[0][:, None, None] ** 2 + rel[1][None, :, None] ** 2 + rel[2][None, None, :] ** 2)
                   / (2 * sigma**2)).astype(np.float32)
        g *= -tumour.mass_effect
        # the warp's linear part applies to the pull as well, so the composition stays one map
        for a in range(3):
            coords[a] += g * (m[a, 0] * rel[0][:, None, None] + m[a, 1] * rel[1][None, :, None]
                              + m[a, 2] * rel[2][None, None, :])
    return coords


def _lesion_box(centre: np.ndarray, half: float, shape) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    rel = [np.arange(a, b, dtype=np.float32) - np.float32(c) for a, b, c in zip(lo, hi, centre)]
    return box, rel


def _ellipsoid_radius(rel, rotation: np.ndarray, axes_vox: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the surface) on the grid spanned by `rel`."""
    # v = R^T (x - c): coordinates in the ellipsoid's own frame
    rt = rotation.T.astype(np.float32)
    r2 = None
    for a in range(3):
        v = ((rt[a, 0] * rel[0])[:, None, None] + (rt[a, 1] * rel[1])[None, :, None]
             + (rt[a, 2] * rel[2])[None, None, :])
        term = (v / np.float32(axes_vox[a])) ** 2
        r2 = term if r2 is None else r2 + term
    return np.sqrt(r2)


def _irregular_radius(rng, blob: _Tumour, vox: float, extent: float, shape):
    """(box, r): the normalised radius of `blob`'s ellipsoid (1 on its surface) on a box reaching
    `extent` times its largest axis, its outline modulated by smooth noise (B-spline, ~R/1.5 spacing)."""
    axes_vox = blob.axes_mm / vox
    half = extent * axes_vox.max() * (1 + 2.5 * blob.irregularity) + 3
    box, rel = _lesion_box(blob.centre, half, shape)
    r = _ellipsoid_radius(rel, blob.rotation, axes_vox)
    spacing = max(blob.radius_mm / 1.5 / vox, 2.0)
    shape = tuple(len(x) for x in rel)
    ctrl = rng.standard_normal((1,) + tuple(_n_ctrl(n, spacing) for n in shape))
    noise = _spline_field(ctrl, [np.arange(n, dtype=np.float32) for n in shape], spacing)[0]
    noise /= max(float(noise.std()), 1e-6)
    r /= 1 + blob.irregularity * np.clip(noise, -2.5, 2.5)
    return box, r


def _tumour_memberships(rng, tumour: _Tumour, vox: float, wm, csf, mask):
    """Soft memberships (core, tumour = core + rim, oedema >= tumour) as box-local arrays."""
    box, r = _irregular_radius(rng, tumour, vox, tumour.oedema_extent, mask.shape)
    sharp = np.float32(tumour.radius_mm / 1.0)  # edge width ~1 mm
    m_tum = expit((1 - r) * sharp)
    m_core = expit((tumour.core_fraction - r) * sharp)
    # Oedema reaches further along white matter than into grey matter (vasogenic oedema spares cortex).
    extent = 1 + (tumour.oedema_extent - 1) * (0.2 + 0.8 * wm[box])
    m_oed = expit((extent - r) * np.float32(tumour.radius_mm / 2.0))
    mb = mask[box]
    m_tum *= mb
    m_core *= mb
    m_oed = np.maximum(m_oed * mb * (1 - csf[box]), m_tum)
    return box, m_core.astype(np.float32), m_tum.astype(np.float32), m_oed.astype(np.float32)


def _add_ms_lesions(rng, ms, cand_idx, cand_w, vox, conf, target_voxels: int, n_min: int,
                    n_max: int = 60) -> int:
    """Add ellipsoidal MS-like lesions to `ms` (in place) until `target_voxels` are labelled."""
    if cand_idx.size == 0:
        return 0
    p = cand_w / cand_w.sum()
    centres = rng.choice(cand_idx, size=n_max, p=p)
    labelled = 0
    n = 0
    for flat in centres:
        if n >= n_min and labelled >= target_voxels:
            break
        c = np.array(np.unravel_index(flat, ms.shape), float) + rng.uniform(-0.5, 0.5, 3)
        a = rng.uniform(2.0, 6.0)
        axes_mm = np.array([a * rng.uniform(0.7, 1.0), a, a * rng.uniform(1.2, 2.0)])
        rot = _random_rotation(rng)
        axes_vox = axes_mm / vox
        box, rel = _lesion_box(c, axes_vox.max() * 1.3 + 2, ms.shape)
        r = _ellipsoid_radius(rel, rot, axes_vox)
        m = expit((1 - r) * np.float32(a / 0.7)) * conf[box]  # edge width ~0.7 mm
        before = int((ms[box] > 0.5).sum())
        np.maximum(ms[box], m, out=ms[box])
        labelled += int((ms[box] > 0.5).sum()) - before
        n += 1
    return n


# ---------------------------------------------------------------------------------------- realism


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
    return np.random.default_rng([int(seed), int(index), int(bool(lesioned)), _STREAM_VARIANTS,
                                  REALISM.index(feature)])


def _template_mm(tpl: _Template, coords: np.ndarray, axis: int) -> np.ndarray:
    """Template world coordinate (mm) along `axis` of template voxel coordinates (3, ...)."""
    a = tpl.affine.astype(np.float32)
    return a[axis, 0] * coords[0] + a[axis, 1] * coords[1] + a[axis, 2] * coords[2] + a[axis, 3]


def _nearest_lookup(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    idx = [np.clip(np.rint(coords[a]).astype(np.intp), 0, volume.shape[a] - 1) for a in range(3)]
    return volume[idx[0], idx[1], idx[2]]


@dataclass
class _Variants:
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


def _draw_variants(features, seed, index, lesioned, tpl: _Template, warp: _Warp, coords, box, csf, gm, wm):
    """The normal variants asked for in `features`, drawn for one subject (see `make_phantom`)."""
    vox = tpl.voxel_mm
    vent = _ventricles(int(round(vox)))
    v = _Variants()
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
            blob = _Tumour(centre_tpl=centre_tpl + rng.normal(0, 2.0 / vox, 3), radius_mm=0.0,
                           axes_mm=np.array([rng.uniform(2.5, 4.5), rng.uniform(4.0, 8.0), rng.uniform(2.5, 4.5)]),
                           rotation=np.eye(3), core_fraction=0.0, oedema_extent=1.0,
                           irregularity=rng.uniform(0.1, 0.2), mass_effect=0.0)
            blob.radius_mm = float(blob.axes_mm.max())
            blob.centre = _invert_warp(warp, blob.centre_tpl) - origin
            sub, r = _irregular_radius(rng, blob, vox, 1.0, csf.shape)
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
            centre = _invert_warp(warp, np.array(np.unravel_index(flat, tpl.brain.shape), float)) - origin
            # streaks along y: the phase-encoding direction of an axial scan, where pulsation ghosts
            axes = np.array([rng.uniform(1.5, 3.0), rng.uniform(4.0, 12.0), rng.uniform(2.0, 4.0)]) / vox
            sub, rel = _lesion_box(centre, axes.max() + 2, csf.shape)
            r = _ellipsoid_radius(rel, np.eye(3), axes)
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


def _draw_mass(rng: np.random.Generator, tpl: _Template, avoid: _Tumour | None) -> _Tumour:
    """An isointense mass: solid, irregular, with strong mass effect, centred in the white matter
    under the cortex (so it borders grey matter of its own intensity on one side)."""
    radius = rng.uniform(12.0, 22.0)
    ok = (tpl.tissue[2] > 0.5) & (tpl.depth_mm >= 0.6 * radius) & (tpl.depth_mm <= radius + 4.0)
    cand = np.argwhere(ok).astype(float)
    if avoid is not None:  # keep clear of the other tumour
        far = np.linalg.norm(cand - avoid.centre_tpl, axis=1) * tpl.voxel_mm > 1.3 * (radius + avoid.radius_mm)
        cand = cand[far] if far.any() else cand
    centre = cand[rng.integers(len(cand))] + rng.uniform(-0.5, 0.5, 3)
    return _Tumour(centre_tpl=centre, radius_mm=radius, axes_mm=radius * rng.uniform(0.8, 1.2, 3),
                   rotation=_random_rotation(rng), core_fraction=0.0, oedema_extent=1.0,
                   irregularity=rng.uniform(0.05, 0.12), mass_effect=rng.uniform(*_MASS_EFFECT_ISO))


def _draw_infarct(rng: np.random.Generator, tpl: _Template, cortical: bool) -> tuple[_Tumour, float]:
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
    blob = _Tumour(centre_tpl=centre + rng.uniform(-0.5, 0.5, 3), radius_mm=radius,
                   axes_mm=radius * rng.uniform(0.7, 1.3, 3), rotation=_random_rotation(rng),
                   core_fraction=0.0, oedema_extent=1.0, irregularity=rng.uniform(0.1, 0.2), mass_effect=0.0)
    return blob, rng.uniform(2.0, 4.0)


def make_subject(index: int, lesioned: bool, seed: int = 0, resolution: int = 2,
                 modalities: Iterable[str] = MODALITIES, realism=False) -> PhantomSubject:
    """Synthesise one subject in memory; `make_phantom` writes exactly this for case `index`."""
    modalities = _check_modalities(modalities)
    features = realism_features(realism)
    tpl = _template(int(resolution))
    vox = tpl.voxel_mm
    shape = tpl.brain.shape
    rng_anat = _rng(seed, index, lesioned, _STREAM_ANATOMY)
    rng_les = _rng(seed, index, lesioned, _STREAM_LESION)
    rng_real = _rng(seed, index, lesioned, _STREAM_REALISTIC_LESIONS)

    families: list[str] = []
    tumour = mass = None
    if lesioned:
        # Alternate the primary family so any consecutive lesioned subjects cover all families;
        # a quarter of subjects also get another one.
        pool = ["ms", "tumour"] + [fam for fam, feature in (("infarct", "infarcts"), ("mass", "isointense_masses"))
                                   if feature in features]
        primary = pool[(int(seed) + int(index)) % len(pool)]
        families = [primary]
        if rng_les.random() < 0.25:
            others = [fam for fam in pool if fam != primary]
            families.append(others[0] if len(others) == 1 else others[int(rng_real.integers(len(others)))])
        if "tumour" in families:
            tumour = _draw_tumour(rng_les, tpl)
        if "mass" in families:
            mass = _draw_mass(rng_real, tpl, tumour)

    warp = _draw_warp(rng_anat, tpl)
    margin = warp.bound
    masses = [m for m in (tumour, mass) if m is not None]
    for m in masses:
        m.centre = _invert_warp(warp, m.centre_tpl)
        margin += m.mass_effect * 1.2 * m.radius_mm / vox
    box = _output_box(tpl, warp, margin)
    coords = _coordinates(warp, box, masses, vox)

    # The one resampling: linear for GM, WM and the brain fraction; CSF = brain - GM - WM exactly,
    # since interpolation is linear and the template's maps sum to its brain fraction.
    # Only points whose interpolation support touches the template brain can be nonzero.
    tc = np.rint(coords).astype(np.int16)
    for a in range(3):
        np.clip(tc[a], 0, shape[a] - 1, out=tc[a])
    near = tpl.near_brain[tc[0], tc[1], tc[2]]
    del tc
    pts = coords[:, near]
    csf_t, gm_t, wm_t = tpl.tissue
    kw = dict(order=1, mode="constant", cval=0.0, prefilter=False)
    gm, wm, brain = (np.zeros(near.shape, np.float32) for _ in range(3))
    gm[near] = ndi.map_coordinates(gm_t, pts, **kw)
    wm[near] = ndi.map_coordinates(wm_t, pts, **kw)
    brain[near] = ndi.map_coordinates(tpl.brain, pts, **kw)  # tissue fraction (partial volume at edges)
    del pts
    csf = np.clip(brain - gm - wm, 0, None)
    mask = brain > 0.5
    maskf = mask.astype(np.float32)
    n_brain = int(mask.sum())
    variants = None
    if any(f in NORMAL_VARIANTS for f in features):
        variants = _draw_variants(features, seed, index, lesioned, tpl, warp, coords, box, csf, gm, wm)

    # ------------------------------------------------------------------ lesions (box-local arrays)
    seg = None
    w_tissue = None
    lesion_terms: list[tuple[int, np.ndarray, tuple]] = []  # (label, weight, sub-box) in box coords
    sparse_terms: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    info: dict = {"families": families}
    if lesioned:
        seg = np.zeros(brain.shape, np.uint8)
        w_tissue = np.ones(brain.shape, np.float32)
        m_oed_full = None
        n_tumour = 0
        if tumour is not None:
            tumour.centre = tumour.centre - np.array([s.start for s in box])  # into box coordinates
            tbox, m_core, m_tum, m_oed = _tumour_memberships(rng_les, tumour, vox, wm, csf, maskf)
            lesion_terms += [(2, m_core, tbox), (4, m_tum - m_core, tbox), (3, m_oed - m_tum, tbox)]
            w_tissue[tbox] = 1 - m_oed
            m_oed_full = np.zeros(brain.shape, np.float32)
            m_oed_full[tbox] = m_oed
            sub = seg[tbox]
            sub[m_oed > 0.5] = 3
            sub[m_tum > 0.5] = 4
            sub[m_core > 0.5] = 2
            n_tumour = int((sub > 0).sum())
            centre_world = tpl.affine @ np.append(tumour.centre + [s.start for s in box], 1.0)
            info["tumour"] = {"centre_mm": [round(float(v), 2) for v in centre_world[:3]],
                              "radius_mm": round(float(tumour.radius_mm), 2)}

        # lesions of the realism features: labelled where their membership passes 0.5 (not over
        # labels placed before); their weights take the place of the tissue
        n_realistic = 0

        def place(label: int, weight_of_rest: np.ndarray, sub, labelled: np.ndarray) -> int:
            w = weight_of_rest * w_tissue[sub]
            w_tissue[sub] -= w
            lesion_terms.append((label, w, sub))
            seg_sub = seg[sub]
            new = labelled & (seg_sub == 0)
            seg_sub[new] = label
            return int(new.sum())

        origin = np.array([s.start for s in box])
        if mass is not None:
            mass.centre = mass.centre - origin
            mbox, r = _irregular_radius(rng_real, mass, vox, 1.0, brain.shape)
            m = expit((1 - r) * np.float32(mass.radius_mm / 1.5)) * maskf[mbox]  # edge width ~1.5 mm
            n_realistic += place(8, m, mbox, m > 0.5)
            centre_world = tpl.affine @ np.append(mass.centre + origin, 1.0)
            info["isointense_mass"] = {"centre_mm": [round(float(v), 2) for v in centre_world[:3]],
                                       "radius_mm": round(float(mass.radius_mm), 2),
                                       "mass_effect": round(float(mass.mass_effect), 3)}
        if "infarct" in families:
            info["infarcts"] = []
            for k in range(1 + int(rng_real.random() < 0.5)):
                cortical = k == 0 and rng_real.random() < 0.7
                blob, rim_mm = _draw_infarct(rng_real, tpl, cortical)
                blob.centre = _invert_warp(warp, blob.centre_tpl) - origin
                ibox, r = _irregular_radius(rng_real, blob, vox, 1 + rim_mm / blob.radius_mm, brain.shape)
                sharp = np.float32(blob.radius_mm / 0.7)  # edge width ~0.7 mm
                m_core = expit((1 - r) * sharp) * maskf[ibox]
                m_all = expit((1 + np.float32(rim_mm / blob.radius_mm) - r) * sharp) * maskf[ibox]
                tissue_frac = np.clip(1 - csf[ibox], 0, 1)
                m_rim = (m_all - m_core) * tissue_frac  # gliosis forms in tissue, not in the sulci
                n_realistic += place(6, m_core, ibox, m_core > 0.5)
                n_realistic += place(7, m_rim / np.maximum(1 - m_core, 1e-3), ibox,
                                     (m_all > 0.5) & (m_core <= 0.5) & (tissue_frac > 0.5))
                info["infarcts"].append({"kind": "cortical" if cortical else "lacunar",
                                         "radius_mm": round(float(blob.radius_mm), 2), "rim_mm": round(float(rim_mm), 2)})

        need_ms = "ms" in families
        deficit = int(np.ceil(_MIN_LESION_FRACTION * n_brain)) - n_tumour - n_realistic
        if need_ms or deficit > 0:
            if not need_ms:
                families.append("ms")  # tumour clipped by the brain edge: top up with MS lesions
            ms = np.zeros(brain.shape, np.float32)
            # candidates: white matter, away from the surface, outside the tumour; weighted towards
            # the ventricles (template-space prior looked up through the warp)
            ok = (wm > 0.5) & mask
            if m_oed_full is not None:
                ok &= m_oed_full < 0.05
            if n_realistic:
                ok &= w_tissue > 0.95
            cand = np.flatnonzero(ok)
            tc = np.rint(coords.reshape(3, -1)[:, cand]).astype(np.intp)
            for a in range(3):
                np.clip(tc[a], 0, shape[a] - 1, out=tc[a])
            weights = tpl.ms_prior[tc[0], tc[1], tc[2]].astype(np.float64)
            keep = weights > 0
            cand, weights = cand[keep], weights[keep]
            if need_ms:
                target = int(rng_les.uniform(0.003, 0.008) * n_brain)
                n_min = 3
            else:
                target, n_min = deficit, 1
            black_holes = 0
            if need_ms and "black_holes" in features:  # a part of the MS lesion load is T1 black holes
                black_holes = int(rng_real.uniform(0.3, 0.6) * target)
                target -= black_holes
            conf = maskf * np.clip(1 - csf, 0, 1)
            n_ms = _add_ms_lesions(rng_les, ms, cand, weights, vox, conf, target, n_min)
            info["n_ms_lesions"] = n_ms
            ms_label = (ms > 0.5) & (seg == 0)
            seg[ms_label] = 1
            w_ms = ms * w_tissue
            w_tissue -= w_ms
            everywhere = tuple(slice(None) for _ in range(3))
            lesion_terms.append((1, w_ms, everywhere))
            if black_holes:
                bh = np.zeros(brain.shape, np.float32)
                info["n_black_holes"] = _add_ms_lesions(rng_real, bh, cand, weights, vox, conf * (1 - ms),
                                                        black_holes, 2)
                place(5, bh, everywhere, bh > 0.5)

        # one smooth texture field shared by all lesion classes (tissue heterogeneity)
        tspacing = _TEXTURE_SPACING_MM / vox
        tshape = brain.shape
        ctrl = rng_les.standard_normal((1,) + tuple(_n_ctrl(n, tspacing) for n in tshape))
        texture = _spline_field(ctrl, [np.arange(n, dtype=np.float32) for n in tshape], tspacing)[0]
        texture /= max(float(texture.std()), 1e-6)
        np.clip(texture, -3, 3, out=texture)
        # Lesions cover a small part of the box: keep each class's weight (times the brain
        # fraction) and its texture-modulated copy as sparse lists, reused by every modality.
        flat_index = np.arange(brain.size).reshape(brain.shape)
        for label, weight, sub in lesion_terms:
            weight = weight * brain[sub]
            nz = weight > 1e-6
            idx = flat_index[sub][nz]
            a = weight[nz]
            sparse_terms.append((label, idx, a, a * texture[sub][nz]))
        del lesion_terms, flat_index

    # ------------------------------------------------------------------------------ contrasts
    realistic_i = {}
    if lesioned and any(f in REALISTIC_LESIONS for f in features):  # drawn for all modalities: same subject
        realistic_i = {mod: {k: v * rng_real.uniform(1 - _LESION_JITTER, 1 + _LESION_JITTER)
                             for k, v in sorted(REALISTIC_LESION_INTENSITY[mod].items())} for mod in MODALITIES}
    images: dict[str, np.ndarray] = {}
    ranges = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
    jitters: dict[str, dict] = {}
    for mod in modalities:
        rng = _rng(seed, index, lesioned, _MODALITY_STREAM[mod])
        tissue_i = np.array(TISSUE_INTENSITY[mod]) * rng.uniform(1 - _TISSUE_JITTER, 1 + _TISSUE_JITTER, 3)
        lesion_i = {k: v * rng.uniform(1 - _LESION_JITTER, 1 + _LESION_JITTER)
                    for k, v in sorted(LESION_INTENSITY[mod].items())}
        lesion_i.update(realistic_i.get(mod, {}))
        sigma = rng.uniform(*_NOISE_SIGMA) * tissue_i[2]
        # smooth multiplicative bias field exp(b), b a coarse B-spline (60 mm control spacing)
        bspacing = _BIAS_SPACING_MM / vox
        bctrl = rng.standard_normal((1,) + tuple(_n_ctrl(n, bspacing) for n in shape))
        log_bias = _spline_field(bctrl, ranges, bspacing)[0]
        log_bias *= np.float32(rng.uniform(*_BIAS_MAX) / max(float(np.abs(log_bias).max()), 1e-6))
        bias = np.exp(log_bias, out=log_bias)

        c, g, w = (np.float32(v) for v in tissue_i)
        signal = csf * c + gm * g + wm * w
        if lesioned:
            signal *= w_tissue
            flat = signal.reshape(-1)
            for label, idx, a, a_tex in sparse_terms:
                amp = _TEXTURE_FLAIR_CORE if (mod == "flair" and label == 2) else _TEXTURE[label]
                # lesion intensity x (1 + amp x texture), blended by the lesion's weight
                flat[idx] += np.float32(lesion_i[label]) * (a + np.float32(amp) * a_tex)
        if variants is not None:
            extra = variants.term(mod, tissue_i)
            if extra is not None:
                signal += extra if w_tissue is None else extra * w_tissue
        signal *= bias
        # Rician noise: |signal + complex Gaussian|. Where the signal is 0 (background) that is a
        # Rayleigh variable, drawn from one uniform instead of two normals (same distribution).
        s32 = np.float32(sigma)
        img = rng.random(shape, dtype=np.float32)
        np.subtract(np.float32(1), img, out=img)  # (0, 1]
        np.log(img, out=img)
        img *= np.float32(-2) * s32 * s32
        np.sqrt(img, out=img)
        fg = signal > 0
        n = rng.standard_normal((2, int(fg.sum())), dtype=np.float32)
        n *= s32
        n[0] += signal[fg]
        img[box][fg] = np.hypot(n[0], n[1])  # img[box] is a view: this writes into img
        images[mod] = np.rint(img, out=img)
        jitters[mod] = {"tissue_csf_gm_wm": [round(float(v), 2) for v in tissue_i],
                        "noise_sigma": round(float(sigma), 3)}

    full_mask = np.zeros(shape, np.uint8)
    full_mask[box] = mask
    full_seg = None
    if seg is not None:
        full_seg = np.zeros(shape, np.uint8)
        full_seg[box] = seg
        info["lesion_voxels"] = {name: int((full_seg == k).sum()) for k, name in LABELS.items()}
    info["brain_voxels"] = n_brain
    info["contrast"] = jitters
    variant_masks = {}
    if features:
        info["realism"] = list(features)
    if variants is not None:
        info["variants"] = variants.info
        for name, m in variants.masks.items():
            full = np.zeros(shape, bool)
            full[box] = m
            variant_masks[name] = full
    return PhantomSubject(images=images, mask=full_mask, seg=full_seg, affine=np.array(tpl.affine),
                          info=info, tissue_box=np.stack([csf, gm, wm]), box=box, variants=variant_masks)


# ---------------------------------------------------------------------------------------- writing


def _check_modalities(modalities) -> tuple[str, ...]:
    if isinstance(modalities, str):
        modalities = (modalities,)
    out = tuple(dict.fromkeys(str(m).lower() for m in modalities))
    unknown = [m for m in out if m not in MODALITIES]
    if unknown or not out:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {tuple(modalities)}")
    return out


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    # code 1 (scanner anatomical), not MNI: each subject is deformed away from MNI152 space
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _remove_stale(split_dir: Path, keep: set[str]) -> None:
    """Remove phantom-named case folders of an earlier run that this run does not write."""
    if not split_dir.is_dir():
        return
    for entry in sorted(split_dir.iterdir()):
        if entry.is_dir() and _CASE_RE.match(entry.name) and entry.name not in keep:
            shutil.rmtree(entry)


def _case_files(subject: PhantomSubject, case_dir: Path) -> list[tuple[np.ndarray, Path]]:
    case = case_dir.name
    files = [(data, case_dir / f"{case}_{mod}.nii.gz") for mod, data in subject.images.items()]
    files.append((subject.mask, case_dir / f"{case}_mask.nii.gz"))
    if subject.seg is not None:
        files.append((subject.seg, case_dir / f"{case}_seg.nii.gz"))
    return files


def _remove_stale_files(case_dir: Path, written: set[str]) -> None:
    for old in case_dir.glob(f"{case_dir.name}_*.nii*"):  # e.g. a modality an earlier run wrote
        if old.name not in written:
            old.unlink()


def make_phantom(out_dir, n_healthy: int, n_lesioned: int, seed: int = 0, resolution: int = 2,
                 modalities=MODALITIES, progress: bool = False, realism=False) -> dict:
    """Write a phantom dataset; return {"train": [case dirs], "test": [case dirs]} (pathlib.Path).

    `n_healthy` healthy subjects go to ``out_dir/train`` (no seg), `n_lesioned` lesioned subjects to
    ``out_dir/test`` (with ``<case>_seg.nii.gz``, labels per `LABELS`). `resolution` is the
    MNI152 voxel size in mm (2: 99x117x95, 1: 197x233x189). The same seed gives the same arrays;
    an existing phantom in `out_dir` is overwritten and phantom cases it no longer contains removed.
    `realism`: False (default: the phantom of PHANTOM_VERSION, unchanged), True (every feature of
    `REALISM`) or some of their names; see the module docstring.
    """
    n_healthy, n_lesioned, seed, resolution = int(n_healthy), int(n_lesioned), int(seed), int(resolution)
    if n_healthy < 0 or n_lesioned < 0:
        raise ValueError(f"subject counts must be >= 0, got n_healthy={n_healthy}, n_lesioned={n_lesioned}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of mm, got {resolution}")
    modalities = _check_modalities(modalities)
    features = realism_features(realism)
    out_dir = Path(out_dir)
    jobs = [("train", f"healthy_{i:03d}", i, False) for i in range(n_healthy)]
    jobs += [("test", f"lesioned_{i:03d}", i, True) for i in range(n_lesioned)]
    _remove_stale(out_dir / "train", {c for s, c, _, _ in jobs if s == "train"})
    _remove_stale(out_dir / "test", {c for s, c, _, _ in jobs if s == "test"})

    result: dict[str, list[Path]] = {"train": [], "test": []}
    cases: dict[str, dict] = {}
    # gzip dominates the run time; it releases the GIL, so one subject's files are compressed in
    # worker threads while the next subject is synthesised (at most two subjects in memory).
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: list = []
        for k, (split, case, index, lesioned) in enumerate(jobs):
            if progress:
                print(f"phantom: {case} ({k + 1}/{len(jobs)})", file=sys.stderr, flush=True)
            subject = make_subject(index, lesioned, seed=seed, resolution=resolution, modalities=modalities,
                                   realism=features)
            for f in pending:
                f.result()  # re-raises a failed write
            case_dir = out_dir / split / case
            case_dir.mkdir(parents=True, exist_ok=True)
            files = _case_files(subject, case_dir)
            _remove_stale_files(case_dir, {p.name for _, p in files})
            pending = [pool.submit(_save, data, subject.affine, path) for data, path in files]
            result[split].append(case_dir)
            cases[case] = {"split": split, **subject.info}
        for f in pending:
            f.result()

    tpl = _template(resolution)
    meta = {
        "generator": "anomaseg.data.phantom",
        "version": PHANTOM_VERSION,
        "seed": seed,
        "resolution": resolution,
        "shape": list(tpl.brain.shape),
        "n_healthy": n_healthy,
        "n_lesioned": n_lesioned,
        "modalities": list(modalities),
        "labels": {str(k): v for k, v in LABELS.items()},
        "intensities": {
            "tissue_csf_gm_wm": {m: list(v) for m, v in TISSUE_INTENSITY.items()},
            "lesion": {m: {LABELS[k]: v for k, v in d.items()} for m, d in LESION_INTENSITY.items()},
        },
        "cases": cases,
    }
    if features:
        meta["realism"] = list(features)
        meta["intensities"]["realistic_lesion"] = {
            m: {LABELS[k]: v for k, v in d.items()} for m, d in REALISTIC_LESION_INTENSITY.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "phantom.json", json.dumps(meta, indent=2) + "\n")
    return result
