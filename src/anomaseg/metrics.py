"""Segmentation metrics: streaming voxel-level AUROC / AUPRC / best Dice, and exact small-array metrics.

Convention everywhere: a **higher score means more anomalous**, labels > 0 are anomalous, and a
binary prediction at threshold ``t`` is ``score > t`` (strict).

Streaming voxel metrics (:class:`VoxelMetrics`)
-----------------------------------------------
A test set has 1e7-1e9 voxels; sorting them all (what scikit-learn does) costs minutes and
gigabytes. Instead every float32 score is mapped to a fixed, data-independent integer key that
preserves order: the top ``bits`` bits of its IEEE-754 pattern. Two histograms over those keys
(all voxels, anomalous voxels) are accumulated case by case with ``np.bincount``; memory is
``2 * 2**bits`` int64 counters (16 MiB for the default ``bits=20``) whatever the number of voxels.

From the histograms, every metric is computed exactly as if all scores inside one bin were equal:

* With ``bits=20`` a bin keeps sign, exponent and the top 11 mantissa bits, so it spans a relative
  width of 2**-11 (~0.05 %) of its values: only values that close together are merged into a tie.
  Values that are exactly equal (e.g. the many exact zeros of a rectified residual map) always fall
  into one bin and are treated as ties exactly like scikit-learn does.
* +0.0, -0.0 and the denormals with ``|x| < 4096 * 2**-149`` (~5.7e-42) share one bin.
* ``+inf`` / ``-inf`` are valid (highest / lowest) scores; NaN raises ``ValueError`` (NaN outside
  the mask is ignored with the voxel).

AUROC is the trapezoid over the ROC points (scikit-learn's ``roc_auc_score``), AUPRC is
scikit-learn's step-wise average precision ``sum_n (R_n - R_{n-1}) P_n``, and the best Dice is
``2TP / (2TP + FP + FN)`` maximised over every bin boundary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["VoxelMetrics", "bin_max_value", "bin_positions", "dice_score", "binary_auroc", "binary_auprc"]

# Elements per internal block of an update(): bounds the temporaries (~8 bytes per element) and
# keeps them cache-friendly, whatever the size of the array passed in.
_BLOCK = 1 << 22
_SMALL = 1 << 19  # below this many keys, count relative to the smallest key (see _add_counts)


# ----------------------------------------------------------------------------------------------
# input conversion
# ----------------------------------------------------------------------------------------------


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _scores_f32(x: Any, what: str = "scores") -> np.ndarray:
    """Any array-like (numpy, torch on any device, float16/bfloat16/float64, list) -> flat float32."""
    if _is_torch(x):
        import torch

        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)


def _binary(x: Any, what: str) -> np.ndarray:
    """Any array-like -> flat bool (True where > 0)."""
    if _is_torch(x):
        x = (x.detach() > 0).cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"{what} must be numeric or boolean, got dtype {arr.dtype}")
        arr = arr > 0
    return np.ascontiguousarray(arr).reshape(-1)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _nan_message(n_nan: int, n: int) -> str:
    return (
        f"scores contain {n_nan} NaN value(s) out of {n} counted: anomaly maps must not contain NaN "
        "(check the predictor, e.g. a division by zero in a normalisation)"
    )


def _check_nan(scores: np.ndarray) -> None:
    if np.isnan(scores).any():
        raise ValueError(_nan_message(int(np.count_nonzero(np.isnan(scores))), scores.size))


def _add_counts(counts: np.ndarray, keys: np.ndarray, offset: bool) -> None:
    """counts[key] += number of occurrences of key (keys: non-negative intp)."""
    if keys.size == 0:
        return
    lo = 0
    if offset:
        lo = int(keys.min())
        if lo:
            keys = keys - lo
    c = np.bincount(keys)
    counts[lo : lo + c.size] += c


# ----------------------------------------------------------------------------------------------
# order-preserving bins of float32 scores (also used by lesion_sweep's FROC histograms)
# ----------------------------------------------------------------------------------------------


def bin_max_value(position, bits: int) -> np.ndarray:
    """Largest non-NaN float32 value that falls into each bin position (float64 array) of the
    order-preserving key with `bits` top bits (`VoxelMetrics`' bins)."""
    half = 1 << (bits - 1)
    size = 1 << bits
    shift = 32 - bits
    position = np.maximum(np.asarray(position, dtype=np.int64), 0)
    # the merged -0.0 bin holds nothing: step below it
    position = np.where(position == half - 1, half - 2, position)
    nonneg = position >= half
    raw = np.where(nonneg, position - half, size - 1 - position).astype(np.uint64)
    low_mask = np.uint64((1 << shift) - 1)
    pattern = np.where(nonneg, (raw << np.uint64(shift)) | low_mask, raw << np.uint64(shift))
    with np.errstate(invalid="ignore"):  # NaN patterns (signalling ones warn when widened)
        val = pattern.astype(np.uint32).view(np.float32).astype(np.float64)
    # only the +/-inf bins hold NaN patterns next to a real value; NaN-only bins are never used
    return np.where(np.isnan(val), np.where(nonneg, np.inf, -np.inf), val)


def bin_positions(values, bits: int) -> np.ndarray:
    """Bin position (ascending score order) of each float32 value under the order-preserving key
    with `bits` top bits (`VoxelMetrics`' bins; -0.0 shares +0.0's bin). NaN is not allowed."""
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if np.isnan(v).any():
        raise ValueError("values must not be NaN")
    u = v.view(np.uint32)
    raw = (u >> np.uint32(32 - bits)).astype(np.int64)
    half = 1 << (bits - 1)
    position = np.where(u >> np.uint32(31), (1 << bits) - 1 - raw, half + raw)
    return np.where(position == half - 1, half, position)


# ----------------------------------------------------------------------------------------------
# streaming accumulator
# ----------------------------------------------------------------------------------------------


class VoxelMetrics:
    """Streaming accumulator of voxel-level AUROC, AUPRC and best Dice over a whole test set.

    ``update()`` once per case (or per batch), ``compute()`` at the end. Higher score = more
    anomalous. Memory is ``2 * 2**bits`` int64 counters, independent of the number of voxels.

    ``bits`` (12..24) sets the resolution: bins have a relative width of ``2**-(bits - 9)``
    (default 20 -> ~0.05 %); scores closer than that are counted as ties.
    """

    def __init__(self, bits: int = 20):
        if not isinstance(bits, (int, np.integer)) or not 12 <= bits <= 24:
            raise ValueError(f"bits must be an integer in [12, 24], got {bits!r}")
        self.bits = int(bits)
        # Counts indexed by the raw key (top `bits` bits of the float32 pattern); reordered into
        # score order only in compute(), so the per-voxel work is one shift and one bincount.
        self._total = np.zeros(1 << self.bits, dtype=np.int64)
        self._positive = np.zeros(1 << self.bits, dtype=np.int64)

    # -- accumulation -------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Memory held by the accumulator (constant: it does not grow with the voxels seen)."""
        return self._total.nbytes + self._positive.nbytes

    def update(self, scores, labels, mask=None) -> None:
        """Add one case (or batch). ``scores``, ``labels`` (> 0 = anomalous) and the optional boolean
        ``mask`` (only voxels where it is True count) are numpy or torch arrays of one shape.

        Raises ValueError (and leaves the accumulator unchanged) on NaN scores or mismatched shapes.
        """
        shapes = [_shape(scores), _shape(labels)] + ([] if mask is None else [_shape(mask)])
        if any(s != shapes[0] for s in shapes[1:]):
            names = ["scores", "labels", "mask"]
            raise ValueError(
                "scores, labels and mask must have the same shape, got "
                + ", ".join(f"{n}={s}" for n, s in zip(names, shapes))
            )
        s = _scores_f32(scores)
        y = _binary(labels, "labels")
        m = None if mask is None else _binary(mask, "mask")
        # Validate everything before touching the counts, so a failed update changes nothing.
        # NaN outside the mask is allowed: those voxels do not count.
        n_nan = 0
        for start in range(0, s.size, _BLOCK):
            nan = np.isnan(s[start : start + _BLOCK])
            if m is not None:
                nan &= m[start : start + _BLOCK]
            if nan.any():
                n_nan += int(np.count_nonzero(nan))
        if n_nan:
            raise ValueError(_nan_message(n_nan, s.size if m is None else int(np.count_nonzero(m))))
        keys_u32 = s.view(np.uint32)
        shift = 32 - self.bits
        buf = np.empty(min(_BLOCK, s.size), dtype=np.intp)
        for start in range(0, s.size, _BLOCK):
            stop = min(start + _BLOCK, s.size)
            k = buf[: stop - start]
            # order-preserving key = top bits of the float pattern (reordered in compute())
            np.right_shift(keys_u32[start:stop], shift, out=k, casting="unsafe")
            yb = y[start:stop]
            if m is not None:
                mb = m[start:stop]
                k = k[mb]
                yb = yb[mb]
            # bincount's output spans 0..max(key): for small inputs shift the keys down first,
            # or zeroing and adding that output would cost more than counting
            _add_counts(self._total, k, offset=k.size < _SMALL)
            _add_counts(self._positive, k[yb], offset=True)

    def merge(self, other: "VoxelMetrics") -> "VoxelMetrics":
        """Add another accumulator's counts into this one (for parallel workers); returns self."""
        if not isinstance(other, VoxelMetrics):
            raise TypeError(f"can only merge a VoxelMetrics, got {type(other).__name__}")
        if other.bits != self.bits:
            raise ValueError(f"cannot merge accumulators with different bits ({self.bits} vs {other.bits})")
        self._total += other._total
        self._positive += other._positive
        return self

    def reset(self) -> None:
        self._total[:] = 0
        self._positive[:] = 0

    # -- bin geometry -------------------------------------------------------------------------
    # "Position" = index of a bin in ascending score order. Raw key k (top bits of the pattern):
    # non-negative floats k < half map to position half + k; negative floats (k >= half) to
    # position size - 1 - k (larger magnitude = lower). The -0.0 bin (raw key half, position
    # half - 1) is merged into the +0.0 bin (position half) so that +0.0 and -0.0 tie.

    def _ordered(self) -> tuple[np.ndarray, np.ndarray]:
        half = 1 << (self.bits - 1)
        pos = np.concatenate([self._positive[half:][::-1], self._positive[:half]])
        tot = np.concatenate([self._total[half:][::-1], self._total[:half]])
        for a in (pos, tot):
            a[half] += a[half - 1]
            a[half - 1] = 0
        return pos, tot - pos

    def _max_value(self, position: np.ndarray) -> np.ndarray:
        """Largest non-NaN float32 value that falls into each bin position (float64 array)."""
        return bin_max_value(position, self.bits)

    def _position_of(self, threshold: float) -> int:
        """Bin position of the float32 t with (score > threshold) == (score > t) for float32 scores."""
        t = float(threshold)
        if math.isnan(t):
            raise ValueError("threshold is NaN")
        t32 = np.float32(t)
        if float(t32) > t:  # round down, so that score > t32  <=>  score > t
            t32 = np.nextafter(t32, np.float32(-np.inf))
        u = int(np.array(t32, dtype=np.float32).view(np.uint32))
        raw = u >> (32 - self.bits)
        half = 1 << (self.bits - 1)
        position = (1 << self.bits) - 1 - raw if u >> 31 else half + raw
        return half if position == half - 1 else position

    # -- results ------------------------------------------------------------------------------

    def _sweep(self):
        """Cumulative counts over the non-empty bins in descending score order."""
        pos, neg = self._ordered()
        nonempty = np.flatnonzero((pos + neg) > 0)[::-1]  # descending positions
        tps = np.cumsum(pos[nonempty])
        fps = np.cumsum(neg[nonempty])
        return nonempty, pos[nonempty], tps, fps

    def compute(self) -> dict:
        """{"pixel_auroc", "pixel_auprc", "dice_best", "dice_best_threshold", "n_voxels",
        "n_positive", "warnings"}. Undefined metrics are NaN, with the reason in "warnings"."""
        n_pos = int(self._positive.sum())
        n_vox = int(self._total.sum())
        n_neg = n_vox - n_pos
        out: dict[str, Any] = {
            "pixel_auroc": math.nan,
            "pixel_auprc": math.nan,
            "dice_best": math.nan,
            "dice_best_threshold": math.nan,
            "n_voxels": n_vox,
            "n_positive": n_pos,
            "warnings": [],
        }
        if n_vox == 0:
            out["warnings"].append("no voxels accumulated: all metrics are undefined")
            return out
        positions, p_bin, tps, fps = self._sweep()
        if n_pos == 0:
            out["warnings"].append(
                "no anomalous voxels (labels > 0) accumulated: AUROC and AUPRC are undefined; "
                "dice_best is 1.0 (predicting nothing matches the empty truth)"
            )
        elif n_neg == 0:
            out["warnings"].append(
                "no normal voxels accumulated: AUROC is undefined; AUPRC is trivially 1.0"
            )
        if n_pos > 0 and n_neg > 0:
            tpr = tps / n_pos
            fpr = fps / n_neg
            tpr0 = np.concatenate([[0.0], tpr[:-1]])
            fpr0 = np.concatenate([[0.0], fpr[:-1]])
            out["pixel_auroc"] = float(np.sum((fpr - fpr0) * (tpr + tpr0)) / 2.0)
        if n_pos > 0:
            out["pixel_auprc"] = float(np.sum(p_bin * (tps / (tps + fps))) / n_pos)
            dice = 2.0 * tps / (tps + fps + n_pos)
            if positions[-1] == self._position_of(-math.inf):
                dice[-1] = -1.0  # no threshold t selects -inf scores (score > t): that point is unreachable
            k = int(np.argmax(dice))  # first maximum = highest threshold
            if dice[k] < 0:  # every score is -inf: the only reachable prediction is nothing
                out["dice_best"], out["dice_best_threshold"] = 0.0, -math.inf
            else:
                out["dice_best"] = float(dice[k])
                out["dice_best_threshold"] = float(self._max_value(positions[k] - 1))
        else:
            # predicting nothing (threshold = the highest score's bin) gives Dice 1 on empty truth
            out["dice_best"] = 1.0
            out["dice_best_threshold"] = float(self._max_value(positions[0]))
        return out

    def curves(self, max_points: int = 512) -> dict:
        """ROC and PR curves for plotting, downsampled to at most ~``max_points`` points.

        Returns plain lists of one length, in descending threshold order, starting at the point
        where nothing is predicted (fpr = tpr = recall = 0, precision = 1) and ending where
        everything is (fpr = tpr = recall = 1, precision = prevalence). ``thresholds[i]`` is a
        value t whose prediction ``score > t`` gives point i. Empty lists if either class is absent.
        """
        keys = ("fpr", "tpr", "precision", "recall", "thresholds")
        n_pos = int(self._positive.sum())
        n_neg = int(self._total.sum()) - n_pos
        if n_pos == 0 or n_neg == 0:
            return {k: [] for k in keys}
        positions, _, tps, fps = self._sweep()
        fpr = np.concatenate([[0.0], fps / n_neg])
        tpr = np.concatenate([[0.0], tps / n_pos])
        precision = np.concatenate([[1.0], tps / np.maximum(tps + fps, 1)])
        thresholds = np.concatenate([self._max_value(positions[:1]), self._max_value(positions - 1)])
        max_points = max(int(max_points), 2)
        if fpr.size > max_points:
            # roughly even spacing along the curve: s = fpr + tpr runs monotonically from 0 to 2
            s = fpr + tpr
            idx = np.searchsorted(s, np.linspace(0.0, 2.0, max_points - 1))
            idx = np.unique(np.concatenate([[0, fpr.size - 1], np.minimum(idx, fpr.size - 1)]))
            fpr, tpr, precision, thresholds = fpr[idx], tpr[idx], precision[idx], thresholds[idx]
        return {
            "fpr": fpr.tolist(),
            "tpr": tpr.tolist(),
            "precision": precision.tolist(),
            "recall": tpr.tolist(),
            "thresholds": thresholds.tolist(),
        }

    def dice_at(self, threshold: float) -> float:
        """Dice of the prediction ``score > threshold`` over everything accumulated.

        Computed from the histogram: the bin that contains ``threshold`` counts as predicted
        normal, so the result is exact when ``threshold`` is the top of a bin (as
        ``dice_best_threshold`` is) and otherwise exact up to the bin resolution.
        NaN if nothing was accumulated; 1.0 if prediction and truth are both empty.
        """
        n_vox = int(self._total.sum())
        if n_vox == 0:
            return math.nan
        position = self._position_of(threshold)
        pos, neg = self._ordered()
        tp = int(pos[position + 1 :].sum())
        fp = int(neg[position + 1 :].sum())
        n_pos = int(self._positive.sum())
        denominator = tp + fp + n_pos
        return 1.0 if denominator == 0 else 2.0 * tp / denominator

    def __repr__(self) -> str:
        return f"VoxelMetrics(bits={self.bits}, n_voxels={int(self._total.sum())}, n_positive={int(self._positive.sum())})"


# ----------------------------------------------------------------------------------------------
# exact metrics for small arrays
# ----------------------------------------------------------------------------------------------


def dice_score(pred, target, mask=None) -> float:
    """Exact Dice ``2|A∩B| / (|A| + |B|)`` of two binary arrays (values > 0 are foreground), counted
    only where ``mask`` is True (None = everywhere). Both empty -> 1.0."""
    if _shape(pred) != _shape(target) or (mask is not None and _shape(mask) != _shape(pred)):
        raise ValueError(
            f"pred, target and mask must have the same shape, got {_shape(pred)}, {_shape(target)}"
            + ("" if mask is None else f", {_shape(mask)}")
        )
    a = _binary(pred, "pred")
    b = _binary(target, "target")
    if mask is not None:
        m = _binary(mask, "mask")
        a = a & m
        b = b & m
    inter = int(np.count_nonzero(a & b))
    size = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if size == 0 else 2.0 * inter / size


def _small_inputs(scores, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    if _shape(scores) != _shape(labels):
        raise ValueError(f"{name}: scores and labels must have the same shape, got {_shape(scores)} and {_shape(labels)}")
    if _is_torch(scores):
        import torch

        scores = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _binary(labels, "labels")
    _check_nan(s)
    return s, y


def binary_auroc(scores, labels) -> float:
    """Exact ROC AUC for small arrays (e.g. one score per slice or case), ties counted as half, as
    scikit-learn's ``roc_auc_score``. Computed as the Mann-Whitney U statistic from average ranks.

    Raises ValueError if only one class is present (AUROC is undefined then).
    """
    from scipy.stats import rankdata

    s, y = _small_inputs(scores, labels, "binary_auroc")
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"binary_auroc: AUROC is undefined when only one class is present "
            f"({n_pos} anomalous, {n_neg} normal samples); labels > 0 mark anomalous samples"
        )
    ranks = rankdata(s)  # average ranks for ties
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def binary_auprc(scores, labels) -> float:
    """Exact average precision for small arrays, scikit-learn's definition
    ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds (no interpolation).

    Raises ValueError if there is no anomalous sample (average precision is undefined then).
    """
    s, y = _small_inputs(scores, labels, "binary_auprc")
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        raise ValueError(
            f"binary_auprc: average precision is undefined without anomalous samples "
            f"(0 of {y.size} labels > 0)"
        )
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    # last index of each run of equal scores = one threshold
    last = np.flatnonzero(np.concatenate([s_sorted[1:] != s_sorted[:-1], [True]]))
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    predicted = (last + 1).astype(np.float64)
    gained = np.diff(np.concatenate([[0.0], tps]))
    return float(np.sum(gained * (tps / predicted)) / n_pos)
