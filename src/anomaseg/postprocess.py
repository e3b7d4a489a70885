"""Baur et al.'s post-processing of anomaly maps, and the healthy-calibrated threshold.

On each RAS+ volume: (1) a 3D median filter of the anomaly map; (2) the map is set to 0 outside the
brain mask eroded by `erosion` voxels (reconstructions are poor at the brain's border); (3)
thresholding; (4) connected components (26-connectivity) that are too small are dropped.

Sizes (`size_units`):
- "voxels" (the default, except under the fp_lesions rule): a median window of
  `median_size` voxels per axis (5 in the paper) and components of fewer than
  `min_component_size` voxels dropped (the reference code drops components <= 7 voxels);
- "mm" (the default under the fp_lesions rule): the same physical sizes on any voxel grid, from
  the case's voxel spacing: per axis the largest odd number of voxels whose width is <=
  `median_mm` (1 = no filtering along that axis; 3 mm: 3 voxels at 1 mm, none at 2 mm), and
  components smaller than `min_lesion_ml` dropped (the fewest voxels with at least that volume).
The erosion stays in voxels.

Threshold rules (`calibration`; fitted on held-out *healthy* cases only, never on test data):
- "voxel_fpr": the (1 - `healthy_fpr`) quantile of the post-processed map over the brain
  voxels of the healthy calibration cases, i.e. the value that flags a fraction `healthy_fpr` of
  healthy brain voxels (a voxel-level false-positive rate) before small components are removed.
- "fp_lesions": the threshold together with the minimum lesion volume, so that the mean number of
  false-positive lesions (every kept component of a healthy case is one) per healthy case is at
  most `healthy_fp_lesions`. For each candidate volume in `min_lesion_ml_candidates`, the lowest
  threshold at or above the voxel_fpr threshold such that the mean count is within the target
  there and at every higher threshold (`lesion_sweep.lowest_threshold_within`); the pair with the
  lowest threshold wins, ties going to the smaller volume (the smallest lesions kept at the
  voxel-level sensitivity of the voxel_fpr rule). The voxel_fpr threshold is a floor: the count
  alone would allow thresholds so low that the whole brain is one component (one "lesion").
  Fitted: `threshold_`, `min_lesion_ml_`, and the healthy cases' mean count there
  (`healthy_fp_lesions_`).
- "hysteresis" (the default of a run's config, `config.ScoreConfig`; this class defaults to
  voxel_fpr): two thresholds. The voxel_fpr threshold (`threshold_`) draws each component's
  extent, and a component is kept only where its peak exceeds `peak_threshold_`, the lowest value
  at or above `threshold_` that at most `healthy_fp_lesions` components per healthy case (mean over
  the calibration cases, after small components are dropped) exceed. Unlike fp_lesions it removes
  the weak false components without a minimum volume, so a small lesion that is bright in the map
  survives, and the voxels of the kept components are those of the voxel_fpr rule (its Dice).
  Fitted: `threshold_`, `peak_threshold_`, and the healthy cases' mean count
  (`healthy_fp_lesions_`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
from scipy import ndimage

from anomaseg.boxes import bounding_box


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


CALIBRATION_RULES = ("voxel_fpr", "fp_lesions", "hysteresis")
SIZE_UNITS = ("voxels", "mm")
MIN_LESION_ML_CANDIDATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def odd_window(width_mm: float, spacing_mm: float) -> int:
    """The largest odd number of voxels of `spacing_mm` whose width is <= `width_mm` (at least 1)."""
    n = int(math.floor(width_mm / spacing_mm + 1e-6))
    return max(1, n if n % 2 else n - 1)


class PostProcessor:
    """scikit-learn style: `__init__` stores settings, `fit` learns `threshold_` (and, under the
    fp_lesions rule, `min_lesion_ml_`) from healthy maps. Module docstring: sizes and rules."""

    def __init__(self, median_size: int = 5, erosion: int = 3, min_component_size: int = 8,
                 healthy_fpr: float = 0.005, calibration: str = "voxel_fpr", size_units: str | None = None,
                 median_mm: float = 3.0, min_lesion_ml: float = 0.01, healthy_fp_lesions: float = 1.0,
                 min_lesion_ml_candidates=MIN_LESION_ML_CANDIDATES):
        if not 0 < healthy_fpr < 1:
            raise ValueError(f"healthy_fpr must be in (0, 1), got {healthy_fpr}")
        if calibration not in CALIBRATION_RULES:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_RULES)}, got {calibration!r}")
        size_units = size_units or ("mm" if calibration == "fp_lesions" else "voxels")
        if size_units not in SIZE_UNITS:
            raise ValueError(f"size_units must be one of {', '.join(SIZE_UNITS)}, got {size_units!r}")
        if calibration == "fp_lesions" and size_units != "mm":
            raise ValueError("calibration fp_lesions fits the minimum lesion volume in ml: size_units must be mm")
        candidates = sorted(float(c) for c in min_lesion_ml_candidates)
        if not candidates or candidates[0] < 0:
            raise ValueError(f"min_lesion_ml_candidates must be volumes >= 0 (ml), got {min_lesion_ml_candidates}")
        if median_mm < 0 or min_lesion_ml < 0 or healthy_fp_lesions < 0:
            raise ValueError("median_mm, min_lesion_ml and healthy_fp_lesions must be >= 0")
        self.median_size = median_size
        self.erosion = erosion
        self.min_component_size = min_component_size
        self.healthy_fpr = healthy_fpr
        self.calibration = calibration
        self.size_units = size_units
        self.median_mm = float(median_mm)
        self.min_lesion_ml = float(min_lesion_ml)
        self.healthy_fp_lesions = float(healthy_fp_lesions)
        self.min_lesion_ml_candidates = candidates  # a list: equal to its JSON round trip

    def median_window(self, shape: tuple[int, ...], spacing=None) -> tuple[int, int, int]:
        """The median window (voxels per axis) for a volume of this shape and voxel spacing (mm)."""
        if self.size_units == "voxels":
            return median_footprint(shape, self.median_size)
        spacing = _spacing(spacing)
        window = tuple(odd_window(self.median_mm, s) for s in spacing)
        return window[:2] + (1,) if shape[2] == 1 else window

    def min_voxels(self, spacing=None) -> int:
        """Components with fewer voxels (of this spacing) are dropped."""
        if self.size_units == "voxels":
            return self.min_component_size
        if self.calibration == "fp_lesions" and hasattr(self, "threshold_") and not hasattr(self, "min_lesion_ml_"):
            raise ValueError("this fp_lesions threshold came without its fitted minimum lesion volume "
                             "(min_lesion_ml_); calibrate again")
        from anomaseg.lesion_sweep import min_voxels_for

        return min_voxels_for(getattr(self, "min_lesion_ml_", self.min_lesion_ml), _spacing(spacing))

    def fitted_state(self) -> dict:
        """What `fit` learned beyond `threshold_` (RUN/calibration.json keeps it)."""
        return {k: getattr(self, k) for k in _FITTED_STATE if hasattr(self, k)}

    def load_fitted_state(self, state: dict) -> "PostProcessor":
        for k, v in (state or {}).items():
            if k not in _FITTED_STATE:
                raise ValueError(f"unknown fitted post-processing state {k!r}")
            setattr(self, k, float(v))
        needed = {"fp_lesions": "min_lesion_ml_", "hysteresis": "peak_threshold_"}.get(self.calibration)
        if needed and needed not in (state or {}):
            raise ValueError(f"a {self.calibration} calibration without its fitted {needed}")
        return self

    def eroded(self, brain: np.ndarray) -> np.ndarray:
        """The mask eroded by `erosion` voxels; in-plane only for a 2D image (depth 1), where a 3D
        erosion would erase the single slice."""
        if self.erosion <= 0:
            return brain
        structure = ndimage.generate_binary_structure(3, 1)
        if brain.shape[2] == 1:
            structure[:, :, [0, 2]] = False
        return ndimage.binary_erosion(brain, structure, iterations=self.erosion, border_value=0)

    def smooth(self, anomaly_map: np.ndarray, brain: np.ndarray, spacing=None) -> np.ndarray:
        """Median filter, then 0 outside the eroded brain. Work is limited to the brain's box (the
        median runs on the box with scipy's "nearest" edges, as it always has), and the median is
        computed only where the eroded brain is (`masked_median`). `spacing`: the voxel size in mm
        per axis (needed with size_units mm)."""
        from anomaseg.fastmedian import masked_median  # numba: imported when first needed

        window = self.median_window(anomaly_map.shape, spacing)
        out = np.zeros(anomaly_map.shape, np.float32)
        box = bounding_box(brain, max(max(window), 1))  # a margin >= 1: eroding the box = eroding the volume
        sub = anomaly_map[box].astype(np.float32)
        keep = self.eroded(brain[box])
        if max(window) > 1:
            out[box] = masked_median(sub, window, keep)
        else:
            out[box] = np.where(keep, sub, 0.0)
        return out

    def fit(self, healthy: Iterable[tuple]) -> "PostProcessor":
        """`healthy`: (smoothed map, brain mask[, voxel spacing in mm]) of healthy cases."""
        healthy = list(healthy)
        values = [m[b] for m, b, *_ in healthy]
        if not values or sum(v.size for v in values) == 0:
            raise ValueError("no healthy brain voxels to calibrate the threshold on")
        self.threshold_ = float(np.quantile(np.concatenate(values), 1.0 - self.healthy_fpr))
        self.n_calibration_voxels_ = int(sum(v.size for v in values))
        if self.calibration == "fp_lesions":
            self._fit_fp_lesions(healthy)
        elif self.calibration == "hysteresis":
            self._fit_peak_threshold(healthy)
        return self

    def _fit_peak_threshold(self, healthy: list[tuple]) -> None:
        """The hysteresis rule (module docstring): the peaks of the components the voxel threshold
        draws on the healthy cases (small ones dropped); at most floor(target x cases) may exceed it."""
        peaks = np.sort(np.concatenate([
            component_peaks(m > self.threshold_, m, self.min_voxels(rest[0] if rest else None))
            for m, b, *rest in healthy]))[::-1]
        allowed = int(math.floor(self.healthy_fp_lesions * len(healthy) + 1e-9))
        # components whose peak is > the (allowed + 1)-th largest: at most `allowed`
        self.peak_threshold_ = max(self.threshold_, float(peaks[allowed])) if allowed < peaks.size else self.threshold_
        self.healthy_fp_lesions_ = float((peaks > self.peak_threshold_).sum() / len(healthy))

    def _fit_fp_lesions(self, healthy: list[tuple]) -> None:
        """The fp_lesions rule (module docstring), the voxel_fpr threshold (`threshold_`) as floor."""
        from anomaseg.lesion_sweep import component_sweep, lowest_threshold_within, min_voxels_for

        sweeps = []
        for m, b, *rest in healthy:
            spacing = _spacing(rest[0] if rest else None)
            sizes = [min_voxels_for(ml, spacing) for ml in self.min_lesion_ml_candidates]
            sweeps.append(component_sweep(m, b, None, sizes))
        fits = []
        for k, ml in enumerate(self.min_lesion_ml_candidates):
            t, mean = lowest_threshold_within([s.event_values for s in sweeps],
                                              [s.event_steps[:, k] for s in sweeps], self.healthy_fp_lesions,
                                              self.threshold_)
            fits.append((t, ml, mean))
        self.threshold_, self.min_lesion_ml_, self.healthy_fp_lesions_ = min(fits)

    def segment(self, smoothed: np.ndarray, threshold: float | None = None, spacing=None) -> np.ndarray:
        """Binary segmentation (uint8) of a smoothed map: threshold, then drop small components (and,
        under the hysteresis rule, those whose peak does not exceed the peak threshold, or `threshold`
        where that is higher)."""
        t = self.threshold_ if threshold is None else threshold
        if self.calibration != "hysteresis":
            return remove_small_components(smoothed > t, self.min_voxels(spacing)).astype(np.uint8)
        if not hasattr(self, "peak_threshold_"):
            raise ValueError("this hysteresis threshold came without its fitted peak_threshold_; calibrate again")
        return remove_small_components(smoothed > t, self.min_voxels(spacing), smoothed,
                                       max(t, self.peak_threshold_)).astype(np.uint8)


_FITTED_STATE = ("min_lesion_ml_", "healthy_fp_lesions_", "peak_threshold_")


def _spacing(spacing) -> tuple[float, float, float]:
    if spacing is None:
        raise ValueError("physical post-processing sizes (size_units mm) need the case's voxel spacing")
    return tuple(float(s) for s in spacing)


def _components(seg: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray, int]:
    """(the foreground's bounding box, its 26-connected component labels there, their count):
    labelling runs on the box only (components never leave it)."""
    box = bounding_box(seg, 0)
    labels, n = ndimage.label(seg[box], structure=np.ones((3, 3, 3), bool))
    return box, labels, n


def remove_small_components(seg: np.ndarray, min_size: int, values: np.ndarray | None = None,
                            peak: float | None = None) -> np.ndarray:
    """`seg` without its 26-connected components of fewer than `min_size` voxels and, with `values`
    and `peak`, without those in which no value of `values` exceeds `peak` (one labelling for both)."""
    if (min_size <= 1 and values is None) or not seg.any():
        return seg
    box, labels, n = _components(seg)
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_size
    if values is not None:
        keep[1:] &= np.asarray(ndimage.maximum(values[box], labels, index=np.arange(1, n + 1))) > peak
    keep[0] = False
    out = np.zeros(seg.shape, bool)
    out[box] = keep[labels]
    return out


def component_peaks(seg: np.ndarray, values: np.ndarray, min_size: int = 1) -> np.ndarray:
    """The largest value of `values` in each 26-connected component of `seg` with at least
    `min_size` voxels (float32, in label order)."""
    if not seg.any():
        return np.zeros(0, np.float32)
    box, labels, n = _components(seg)
    index = np.arange(1, n + 1)
    peaks = np.asarray(ndimage.maximum(values[box], labels, index=index), np.float32).reshape(n)
    return peaks[np.bincount(labels.ravel(), minlength=n + 1)[1:] >= min_size]
