"""Which voxels are brain when a case comes without a mask file.

"Brain = nonzero voxels" is right for skull-stripped images whose background was set to zero
(BraTS and most preprocessed datasets). It is silently wrong when the background holds noise or
the head was not skull-stripped: then nearly every voxel is nonzero, the intensity percentiles, the
slice crop and every metric are computed over the whole volume, and results collapse without a word
(measured in benchmarks/README.md, "Cases without a brain mask").

`BRAIN_MASK_RULES` (the `data.brain_mask` setting):
- "auto" (default): the mask file when there is one; else the nonzero voxels when the background
  is empty (`background_is_empty`), else a mask derived from the images (`derive_head_mask`);
- "nonzero": always the nonzero voxels of the images (the mask file, if any, still wins);
- "derived": always the derived mask (the mask file, if any, still wins);
- "file": every case must have a mask file.

A derived mask is the foreground of the images (the head; the brain only for skull-stripped
images), not a skull-stripped brain: for brain-only metrics pass mask files or run
`anomaseg preprocess`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

BRAIN_MASK_RULES = ("auto", "nonzero", "derived", "file")
BORDER_NONZERO_LIMIT = 0.5  # above this fraction of nonzero in-plane border voxels, the background is not empty
VOLUME_NONZERO_LIMIT = 0.95  # ... or above this fraction of nonzero voxels in the whole volume
DERIVED_FRACTION = (0.005, 0.95)  # a derived mask outside this fraction of the volume is not trusted
MIN_CONTRAST = 5.0  # ... nor one whose inside is not this many robust SDs of the outside above it


def nonzero(images: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(images[0].shape, bool)
    for image in images:
        out |= image != 0
    return out


def border_fraction(mask: np.ndarray) -> float:
    """Fraction of nonzero voxels on the volume's in-plane border (the x and y faces of every axial
    slice; RAS+ arrays). The z faces are left out: a thin slab's first and last slices are brain."""
    faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1]]
    return float(sum(int(f.sum()) for f in faces) / sum(f.size for f in faces))


def background_is_empty(foreground: np.ndarray) -> bool:
    """Do the nonzero voxels delimit the brain? Not when most of the border is nonzero (noise or
    head around the brain) or the nonzero voxels fill the volume."""
    return border_fraction(foreground) <= BORDER_NONZERO_LIMIT and foreground.mean() <= VOLUME_NONZERO_LIMIT


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (the split of the histogram with the largest between-class variance).
    Written here, a few lines over numpy, rather than adding scikit-image for this one function."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def derive_head_mask(images: list[np.ndarray]) -> np.ndarray | None:
    """The foreground of a case: Otsu's threshold on the mean of its modalities (each smoothed by a
    Gaussian of 1 voxel against noise and scaled by its 99.5th percentile, so that no modality
    dominates), the largest 3D connected component, and its holes filled in 3D and in every axial
    slice (dark CSF inside the brain, the skull inside the head). On the brain phantom with its
    noisy background it recovers the brain mask with Dice > 0.97 (tests/data/test_brainmask.py).

    None when nothing stands out from the background: the mask covers less than 0.5% or more than
    95% of the volume, or the median inside is not `MIN_CONTRAST` robust standard deviations (MAD)
    of the outside above the outside's median (pure noise splits at ~1.6)."""
    mean = np.zeros(images[0].shape, np.float32)
    for image in images:
        smooth = ndi.gaussian_filter(np.asarray(image, np.float32), 1.0)
        scale = float(np.percentile(smooth, 99.5))
        mean += smooth / (scale if scale > 0 else 1.0)
    mean /= len(images)
    if float(mean.max()) <= float(mean.min()):
        return None
    labels, n = ndi.label(mean > otsu_threshold(mean))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = ndi.binary_fill_holes(labels == int(sizes.argmax()))
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndi.binary_fill_holes(mask[:, :, z])
    lo, hi = DERIVED_FRACTION
    if not lo <= float(mask.mean()) <= hi:
        return None
    inside, outside = np.median(mean[mask]), mean[~mask]
    centre = np.median(outside)
    spread = 1.4826 * float(np.median(np.abs(outside - centre)))
    if inside - centre <= MIN_CONTRAST * max(spread, 1e-6):
        return None
    return mask
