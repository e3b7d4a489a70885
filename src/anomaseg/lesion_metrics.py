"""Metrics that clinicians and the recent literature report beside pooled voxel metrics.

Per volume (the protocol of Behrendt et al.'s pDDPM / cDDPM papers): Dice and AUPRC are computed
on each case and averaged over the cases that hold lesion voxels (mean +- standard deviation); a
case without lesions has no AUPRC and its Dice says nothing about segmentation quality, so it stays
out of both means (its false-positive lesions still count in the lesion-wise numbers).

Lesion-wise detection: lesions are the connected components (26-connectivity, as the
post-processing uses) of the ground truth inside the brain mask; predicted lesions are the
components of the segmentation. A true lesion is *detected* when at least one predicted voxel
overlaps it; a predicted lesion that overlaps no true lesion is a *false-positive lesion*.
Counts are pooled over all cases:

    lesion recall    = detected true lesions / true lesions
    lesion precision = predicted lesions overlapping a true lesion / predicted lesions
    lesion F1        = 2 P R / (P + R)

Recall is also stratified by true-lesion volume (< 0.1 ml, 0.1-1 ml, 1-10 ml, > 10 ml; a lesion
of exactly 0.1 ml falls in 0.1-1). Volumes use the voxel spacing of the case. The absolute volume
difference |V_pred - V_true| is given per case in ml (and in percent of V_true for cases with
lesions, the WMH challenge's "AVD").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = ["SIZE_BINS_ML", "CaseLesions", "LesionMetrics", "case_lesions", "size_bin"]

SIZE_BINS_ML = (0.1, 1.0, 10.0)  # edges of the volume strata in ml
SIZE_BIN_NAMES = ("<0.1 ml", "0.1-1 ml", "1-10 ml", ">10 ml")


def size_bin(volume_ml: float) -> str:
    return SIZE_BIN_NAMES[int(np.searchsorted(SIZE_BINS_ML, volume_ml, side="right"))]


@dataclass
class CaseLesions:
    """Lesion-wise outcome of one case."""

    case_id: str
    voxel_ml: float
    lesions: list[dict]  # per true lesion: index, voxels, volume_ml, size_bin, detected, overlap, centre
    n_predicted: int  # predicted components
    n_predicted_true: int  # predicted components overlapping a true lesion
    true_voxels: int
    predicted_voxels: int

    @property
    def n_detected(self) -> int:
        return sum(les["detected"] for les in self.lesions)

    @property
    def n_false_positive(self) -> int:
        return self.n_predicted - self.n_predicted_true

    @property
    def volume_true_ml(self) -> float:
        return self.true_voxels * self.voxel_ml

    @property
    def volume_predicted_ml(self) -> float:
        return self.predicted_voxels * self.voxel_ml


def case_lesions(prediction: np.ndarray, truth: np.ndarray, spacing_mm=(1.0, 1.0, 1.0),
                 case_id: str = "", brain: np.ndarray | None = None) -> CaseLesions:
    """Match the connected components of a binary prediction and ground truth of one volume.
    Only voxels inside `brain` (if given) count. `spacing_mm` sets the voxel volume."""
    pred = np.asarray(prediction) > 0
    true = np.asarray(truth) > 0
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape} differ in shape")
    if brain is not None:
        pred, true = pred & brain, true & brain
    structure = np.ones((3,) * pred.ndim, bool)  # full connectivity (26 in 3D), as postprocess
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    true_labels, n_true = ndimage.label(true, structure=structure)
    pred_labels, n_pred = ndimage.label(pred, structure=structure)
    lesions = []
    if n_true:
        sizes = np.bincount(true_labels.ravel(), minlength=n_true + 1)
        overlap = np.bincount(true_labels[pred].ravel(), minlength=n_true + 1)
        centres = ndimage.center_of_mass(true, true_labels, range(1, n_true + 1))
        for k in range(1, n_true + 1):
            ml = float(sizes[k]) * voxel_ml
            lesions.append({"case_id": case_id, "lesion": k, "voxels": int(sizes[k]), "volume_ml": ml,
                            "size_bin": size_bin(ml), "detected": bool(overlap[k] > 0),
                            "overlap_fraction": float(overlap[k]) / float(sizes[k]),
                            "centre_voxel": [int(round(c)) for c in centres[k - 1]]})
    hit = np.unique(pred_labels[true & pred])
    return CaseLesions(case_id, voxel_ml, lesions, int(n_pred), int(np.count_nonzero(hit)),
                       int(true.sum()), int(pred.sum()))


def _mean_std(values) -> dict:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


@dataclass
class LesionMetrics:
    """Accumulates per-volume and lesion-wise metrics case by case (memory: a few numbers per
    case and per lesion)."""

    cases: list[CaseLesions] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    auprc: list[float] = field(default_factory=list)

    def update(self, lesions: CaseLesions, dice: float, auprc: float) -> dict:
        """Add one case (its `case_lesions`, its Dice and the AUPRC of its map); returns the
        case's row for the per-case table."""
        self.cases.append(lesions)
        has_lesion = lesions.true_voxels > 0
        self.dice.append(dice if has_lesion else math.nan)
        self.auprc.append(auprc if has_lesion else math.nan)
        avd = abs(lesions.volume_predicted_ml - lesions.volume_true_ml)
        return {"auprc": auprc if has_lesion else math.nan, "n_lesions": len(lesions.lesions),
                "detected_lesions": lesions.n_detected, "false_positive_lesions": lesions.n_false_positive,
                "volume_true_ml": lesions.volume_true_ml, "volume_predicted_ml": lesions.volume_predicted_ml,
                "abs_volume_difference_ml": avd}

    def merge(self, other: "LesionMetrics") -> "LesionMetrics":
        """Add the cases of another accumulator (another worker's share); returns self."""
        self.cases += other.cases
        self.dice += other.dice
        self.auprc += other.auprc
        return self

    def _ordered(self):
        """(cases, dice, auprc) by case id: results do not depend on the order cases came in."""
        order = sorted(range(len(self.cases)), key=lambda i: self.cases[i].case_id)
        return ([self.cases[i] for i in order], [self.dice[i] for i in order], [self.auprc[i] for i in order])

    def per_lesion(self) -> list[dict]:
        return [les for c in self._ordered()[0] for les in c.lesions]

    def compute(self) -> dict:
        cases, dice_values, auprc_values = self._ordered()
        lesions = self.per_lesion()
        n_true, n_detected = len(lesions), sum(les["detected"] for les in lesions)
        n_pred = sum(c.n_predicted for c in cases)
        n_pred_true = sum(c.n_predicted_true for c in cases)
        recall, precision = _ratio(n_detected, n_true), _ratio(n_pred_true, n_pred)
        f1 = (2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
              if not (math.isnan(recall) or math.isnan(precision)) else math.nan)
        if not math.isnan(recall) and n_pred == 0:
            f1 = 0.0  # nothing predicted: recall 0, precision undefined
        by_size = {}
        for name in SIZE_BIN_NAMES:
            group = [les for les in lesions if les["size_bin"] == name]
            hits = sum(les["detected"] for les in group)
            by_size[name] = {"n_lesions": len(group), "detected": hits, "recall": _ratio(hits, len(group))}
        fp = [c.n_false_positive for c in cases]
        avd_ml = [abs(c.volume_predicted_ml - c.volume_true_ml) for c in cases]
        avd_pct = [100.0 * abs(c.volume_predicted_ml - c.volume_true_ml) / c.volume_true_ml
                   for c in cases if c.true_voxels]
        dice, auprc, avd = _mean_std(dice_values), _mean_std(auprc_values), _mean_std(avd_ml)
        return {
            "per_volume_dice_mean": dice["mean"], "per_volume_dice_std": dice["std"],
            "per_volume_auprc_mean": auprc["mean"], "per_volume_auprc_std": auprc["std"],
            "per_volume_n_cases": dice["n"],
            "lesion_recall": recall, "lesion_precision": precision, "lesion_f1": f1,
            "n_true_lesions": n_true, "n_detected_lesions": n_detected, "n_predicted_lesions": n_pred,
            "n_false_positive_lesions": n_pred - n_pred_true,
            "false_positive_lesions_per_case": _mean_std(fp)["mean"],
            "abs_volume_difference_ml_mean": avd["mean"], "abs_volume_difference_ml_std": avd["std"],
            "abs_volume_difference_percent_mean": _mean_std(avd_pct)["mean"],
            "recall_by_lesion_size": by_size,
        }
