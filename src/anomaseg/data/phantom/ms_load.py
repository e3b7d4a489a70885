"""Realistic MS lesion loads (``lesion_load="ms"``): many small lesions, where MS puts them.

Every lesioned subject then carries 20-50 MS lesions (label 1; T1 black holes, label 5, with the
realism feature "black_holes") besides whatever other family it has, drawn from their own random
stream. Each lesion is an ovoid (axes ratio 0.6-1 : 1 : 1-1.8, random orientation, ~0.7 mm
soft edge) centred on a white-matter voxel of its region; a confluent lesion is a chain of 2-4 such
blobs that overlap, labelled as one connected lesion. Lesions may also touch by chance and merge.

The numbers, and where they come from:

- Regions, as the McDonald 2017 criteria name them (Thompson et al., Lancet Neurol 2018;17:162):
  periventricular (touching the lateral ventricles: centre within 4 mm of ventricular CSF),
  juxtacortical (touching the cortex: centre within 3 mm of cortical grey matter) and deep
  (subcortical) white matter (at least 8 mm from cortex and from any CSF). Shares 35% / 20% / 45%:
  deep white matter holds the most lesions and the periventricular region the largest volume in
  330 early-MS patients (Pongratz et al., NeuroImage Clin 2023;37:103311: mean 13.0 subcortical
  lesions per patient; mean periventricular volume 2.3 ml). Infratentorial and cortical lesions are not drawn.
- Sizes: each blob's volume is log-normal, median 0.04 ml (periventricular 0.08 ml), sigma of
  ln(volume) 1.0, truncated to 0.01-0.5 ml: long-tailed, most lesions small. In Wang et al.
  (J Neurol Neurosurg Psychiatry 1997;63:452) ~20% of lesions had an equivalent diameter under
  3.5 mm (~0.02 ml) and 80% an in-slice area under 80 mm^2; here P(volume < 0.02 ml) is 14%.
- Counts: 20-50 lesions per subject (uniform), of which 10-25% of the periventricular ones are
  confluent (measured at 2 mm: up to ~0.9 ml): enough that recall per size band is measured on
  dozens of lesions per seed (relapsing-remitting MS typically has tens of T2 lesions; Pongratz et
  al. above). At 2 mm most lesions under ~0.03 ml are labelled as a single voxel (0.008 ml).
- Contrast: the MS lesion intensities of `contrasts.LESION_INTENSITY` (FLAIR ~1.6x white matter,
  T1 hypointense); with "black_holes", 30-60% of the lesions (drawn per subject) are T1 black
  holes (T1 dark, FLAIR only mildly bright). Small lesions are partial-volumed, as on real scans.

The minimum lesion fraction of the default phantom does not apply: MS loads are small.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit, ndtr, ndtri

from anomaseg.data.phantom.anatomy import Anatomy
from anomaseg.data.phantom.fields import random_rotation
from anomaseg.data.phantom.lesions import ellipsoid_radius, lesion_box
from anomaseg.data.phantom.template import Template, load_template, load_ventricles

LESION_LOADS = ("default", "ms")
# region -> (share of the lesions, median blob volume in ml)
REGIONS = {"periventricular": (0.35, 0.08), "juxtacortical": (0.20, 0.04), "deep_white_matter": (0.45, 0.04)}
N_LESIONS = (20, 50)
VOLUME_ML = (0.01, 0.5)  # one blob; confluent lesions are larger
PERIVENTRICULAR_MM = 4.0  # lesion centre within this distance of ventricular CSF (voxel centres)
JUXTACORTICAL_MM = 3.0  # ... within this distance of cortical grey matter
DEEP_MM = 8.0  # deep white matter: at least this far from the cortex and from any CSF
SIGMA_LN = 1.0
_CONFLUENT = (0.10, 0.25)  # share of the periventricular lesions that are confluent
_CONFLUENT_BLOBS = (2, 4)
_BLACK_HOLES = (0.3, 0.6)
_EVERYWHERE = (slice(None),) * 3


def check_lesion_load(lesion_load) -> str:
    load = "default" if lesion_load is None else str(lesion_load).lower()
    if load not in LESION_LOADS:
        raise ValueError(f"unknown lesion load {lesion_load!r}; known: {', '.join(LESION_LOADS)}")
    return load


@functools.lru_cache(maxsize=4)
def region_distances(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template-space distances (mm, capped at 20) to the lateral ventricles' CSF, to cortical grey
    matter (GM > 0.5 less than 20 mm below the brain surface: not the deep grey nuclei) and to any CSF."""
    tpl = load_template(resolution)
    out = [load_ventricles(resolution).distance_mm]
    for target in ((tpl.tissue[1] > 0.5) & (tpl.depth_mm < 20.0), tpl.tissue[0] > 0.5):
        d = np.minimum(ndi.distance_transform_edt(~target, sampling=tpl.voxel_mm), 20.0).astype(np.float32)
        d.setflags(write=False)
        out.append(d)
    return tuple(out)


