"""Lesions over the whole threshold sweep: FROC curves on test cases, false-positive lesion counts on
healthy cases, both streamed case by case in fixed memory.

For one case, its post-processed anomaly map `s`, brain mask and (optional) ground truth, the
segmentation at threshold t is the set of components (26-connectivity, as `postprocess`) of
{s > t} inside the brain with at least `min_voxels` voxels, i.e. what `PostProcessor.segment`
gives (the map is 0 outside the eroded brain, so for t >= 0 the two are the same voxels). As in
`lesion_metrics`, a true lesion (a component of truth & brain) is *detected* at t when a kept
predicted component overlaps it, and a kept predicted component that overlaps no true lesion is a
*false-positive lesion*. `component_sweep` computes, in one pass over the brain voxels in
descending order of `s` (union-find: a component tree of the map), for every true lesion the
value d with "detected at t <=> t < d", and the exact steps of the false-positive count as t falls.

Why by hand: neither scipy nor MONAI computes connected components over all thresholds at once
(scikit-image's max_tree gives the tree but not per-node sizes or label overlaps, and is not a
dependency); labelling at each of thousands of thresholds would cost thousands of passes. The
kernel is compiled with numba (already used by `fastmedian`), one pass of ~26 neighbour checks per
brain voxel.

FROC (`FrocTally`): sensitivity = detected true lesions / true lesions, pooled over the cases;
false positives per case = mean over the cases of each case's false-positive count. A count can
fall as t falls (false-positive components merge with each other or grow into a lesion, and at
the lowest thresholds the whole brain is one component that "detects" every lesion); so per case
the count used is its running maximum from the highest threshold down: an operating point is
charged every false positive that was on the way to it. Both curves are then monotone in t.
The values are kept per bin of the same order-preserving float32 key as `metrics.VoxelMetrics`
(`bits` top bits; default 18: bins of ~0.2% relative width), so memory is two fixed histograms
whatever the number of cases, two tallies merge by adding them, and the curve is exact at the
thresholds between bins. Summary (`froc_score`): the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4
and 8 false positives per case, linearly interpolated between operating points as the LUNA16 /
CAMELYON16 evaluation scripts (and MONAI's `compute_froc_score`) do; beyond the last operating
point the sensitivity there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy import ndimage

from anomaseg.boxes import bounding_box
from anomaseg.metrics import bin_max_value, bin_positions

__all__ = ["FROC_RATES", "FrocTally", "Sweep", "component_sweep", "interpolated_sensitivity", "lesion_labels",
           "lowest_threshold_within", "min_voxels_for"]

FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per case (LUNA16's CPM)
FROC_BITS = 18


def min_voxels_for(volume_ml: float, spacing_mm) -> int:
    """The fewest voxels of the given spacing whose volume is >= `volume_ml` (at least 1)."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return max(1, int(math.ceil(round(volume_ml / voxel_ml, 6))))


def lesion_labels(truth: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, int]:
    """True lesions as `lesion_metrics.case_lesions` finds them: components of truth & brain."""
    return ndimage.label((np.asarray(truth) > 0) & brain, structure=np.ones((3,) * truth.ndim, bool))


@njit(cache=True, nogil=True)
def _find(parent, p):  # pragma: no cover (compiled)
    while parent[p] != p:
        parent[p] = parent[parent[p]]
        p = parent[p]
    return p


