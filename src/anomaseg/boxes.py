"""The box around a mask: where work on a volume (median filter, erosion, component labelling,
threshold sweeps, perturbations) can be cropped to without changing its result."""

from __future__ import annotations

import numpy as np


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of a mask (any dimension), grown by
    `margin` voxels; the whole array when the mask is empty."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    idx = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i))) for i in range(mask.ndim)]
    return tuple(slice(max(0, a[0] - margin), min(n, a[-1] + 1 + margin)) for a, n in zip(idx, mask.shape))