def _lookup(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    idx = [np.clip(np.rint(coords[a]).astype(np.intp), 0, volume.shape[a] - 1) for a in range(3)]
    return volume[idx[0], idx[1], idx[2]]


def region_candidates(anat: Anatomy, tpl: Template, allowed: np.ndarray) -> dict[str, np.ndarray]:
    """Flat box indices of the `allowed` voxels (white matter) in each region of `REGIONS`."""
    cand = np.flatnonzero(allowed)
    coords = anat.coords.reshape(3, -1)[:, cand]
    dv, dc, dcsf = (_lookup(d, coords) for d in region_distances(int(round(tpl.voxel_mm))))
    pv = dv <= PERIVENTRICULAR_MM
    return {"periventricular": cand[pv],
            "juxtacortical": cand[(dc <= JUXTACORTICAL_MM) & ~pv],
            "deep_white_matter": cand[(dcsf >= DEEP_MM) & (dc >= DEEP_MM)]}


def draw_volume_ml(rng: np.random.Generator, median_ml: float) -> float:
    """Log-normal volume (median `median_ml`, sigma of ln `SIGMA_LN`) truncated to `VOLUME_ML`
    (inverse CDF of the truncated normal in log space: one uniform per draw)."""
    lo, hi = (ndtr((np.log(v) - np.log(median_ml)) / SIGMA_LN) for v in VOLUME_ML)
    z = ndtri(lo + (hi - lo) * rng.random())
    return float(np.clip(np.exp(np.log(median_ml) + SIGMA_LN * z), *VOLUME_ML))


def _add_blob(rng, canvas: np.ndarray, centre: np.ndarray, volume_ml: float, vox: float, conf: np.ndarray) -> float:
    """An ovoid of `volume_ml` at voxel `centre` into `canvas` (max, in place); returns its mean radius (voxels)."""
    ratios = np.array([rng.uniform(0.6, 1.0), 1.0, rng.uniform(1.0, 1.8)])
    radius_mm = (3 * volume_ml * 1000.0 / (4 * np.pi)) ** (1 / 3)  # of the sphere of that volume
    axes_mm = radius_mm * ratios / np.prod(ratios) ** (1 / 3)
    axes_vox = axes_mm / vox
    box, rel = lesion_box(centre, axes_vox.max() * 1.3 + 2, canvas.shape)
    r = ellipsoid_radius(rel, random_rotation(rng), axes_vox)
    m = expit((1 - r) * np.float32(radius_mm / 0.7)) * conf[box]  # edge width ~0.7 mm
    np.maximum(canvas[box], m, out=canvas[box])
    return radius_mm / vox


def add_ms_load(maps, rng: np.random.Generator, anat: Anatomy, tpl: Template, allowed: np.ndarray,
                black_holes: bool, info: dict) -> None:
    """Draw a subject's MS lesion load into `maps` (a `lesion_maps.LesionMaps`); `allowed`: box-local
    bool, where lesion centres may fall (white matter outside other lesions). Lesions go to
    ``info["ms_load"]``: region, drawn volume, blobs, black hole or not, centre (mm, world)."""
    vox = tpl.voxel_mm
    shape = anat.brain.shape
    cands = region_candidates(anat, tpl, allowed)
    regions = [r for r in REGIONS if cands[r].size]
    shares = np.array([REGIONS[r][0] for r in regions])
    n = int(rng.integers(N_LESIONS[0], N_LESIONS[1] + 1))
    region_of = rng.choice(len(regions), size=n, p=shares / shares.sum())
    confluent_p = rng.uniform(*_CONFLUENT)
    black_p = rng.uniform(*_BLACK_HOLES) if black_holes else 0.0
    conf = anat.mask.astype(np.float32) * np.clip(1 - anat.csf, 0, 1)  # lesions take tissue, not CSF
    canvases = {1: np.zeros(shape, np.float32), 5: np.zeros(shape, np.float32)}
    lesions = []
    for k in region_of:
        region = regions[k]
        centre = np.array(np.unravel_index(cands[region][rng.integers(cands[region].size)], shape), float)
        blobs = 1
        if region == "periventricular" and rng.random() < confluent_p:
            blobs = int(rng.integers(_CONFLUENT_BLOBS[0], _CONFLUENT_BLOBS[1] + 1))
        label = 5 if rng.random() < black_p else 1
        volumes = [draw_volume_ml(rng, REGIONS[region][1]) for _ in range(blobs)]
        c = centre
        for j, volume in enumerate(volumes):
            radius = _add_blob(rng, canvases[label], c, volume, vox, conf)
            if j + 1 < blobs:  # the next blob overlaps this one: centres ~0.8 of the radii's sum apart
                step = rng.standard_normal(3)
                next_radius = (3 * volumes[j + 1] * 1000.0 / (4 * np.pi)) ** (1 / 3) / vox
                c = c + step / np.linalg.norm(step) * 0.8 * (radius + next_radius)
        world = tpl.affine @ np.append(centre + anat.origin, 1.0)
        lesions.append({"region": region, "volume_ml": round(sum(volumes), 4), "blobs": blobs,
                        "black_hole": label == 5, "centre_mm": [round(float(v), 2) for v in world[:3]]})
    ms, bh = canvases[1], canvases[5]
    maps.place(1, ms, _EVERYWHERE, ms > 0.5)
    if black_holes:
        maps.place(5, bh, _EVERYWHERE, bh > 0.5)
    info["ms_load"] = {"n_lesions": n, "black_hole_fraction": round(float(black_p), 3), "lesions": lesions}
