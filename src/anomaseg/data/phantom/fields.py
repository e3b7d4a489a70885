"""Smooth random fields of the phantom: the subject's deformation, the bias field and Rician noise.

Smooth random fields (displacement, bias, lesion texture) are tensor-product cubic B-splines of
random control points: three small matrix products instead of a 3-D Gaussian filter. One
resampling per tissue map: the random affine, the smooth non-linear displacement (cubic B-spline
free-form deformation) and the tumours' mass effect are composed into a single coordinate field
(`template_coordinates`) for ``scipy.ndimage.map_coordinates``. Only a box that can contain the
deformed brain (`output_box`) is resampled; the rest is background (noise only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import ndimage as ndi

from anomaseg.data.phantom.template import Template

_DEFORM_MAX_MM = (2.5, 4.5)  # max non-linear displacement
_DEFORM_SPACING_MM = 24.0
_ROT_MAX_DEG = 5.0
_SCALE_MAX = 0.05
_TRANSLATE_MAX_MM = 4.0
_BIAS_MAX = (0.10, 0.15)  # max |log bias| over the resampled box: the field spans ~ +/-10-15%
_BIAS_SPACING_MM = 60.0


def _bspline_kernel(u: np.ndarray) -> np.ndarray:
    a = np.abs(u)
    return np.where(a < 1, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2, (2 - a) ** 3 / 6.0, 0.0))


def n_control_points(n: int | float, spacing: float) -> int:
    """Control points needed to cover positions 0..n-1 (control k sits at (k - 1) * spacing)."""
    return int(np.floor(max(n - 1, 0) / spacing)) + 4


def _bspline_weights(pos: np.ndarray, n_ctrl: int, spacing: float) -> np.ndarray:
    """(len(pos), n_ctrl) cubic B-spline weights; rows sum to 1 for 0 <= pos <= (n_ctrl-4)*spacing."""
    u = np.asarray(pos, dtype=np.float64)[:, None] / spacing + 1.0 - np.arange(n_ctrl)[None, :]
    return _bspline_kernel(u).astype(np.float32)


def spline_field(ctrl: np.ndarray, ranges: Iterable[np.ndarray], spacing: float) -> np.ndarray:
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


def random_rotation(rng: np.random.Generator) -> np.ndarray:
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



@dataclass
class Warp:
    """Output voxel x samples the template at c0 + M (x - c0) + t + d(x) + mass(x)."""

    matrix: np.ndarray
    shift: np.ndarray
    centre: np.ndarray
    ctrl: np.ndarray  # (3, nx, ny, nz) displacement control points, voxel units
    spacing: float  # control spacing, voxels
    bound: float  # |d(x)| <= bound (voxels)


def draw_warp(rng: np.random.Generator, tpl: Template) -> Warp:
    vox = tpl.voxel_mm
    rot = _small_rotation(rng, _ROT_MAX_DEG)
    scale = rng.uniform(1 - _SCALE_MAX, 1 + _SCALE_MAX, 3)
    shift = rng.uniform(-_TRANSLATE_MAX_MM, _TRANSLATE_MAX_MM, 3) / vox
    spacing = _DEFORM_SPACING_MM / vox
    shape = tpl.brain.shape
    ctrl = rng.standard_normal((3,) + tuple(n_control_points(n, spacing) for n in shape))
    ctrl = ndi.gaussian_filter(ctrl, sigma=(0, 1, 1, 1), mode="nearest")
    # scale to the wanted maximum displacement, measured on a coarse grid over the brain's box
    coarse = [np.arange(lo, hi + 1, 2, dtype=np.float32) for lo, hi in zip(*tpl.bbox)]
    peak = np.sqrt((spline_field(ctrl, coarse, spacing) ** 2).sum(0)).max()
    ctrl *= rng.uniform(*_DEFORM_MAX_MM) / vox / max(float(peak), 1e-6)
    ctrl = ctrl.astype(np.float32)
    bound = float(np.sqrt((ctrl**2).sum(0)).max())  # B-splines are convex weights: |d| <= bound
    return Warp(rot @ np.diag(scale), shift, tpl.centre.copy(), ctrl, spacing, bound)


def invert_warp(warp: Warp, target: np.ndarray) -> np.ndarray:
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


def output_box(tpl: Template, warp: Warp, margin: float) -> tuple[slice, slice, slice]:
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


def template_coordinates(warp: Warp, box, masses: list, vox: float) -> np.ndarray:
    """Template voxel coordinates (3, *box shape) float32 for every subject voxel in `box`.

    `masses`: lesions.Blob-like objects (subject-voxel `centre`, `radius_mm`, `mass_effect`).
    """
    ranges = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
    coords = spline_field(warp.ctrl, ranges, warp.spacing)  # displacement d(x)
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


def bias_field(rng: np.random.Generator, ranges: list[np.ndarray], shape, vox: float) -> np.ndarray:
    """Smooth multiplicative bias field exp(b) on the box spanned by `ranges`; b a coarse B-spline
    (60 mm control spacing over the whole volume `shape`) scaled to a max |b| of 0.10-0.15."""
    bspacing = _BIAS_SPACING_MM / vox
    bctrl = rng.standard_normal((1,) + tuple(n_control_points(n, bspacing) for n in shape))
    log_bias = spline_field(bctrl, ranges, bspacing)[0]
    log_bias *= np.float32(rng.uniform(*_BIAS_MAX) / max(float(np.abs(log_bias).max()), 1e-6))
    return np.exp(log_bias, out=log_bias)


def rician_noise(rng: np.random.Generator, signal: np.ndarray, sigma: float, shape, box) -> np.ndarray:
    """|signal + complex Gaussian| over the volume `shape` (float32), `signal` given inside `box`.

    Where the signal is 0 (background) that is a Rayleigh variable, drawn from one uniform instead
    of two normals (same distribution).
    """
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
    return img
