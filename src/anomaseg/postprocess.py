"""Baur et al.'s post-processing of anomaly maps, and the healthy-calibrated threshold.

On each RAS+ volume: (1) a 3D median filter of the anomaly map (`median_size`, 5 in the paper);
(2) the map is set to 0 outside the brain mask eroded by `erosion` voxels (reconstructions are
poor at the brain's border); (3) thresholding; (4) connected components (26-connectivity) of fewer
than `min_component_size` voxels are dropped (the reference code drops components <= 7 voxels).

Threshold rule (fitted on held-out *healthy* cases only, never on test data): the threshold is the
(1 - `healthy_fpr`) quantile of the post-processed map over the brain voxels of the healthy
calibration cases, i.e. the value that flags a fraction `healthy_fpr` of healthy brain voxels (a
voxel-level false-positive rate) before small components are removed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
from scipy import ndimage


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of a mask (any dimension), grown by
    `margin` voxels; the whole array when the mask is empty."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    idx = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i))) for i in range(mask.ndim)]
    return tuple(slice(max(0, a[0] - margin), min(n, a[-1] + 1 + margin)) for a, n in zip(idx, mask.shape))


def median_footprint(shape: tuple[int, ...], size: int) -> tuple[int, int, int]:
    """The median window: `size` along every axis; in-plane only for a volume of depth 1 (a 2D image)."""
    return (size, size, 1) if shape[2] == 1 else (size, size, size)


def median_filter_3d(volume: np.ndarray, size: int, threads: int = 2) -> np.ndarray:
    """scipy's median filter run on slabs in parallel (it releases the GIL); equal to one call.
    A volume of depth 1 (a 2D image) gets a 2D footprint. The reference for `masked_median`, which
    `PostProcessor` uses (the same values where the brain is, several times faster)."""
    if size <= 1:
        return volume
    z = volume.shape[2]
    if z == 1:
        return ndimage.median_filter(volume, size=(size, size, 1), mode="nearest")
    if threads <= 1 or z < 4 * size:
        return ndimage.median_filter(volume, size=size, mode="nearest")
    half = size // 2
    bounds = np.linspace(0, z, threads + 1).round().astype(int)

    def run(i):
        lo, hi = bounds[i], bounds[i + 1]
        a, b = max(0, lo - half), min(z, hi + half)
        out = ndimage.median_filter(volume[:, :, a:b], size=size, mode="nearest")
        return out[:, :, lo - a:out.shape[2] - (b - hi)]

    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(run, range(threads))), axis=2)


class PostProcessor:
    """scikit-learn style: `__init__` stores settings, `fit` learns `threshold_` from healthy maps."""

    def __init__(self, median_size: int = 5, erosion: int = 3, min_component_size: int = 8,
                 healthy_fpr: float = 0.005):
        if not 0 < healthy_fpr < 1:
            raise ValueError(f"healthy_fpr must be in (0, 1), got {healthy_fpr}")
        self.median_size = median_size
        self.erosion = erosion
        self.min_component_size = min_component_size
        self.healthy_fpr = healthy_fpr

    def eroded(self, brain: np.ndarray) -> np.ndarray:
        """The mask eroded by `erosion` voxels; in-plane only for a 2D image (depth 1), where a 3D
        erosion would erase the single slice."""
        if self.erosion <= 0:
            return brain
        structure = ndimage.generate_binary_structure(3, 1)
        if brain.shape[2] == 1:
            structure[:, :, [0, 2]] = False
        return ndimage.binary_erosion(brain, structure, iterations=self.erosion, border_value=0)

    def smooth(self, anomaly_map: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """Median filter, then 0 outside the eroded brain. Work is limited to the brain's box (the
        median runs on the box with scipy's "nearest" edges, as it always has), and the median is
        computed only where the eroded brain is (`masked_median`)."""
        from anomaseg.fastmedian import masked_median  # numba: imported when first needed

        out = np.zeros(anomaly_map.shape, np.float32)
        box = bounding_box(brain, max(self.median_size, 1))  # a margin >= 1: eroding the box = eroding the volume
        sub = anomaly_map[box].astype(np.float32)
        keep = self.eroded(brain[box])
        if self.median_size > 1:
            out[box] = masked_median(sub, median_footprint(sub.shape, self.median_size), keep)
        else:
            out[box] = np.where(keep, sub, 0.0)
        return out

    def fit(self, healthy: Iterable[tuple[np.ndarray, np.ndarray]]) -> "PostProcessor":
        """`healthy`: (smoothed map, brain mask) pairs of healthy cases."""
        values = [m[b] for m, b in healthy]
        if not values or sum(v.size for v in values) == 0:
            raise ValueError("no healthy brain voxels to calibrate the threshold on")
        self.threshold_ = float(np.quantile(np.concatenate(values), 1.0 - self.healthy_fpr))
        self.n_calibration_voxels_ = int(sum(v.size for v in values))
        return self

    def segment(self, smoothed: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Binary segmentation (uint8) of a smoothed map: threshold, then drop small components."""
        t = self.threshold_ if threshold is None else threshold
        seg = smoothed > t
        return remove_small_components(seg, self.min_component_size).astype(np.uint8)


def remove_small_components(seg: np.ndarray, min_size: int) -> np.ndarray:
    """`seg` without its 26-connected components of fewer than `min_size` voxels. Labelling runs on
    the bounding box of the foreground only (components never leave it)."""
    if min_size <= 1 or not seg.any():
        return seg
    box = bounding_box(seg, 0)
    labels, n = ndimage.label(seg[box], structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    out = np.zeros(seg.shape, bool)
    out[box] = keep[labels]
    return out
