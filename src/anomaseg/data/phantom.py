"""The built-in brain MR phantom: MNI152 anatomy (shipped with nilearn) + synthetic lesions.

Every subject is the MNI152 tissue model (grey matter, white matter, CSF probability maps) pushed
through its own random smooth deformation, rendered as T1, T1ce, T2 and FLAIR with per-subject
contrast jitter, a smooth bias field and Rician noise. Lesioned subjects additionally carry MS-like
white-matter lesions and/or a tumour (necrotic core, enhancing rim, oedema) with a label map.

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

__all__ = ["LABELS", "MODALITIES", "TISSUE_INTENSITY", "LESION_INTENSITY", "make_phantom",
           "make_subject", "PhantomSubject"]

LABELS = {1: "ms_lesion", 2: "tumour_necrotic_core", 3: "tumour_oedema", 4: "tumour_enhancing_rim"}
MODALITIES = ("t1", "t1ce", "t2", "flair")

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
# Relative amplitude of the smooth multiplicative lesion texture, per label (FLAIR core: its own).
_TEXTURE = {1: 0.04, 2: 0.12, 3: 0.05, 4: 0.08}
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

_MODALITY_STREAM = {m: 10 + i for i, m in enumerate(MODALITIES)}
_STREAM_ANATOMY, _STREAM_LESION = 1, 2
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


def _coordinates(warp: _Warp, box, tumour: _Tumour | None, vox: float) -> np.ndarray:
    """Template voxel coordinates (3, *box shape) float32 for every subject voxel in `box`."""
    ranges = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
    coords = _spline_field(warp.ctrl, ranges, warp.spacing)  # displacement d(x)
    m = warp.matrix.astype(np.float32)
    base = (warp.centre + warp.shift - warp.matrix @ warp.centre).astype(np.float32)
    for a in range(3):
        coords[a] += (m[a, 0] * ranges[0])[:, None, None]
        coords[a] += (m[a, 1] * ranges[1])[None, :, None]
        coords[a] += (m[a, 2] * ranges[2])[None, None, :] + base[a]
    if tumour is not None and tumour.mass_effect > 0:
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


def _tumour_memberships(rng, tumour: _Tumour, vox: float, wm, csf, mask):
    """Soft memberships (core, tumour = core + rim, oedema >= tumour) as box-local arrays."""
    axes_vox = tumour.axes_mm / vox
    half = tumour.oedema_extent * axes_vox.max() * (1 + 2.5 * tumour.irregularity) + 3
    box, rel = _lesion_box(tumour.centre, half, mask.shape)
    r = _ellipsoid_radius(rel, tumour.rotation, axes_vox)
    # Irregular outline: the radius is modulated by smooth noise (B-spline, ~R/1.5 spacing).
    spacing = max(tumour.radius_mm / 1.5 / vox, 2.0)
    shape = tuple(len(x) for x in rel)
    ctrl = rng.standard_normal((1,) + tuple(_n_ctrl(n, spacing) for n in shape))
    noise = _spline_field(ctrl, [np.arange(n, dtype=np.float32) for n in shape], spacing)[0]
    noise /= max(float(noise.std()), 1e-6)
    r /= 1 + tumour.irregularity * np.clip(noise, -2.5, 2.5)
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


def make_subject(index: int, lesioned: bool, seed: int = 0, resolution: int = 2,
                 modalities: Iterable[str] = MODALITIES) -> PhantomSubject:
    """Synthesise one subject in memory; `make_phantom` writes exactly this for case `index`."""
    modalities = _check_modalities(modalities)
    tpl = _template(int(resolution))
    vox = tpl.voxel_mm
    shape = tpl.brain.shape
    rng_anat = _rng(seed, index, lesioned, _STREAM_ANATOMY)
    rng_les = _rng(seed, index, lesioned, _STREAM_LESION)

    families: list[str] = []
    tumour = None
    if lesioned:
        # Alternate the primary family so any two consecutive lesioned subjects cover both;
        # a quarter of subjects also get the other one.
        primary = ("ms", "tumour")[(int(seed) + int(index)) % 2]
        families = [primary]
        if rng_les.random() < 0.25:
            families.append("tumour" if primary == "ms" else "ms")
        if "tumour" in families:
            tumour = _draw_tumour(rng_les, tpl)

    warp = _draw_warp(rng_anat, tpl)
    margin = warp.bound
    if tumour is not None:
        tumour.centre = _invert_warp(warp, tumour.centre_tpl)
        margin += tumour.mass_effect * 1.2 * tumour.radius_mm / vox
    box = _output_box(tpl, warp, margin)
    coords = _coordinates(warp, box, tumour, vox)

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

        need_ms = "ms" in families
        deficit = int(np.ceil(_MIN_LESION_FRACTION * n_brain)) - n_tumour
        if need_ms or deficit > 0:
            if not need_ms:
                families.append("ms")  # tumour clipped by the brain edge: top up with MS lesions
            ms = np.zeros(brain.shape, np.float32)
            # candidates: white matter, away from the surface, outside the tumour; weighted towards
            # the ventricles (template-space prior looked up through the warp)
            ok = (wm > 0.5) & mask
            if m_oed_full is not None:
                ok &= m_oed_full < 0.05
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
            conf = maskf * np.clip(1 - csf, 0, 1)
            n_ms = _add_ms_lesions(rng_les, ms, cand, weights, vox, conf, target, n_min)
            info["n_ms_lesions"] = n_ms
            ms_label = (ms > 0.5) & (seg == 0)
            seg[ms_label] = 1
            w_ms = ms * w_tissue
            w_tissue -= w_ms
            lesion_terms.append((1, w_ms, tuple(slice(None) for _ in range(3))))

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
    images: dict[str, np.ndarray] = {}
    ranges = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
    jitters: dict[str, dict] = {}
    for mod in modalities:
        rng = _rng(seed, index, lesioned, _MODALITY_STREAM[mod])
        tissue_i = np.array(TISSUE_INTENSITY[mod]) * rng.uniform(1 - _TISSUE_JITTER, 1 + _TISSUE_JITTER, 3)
        lesion_i = {k: v * rng.uniform(1 - _LESION_JITTER, 1 + _LESION_JITTER)
                    for k, v in sorted(LESION_INTENSITY[mod].items())}
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
    return PhantomSubject(images=images, mask=full_mask, seg=full_seg, affine=np.array(tpl.affine),
                          info=info, tissue_box=np.stack([csf, gm, wm]), box=box)


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
                 modalities=MODALITIES, progress: bool = False) -> dict:
    """Write a phantom dataset; return {"train": [case dirs], "test": [case dirs]} (pathlib.Path).

    `n_healthy` healthy subjects go to ``out_dir/train`` (no seg), `n_lesioned` lesioned subjects to
    ``out_dir/test`` (with ``<case>_seg.nii.gz``, labels per `LABELS`). `resolution` is the
    MNI152 voxel size in mm (2: 99x117x95, 1: 197x233x189). The same seed gives the same arrays;
    an existing phantom in `out_dir` is overwritten and phantom cases it no longer contains removed.
    """
    n_healthy, n_lesioned, seed, resolution = int(n_healthy), int(n_lesioned), int(seed), int(resolution)
    if n_healthy < 0 or n_lesioned < 0:
        raise ValueError(f"subject counts must be >= 0, got n_healthy={n_healthy}, n_lesioned={n_lesioned}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of mm, got {resolution}")
    modalities = _check_modalities(modalities)
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
            subject = make_subject(index, lesioned, seed=seed, resolution=resolution, modalities=modalities)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "phantom.json", json.dumps(meta, indent=2) + "\n")
    return result
