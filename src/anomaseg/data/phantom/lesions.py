"""Lesion shapes of the phantom: tumours (necrotic core, enhancing rim, oedema) and MS-like ellipsoids.

Shapes are soft memberships (logistic in a normalised ellipsoidal radius, edges ~0.7-2 mm wide) on
small boxes around each lesion, in subject voxel coordinates; where they are labelled and how they
take the place of the tissue is `lesion_maps`' job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from anomaseg.data.phantom.fields import n_control_points, random_rotation, spline_field
from anomaseg.data.phantom.template import Template


@dataclass
class Blob:
    """An ellipsoidal lesion (tumour, mass, infarct, choroid plexus glomus) with an irregular outline."""

    centre_tpl: np.ndarray  # template voxel coordinates
    radius_mm: float
    axes_mm: np.ndarray
    rotation: np.ndarray
    core_fraction: float
    oedema_extent: float
    irregularity: float
    mass_effect: float
    centre: np.ndarray | None = None  # subject voxel coordinates (after inverting the warp)


def draw_tumour(rng: np.random.Generator, tpl: Template) -> Blob:
    radius = rng.uniform(10.0, 25.0)
    min_depth = float(np.clip(0.8 * radius, 12.0, 22.0))
    cand = np.flatnonzero((tpl.tissue[2] > 0.5) & (tpl.depth_mm >= min_depth))
    if cand.size == 0:  # cannot happen with MNI152; keep a sane fallback anyway
        cand = np.array([np.argmax(tpl.depth_mm)])
    centre = np.array(np.unravel_index(cand[rng.integers(cand.size)], tpl.brain.shape), float)
    centre += rng.uniform(-0.5, 0.5, 3)
    return Blob(
        centre_tpl=centre,
        radius_mm=radius,
        axes_mm=radius * rng.uniform(0.8, 1.2, 3),
        rotation=random_rotation(rng),
        core_fraction=rng.uniform(0.35, 0.7),
        oedema_extent=rng.uniform(1.6, 2.4),
        irregularity=rng.uniform(0.08, 0.18),
        mass_effect=rng.uniform(0.1, 0.3),
    )



def lesion_box(centre: np.ndarray, half: float, shape) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    rel = [np.arange(a, b, dtype=np.float32) - np.float32(c) for a, b, c in zip(lo, hi, centre)]
    return box, rel


def ellipsoid_radius(rel, rotation: np.ndarray, axes_vox: np.ndarray) -> np.ndarray:
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


def irregular_radius(rng, blob: Blob, vox: float, extent: float, shape):
    """(box, r): the normalised radius of `blob`'s ellipsoid (1 on its surface) on a box reaching
    `extent` times its largest axis, its outline modulated by smooth noise (B-spline, ~R/1.5 spacing)."""
    axes_vox = blob.axes_mm / vox
    half = extent * axes_vox.max() * (1 + 2.5 * blob.irregularity) + 3
    box, rel = lesion_box(blob.centre, half, shape)
    r = ellipsoid_radius(rel, blob.rotation, axes_vox)
    spacing = max(blob.radius_mm / 1.5 / vox, 2.0)
    shape = tuple(len(x) for x in rel)
    ctrl = rng.standard_normal((1,) + tuple(n_control_points(n, spacing) for n in shape))
    noise = spline_field(ctrl, [np.arange(n, dtype=np.float32) for n in shape], spacing)[0]
    noise /= max(float(noise.std()), 1e-6)
    r /= 1 + blob.irregularity * np.clip(noise, -2.5, 2.5)
    return box, r


def tumour_memberships(rng, tumour: Blob, vox: float, wm, csf, mask):
    """Soft memberships (core, tumour = core + rim, oedema >= tumour) as box-local arrays."""
    box, r = irregular_radius(rng, tumour, vox, tumour.oedema_extent, mask.shape)
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


def add_ms_lesions(rng, ms, cand_idx, cand_w, vox, conf, target_voxels: int, n_min: int,
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
        rot = random_rotation(rng)
        axes_vox = axes_mm / vox
        box, rel = lesion_box(c, axes_vox.max() * 1.3 + 2, ms.shape)
        r = ellipsoid_radius(rel, rot, axes_vox)
        m = expit((1 - r) * np.float32(a / 0.7)) * conf[box]  # edge width ~0.7 mm
        before = int((ms[box] > 0.5).sum())
        np.maximum(ms[box], m, out=ms[box])
        labelled += int((ms[box] > 0.5).sum()) - before
        n += 1
    return n
