"""The MNI152 tissue model the phantom deforms (nilearn ships it), and the ventricles' landmarks.

Anatomy: nilearn's native 1 mm GM/WM maps and brain mask (CSF = mask - GM - WM, renormalised);
coarser resolutions are box-averaged from 1 mm on the grid nilearn uses (same shape and affine as
``load_mni152_template(resolution=r)``), so tissue maps carry partial volume at the brain edge.
Both are built once per process and per resolution (cached, read-only arrays).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class Template:
    """The MNI152 tissue model at one resolution, in template voxel space."""

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
def load_template(resolution: int) -> Template:
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
    return Template(
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
class Ventricles:
    """Where the normal variants live, in template space (built only when realism is asked for)."""

    distance_mm: np.ndarray  # (X, Y, Z) float32: distance to the lateral ventricles, capped at 20 mm
    septum_region: np.ndarray  # bool: midline between the frontal horns / bodies of the ventricles
    flow_seeds: np.ndarray  # flat indices of deep CSF where flow artefacts start
    y_front_mm: float  # anterior tip of the frontal horns (template y, mm)
    y_back_mm: float  # posterior end of the occipital horns
    atria: np.ndarray  # (2, 3) template voxel coordinates of the left and right atria


@functools.lru_cache(maxsize=4)
def load_ventricles(resolution: int) -> Ventricles:
    """Lateral ventricles of the MNI152 tissue model and the landmarks of the normal variants.

    The lateral ventricles are the largest connected body of deep CSF (CSF > 0.5, more than 12 mm
    below the brain surface) inside a box around them (|x| <= 36, -60 <= y <= 34, -6 <= z <= 34 mm,
    MNI): at 1 and 2 mm both ventricles form one body (the template has no septum, which is one of
    the variants added). Frontal horns: the front 14 mm of it; occipital horns: the back 14 mm;
    atria: the centroid of its voxels more than 18 mm from the midline in its back 16 mm.
    """
    tpl = load_template(resolution)
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
    return Ventricles(distance_mm=_readonly(dist), septum_region=_readonly(septum),
                       flow_seeds=_readonly(np.flatnonzero(flow)), y_front_mm=y_front, y_back_mm=y_back,
                       atria=_readonly(np.array(atria)))