@njit(cache=True, nogil=True)
def _sweep_kernel(values, order, labels, shape, min_sizes, n_lesions):  # pragma: no cover (compiled)
    """values: float32 map (flat, C order of `shape`); order: flat indices of the brain voxels by
    descending value; labels: int32 lesion id per voxel (0 = none); min_sizes: (K,) int64.
    Returns (event values (E,), count steps (E, K) int64, detection values (K, n_lesions + 1), NaN
    where never detected)."""
    nx, ny, nz = shape[0], shape[1], shape[2]
    n = values.size
    k_sizes = min_sizes.shape[0]
    parent = np.full(n, -1, np.int64)
    size = np.zeros(n, np.int64)
    has_gt = np.zeros(n, np.bool_)
    # pending lesion entries per root, as linked lists: one entry per lesion voxel added
    head = np.full(n, -1, np.int64)
    tail = np.full(n, -1, np.int64)
    n_entries = 0
    for i in range(order.size):
        if labels[order[i]] > 0:
            n_entries += 1
    entry_lesion = np.zeros(max(n_entries, 1), np.int64)
    entry_next = np.full(max(n_entries, 1), -1, np.int64)
    detected = np.full((k_sizes, n_lesions + 1), np.nan, np.float64)
    fp = np.zeros(k_sizes, np.int64)
    last_fp = np.zeros(k_sizes, np.int64)
    ev_values = np.zeros(order.size, np.float64)
    ev_steps = np.zeros((order.size, k_sizes), np.int64)
    n_events = 0
    used = 0
    for i in range(order.size):
        p = order[i]
        v = values[p]
        parent[p] = p
        size[p] = 1
        has_gt[p] = labels[p] > 0
        for k in range(k_sizes):
            if size[p] >= min_sizes[k] and not has_gt[p]:
                fp[k] += 1
        if labels[p] > 0 and np.isnan(detected[k_sizes - 1, labels[p]]):  # the largest size comes last
            entry_lesion[used] = labels[p]
            head[p] = used
            tail[p] = used
            used += 1
        x = p // (ny * nz)
        y = (p // nz) % ny
        z = p % nz
        for dx in range(-1, 2):
            xx = x + dx
            if xx < 0 or xx >= nx:
                continue
            for dy in range(-1, 2):
                yy = y + dy
                if yy < 0 or yy >= ny:
                    continue
                for dz in range(-1, 2):
                    zz = z + dz
                    if zz < 0 or zz >= nz or (dx == 0 and dy == 0 and dz == 0):
                        continue
                    q = (xx * ny + yy) * nz + zz
                    if parent[q] < 0:
                        continue
                    a = _find(parent, p)
                    b = _find(parent, q)
                    if a == b:
                        continue
                    if size[a] < size[b]:
                        a, b = b, a
                    for k in range(k_sizes):
                        if size[a] >= min_sizes[k] and not has_gt[a]:
                            fp[k] -= 1
                        if size[b] >= min_sizes[k] and not has_gt[b]:
                            fp[k] -= 1
                    parent[b] = a
                    size[a] += size[b]
                    has_gt[a] = has_gt[a] or has_gt[b]
                    for k in range(k_sizes):
                        if size[a] >= min_sizes[k] and not has_gt[a]:
                            fp[k] += 1
                    if head[b] >= 0:  # concatenate b's pending entries onto a's
                        if head[a] >= 0:
                            entry_next[tail[a]] = head[b]
                            tail[a] = tail[b]
                        else:
                            head[a] = head[b]
                            tail[a] = tail[b]
                        head[b] = -1
                        tail[b] = -1
        r = _find(parent, p)
        if head[r] >= 0:
            done = True
            e = head[r]
            while e >= 0:
                les = entry_lesion[e]
                for k in range(k_sizes):
                    if size[r] >= min_sizes[k]:
                        if np.isnan(detected[k, les]):
                            detected[k, les] = v
                    else:
                        done = False
                e = entry_next[e]
            if done:  # every size criterion met: these entries can never matter again
                head[r] = -1
                tail[r] = -1
        if i == order.size - 1 or values[order[i + 1]] != v:  # the end of a group of equal values
            changed = False
            for k in range(k_sizes):
                if fp[k] != last_fp[k]:
                    changed = True
            if changed:
                ev_values[n_events] = v
                for k in range(k_sizes):
                    ev_steps[n_events, k] = fp[k] - last_fp[k]
                    last_fp[k] = fp[k]
                n_events += 1
    return ev_values[:n_events], ev_steps[:n_events], detected




@dataclass
class Sweep:
    """`component_sweep`'s result for one case and K minimum component sizes."""

    event_values: np.ndarray  # (E,) descending map values where a false-positive count changes...
    event_steps: np.ndarray  # (E, K) ...by this much, for every t < the value (down to the next event)
    detection: np.ndarray  # (K, n_lesions): lesion j is detected at t <=> t < detection[k, j] (NaN: never)


def component_sweep(smoothed: np.ndarray, brain: np.ndarray, truth: np.ndarray | None = None,
                    min_voxels=(1,)) -> Sweep:
    """Components of {smoothed > t} inside `brain` over every threshold t (module docstring), for
    each minimum component size in `min_voxels` (ascending)."""
    sizes = np.asarray(min_voxels, np.int64).reshape(-1)
    if sizes.size == 0 or np.any(np.diff(sizes) < 0):
        raise ValueError(f"min_voxels must be a non-empty ascending sequence, got {min_voxels}")
    brain = np.asarray(brain, bool)
    box = bounding_box(brain, 0)
    values = np.ascontiguousarray(smoothed[box], dtype=np.float32)
    inside = brain[box]
    if truth is None:
        labels, n_lesions = np.zeros(values.shape, np.int32), 0
    else:
        labels, n_lesions = lesion_labels(np.asarray(truth)[box], inside)
    flat = values.ravel()
    idx = np.flatnonzero(inside)
    if np.isnan(flat[idx]).any():
        raise ValueError("the anomaly map holds NaN inside the brain")
    order = idx[np.argsort(-flat[idx], kind="stable")]
    ev_values, ev_steps, detection = _sweep_kernel(flat, order, labels.astype(np.int32).ravel(),
                                               np.asarray(values.shape, np.int64), sizes, int(n_lesions))
    return Sweep(ev_values, ev_steps, detection[:, 1:])


def _running_max_steps(values: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The steps of a count's running maximum from the highest value down (only the rises)."""
    running = np.maximum.accumulate(np.maximum(np.cumsum(steps), 0))
    rises = np.diff(np.concatenate([[0], running]))
    keep = rises > 0
    return values[keep], rises[keep]


def _add_at(hist: np.ndarray, values: np.ndarray, weights: np.ndarray, bits: int) -> None:
    if values.size:
        np.add.at(hist, bin_positions(values, bits), weights.astype(np.int64))


def interpolated_sensitivity(fp_per_case: np.ndarray, sensitivity: np.ndarray, rates=FROC_RATES) -> np.ndarray:
    """Sensitivity at each false-positive rate, linear between the operating points of a monotone
    FROC curve (LUNA16 / CAMELYON16 style); several points at one rate: the highest sensitivity."""
    fp_per_case, sensitivity = np.asarray(fp_per_case, float), np.asarray(sensitivity, float)
    last = np.r_[fp_per_case[1:] != fp_per_case[:-1], True]  # the last (highest) point at each rate
    return np.interp(np.asarray(rates, float), fp_per_case[last], sensitivity[last])


def rate_name(rate: float) -> str:
    return f"1/{round(1 / rate)}" if rate < 1 else f"{rate:g}"


@dataclass
class FrocTally:
    """Streaming FROC (module docstring) over a test set: two histograms over the float32 key
    bins and two counts, all plain data that add up exactly when two tallies `merge`."""

    bits: int = FROC_BITS
    detected: np.ndarray | None = None  # true lesions per bin of their detection value
    false_positives: np.ndarray | None = None  # rises of the per-case running-max FP count per bin
    n_lesions: int = 0
    n_cases: int = 0

    def __post_init__(self):
        if self.detected is None:
            self.detected = np.zeros(1 << self.bits, np.int64)
        if self.false_positives is None:
            self.false_positives = np.zeros(1 << self.bits, np.int64)

    def update(self, smoothed: np.ndarray, brain: np.ndarray, truth: np.ndarray, min_voxels: int) -> None:
        """Add one case: its post-processed map, brain mask, ground truth and the minimum component
        size (voxels) its segmentation used."""
        sweep = component_sweep(smoothed, brain, truth, (int(min_voxels),))
        found = sweep.detection[0][~np.isnan(sweep.detection[0])]
        _add_at(self.detected, found, np.ones(found.size, np.int64), self.bits)
        _add_at(self.false_positives, *_running_max_steps(sweep.event_values, sweep.event_steps[:, 0]), self.bits)
        self.n_lesions += int(sweep.detection.shape[1])
        self.n_cases += 1

    def merge(self, other: "FrocTally") -> "FrocTally":
        if other.bits != self.bits:
            raise ValueError(f"cannot merge FROC tallies with different bits ({self.bits} vs {other.bits})")
        self.detected += other.detected
        self.false_positives += other.false_positives
        self.n_lesions += other.n_lesions
        self.n_cases += other.n_cases
        return self

    def _points(self):
        """(fp per case, sensitivity, threshold) of every operating point, highest threshold first;
        the first point predicts nothing."""
        nonempty = np.flatnonzero((self.detected != 0) | (self.false_positives != 0))[::-1]
        sens = np.r_[0.0, np.cumsum(self.detected[nonempty]) / self.n_lesions]
        fppc = np.r_[0.0, np.cumsum(self.false_positives[nonempty]) / self.n_cases]
        top = nonempty[:1] if nonempty.size else np.array([(1 << self.bits) - 1])
        thresholds = np.r_[bin_max_value(top, self.bits), bin_max_value(nonempty - 1, self.bits)]
        return fppc, sens, thresholds

    def curve(self, max_points: int = 512) -> dict:
        """The FROC curve for plotting (at most ~`max_points` points, highest threshold first):
        lists `fp_per_case`, `sensitivity`, `thresholds` (point i is the segmentation map > t_i).
        Empty lists without true lesions."""
        if self.n_lesions == 0 or self.n_cases == 0:
            return {"fp_per_case": [], "sensitivity": [], "thresholds": []}
        fppc, sens, thresholds = self._points()
        if fppc.size > max_points:
            keep = np.unique(np.r_[0, fppc.size - 1, np.linspace(0, fppc.size - 1, max_points - 2).round().astype(int)])
            fppc, sens, thresholds = fppc[keep], sens[keep], thresholds[keep]
        return {"fp_per_case": fppc.tolist(), "sensitivity": sens.tolist(), "thresholds": thresholds.tolist()}

    def compute(self) -> dict:
        """{"froc_score": mean sensitivity at FROC_RATES, "froc_sensitivity": {"1/8": ..., ...},
        "froc_n_lesions", "froc_n_cases"}; NaN without true lesions."""
        if self.n_lesions == 0 or self.n_cases == 0:
            at = np.full(len(FROC_RATES), math.nan)
        else:
            fppc, sens, _ = self._points()
            at = interpolated_sensitivity(fppc, sens)
        return {"froc_score": float(np.mean(at)),
                "froc_sensitivity": {rate_name(r): float(s) for r, s in zip(FROC_RATES, at)},
                "froc_n_lesions": self.n_lesions, "froc_n_cases": self.n_cases}


def lowest_threshold_within(event_values: list[np.ndarray], event_steps: list[np.ndarray], target: float,
                            floor: float) -> tuple[float, float]:
    """Healthy cases' false-positive counts (their `component_sweep` events for one minimum size):
    the lowest threshold t >= `floor` such that the mean count per case is <= `target` at t and at
    every higher threshold, and the mean count at that t. (Without the running condition a low
    enough threshold would merge the whole brain into one component and count one.)"""
    n_cases = len(event_values)
    values = np.concatenate(event_values) if n_cases else np.zeros(0)
    steps = np.concatenate(event_steps) if n_cases else np.zeros(0, np.int64)
    order = np.argsort(-values, kind="stable")
    values, steps = values[order], steps[order]
    distinct, start = np.unique(-values, return_index=True)  # groups of equal values, descending
    mean = np.cumsum(np.add.reduceat(steps, start)) / max(n_cases, 1) if values.size else np.zeros(0)
    over = np.flatnonzero(mean > target)
    threshold = floor if not over.size else max(floor, float(-distinct[over[0]]))
    at = float(steps[values > threshold].sum()) / max(n_cases, 1)
    return threshold, at
