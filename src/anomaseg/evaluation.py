"""`anomaseg evaluate`: stream metrics of one or several predictors over a labelled test set.

Per predictor (all of them share one pass over the data: each case is read once):
- voxel metrics over the whole test set, only voxels inside the brain mask count: pixel AUROC,
  pixel AUPRC and the best-possible Dice over thresholds of the post-processed map (Baur et al.'s
  "best Dice"; small-component removal is not applied inside that sweep), from `VoxelMetrics`;
- `dice_at_threshold`: Dice of the actual segmentations (healthy-calibrated threshold, small
  components removed), pooled over all test voxels; per case the same Dice in `per_case`;
- `image_auroc`: slice level; an axial slice with brain is anomalous if it holds a label voxel, and
  its score is the predictor's `score` of the slice (by default the mean of the highest 1% of its
  anomaly map inside the brain; Skip-GANomaly's own image score for that predictor).

The intensity baseline (`predictors/intensity.py`) is evaluated in the same pass (unless
`baseline=False`): every metrics.json holds its metrics under `baseline`, the relative gain of the
predictor over it under `gain_over_baseline` (e.g. +0.15 = 15% higher AUPRC), every per-case row
its Dice as `baseline_dice`, and the reports show it as their first row and curve.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anomaseg.atomic import atomic_dir, write_text
from anomaseg.data.io import load_volume, save_like
from anomaseg.metrics import VoxelMetrics, binary_auprc, binary_auroc, dice_score
from anomaseg.report import CaseOverlay, SideBySide, write_comparison_report, write_report
from anomaseg.run import load_model
from anomaseg.scoring import (OUTPUT_MARKER, Scorer, _check_output_dir, _prepare_one, _test_cases, calibrate,
                              resolve_predictors)

BASELINE = "intensity"  # the predictor every evaluation is compared with
N_OVERLAYS = 2  # best and worst cases shown in the report
N_SIDE_BY_SIDE = 3  # cases (largest lesions) shown with every predictor's map in the comparison report
SUMMARY_KEYS = ["pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold", "image_auroc"]


@dataclass
class PredictorTally:
    """Everything one predictor accumulates over the test set (memory independent of its size)."""

    scorer: Scorer
    voxels: VoxelMetrics = field(default_factory=VoxelMetrics)
    tp: int = 0
    fp: int = 0
    fn: int = 0
    slice_scores: list = field(default_factory=list)
    slice_labels: list = field(default_factory=list)
    per_case: list = field(default_factory=list)
    views: list = field(default_factory=list)  # (dice, case_id, display arrays) for the report

    def add(self, case, smoothed: np.ndarray, scores: np.ndarray, seg: np.ndarray, model) -> None:
        brain, truth = case.brain, case.truth
        self.voxels.update(smoothed[brain], truth[brain])
        pred, gt = seg[brain] > 0, truth[brain]
        tp = int(np.count_nonzero(pred & gt))
        fp, fn = int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        zs = brain.any(axis=(0, 1))
        self.slice_scores.append(scores[zs])
        self.slice_labels.append(truth.any(axis=(0, 1))[zs])
        case_metrics = VoxelMetrics(bits=16)
        case_metrics.update(smoothed[brain], gt)
        auroc = case_metrics.compute()["pixel_auroc"]
        dice = dice_score(pred, gt)
        self.per_case.append({"case_id": case.case_id, "dice": dice, "pixel_auroc": auroc,
                              "lesion_voxels": int(gt.sum()), "predicted_voxels": int(pred.sum())})
        self.views.append((dice, case.case_id, _display(case, smoothed, seg, model)))
        self.views.sort(key=lambda v: v[0])
        if len(self.views) > 2 * N_OVERLAYS:  # keep only the current best and worst
            del self.views[N_OVERLAYS:-N_OVERLAYS]

    def metrics(self) -> dict:
        m = self.voxels.compute()
        denom = 2 * self.tp + self.fp + self.fn
        scores, labels = np.concatenate(self.slice_scores), np.concatenate(self.slice_labels)
        two_classes = 0 < labels.sum() < len(labels)
        return {
            "pixel_auroc": m["pixel_auroc"], "pixel_auprc": m["pixel_auprc"],
            "dice_best": m["dice_best"], "dice_best_threshold": m["dice_best_threshold"],
            "dice_at_threshold": 2 * self.tp / denom if denom else 1.0,
            "image_auroc": binary_auroc(scores, labels) if two_classes else math.nan,
            "image_auprc": binary_auprc(scores, labels) if two_classes else math.nan,
            "threshold": self.scorer.post.threshold_,
            "predictor": self.scorer.predictor.name,
            "n_cases": len(self.per_case), "n_voxels": m["n_voxels"], "n_anomalous_voxels": m["n_positive"],
            "n_slices": int(len(labels)), "n_anomalous_slices": int(labels.sum()),
            "per_case": self.per_case,
        }


def _view(case, area: np.ndarray):
    """(z, to2d): the axial slice with the largest `area` (or the middle one) and a function that
    takes a volume's slice z to model size, oriented for display (anterior up)."""
    z = int(np.argmax(area)) if area.any() else case.truth.shape[2] // 2
    g = case.geometry

    def to2d(vol: np.ndarray, mode: str = "bilinear") -> np.ndarray:
        return _show(g.to_slices(vol[:, :, z:z + 1].astype(np.float32), mode)[0, 0].numpy())

    return z, to2d


def _show(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T[::-1])  # (x, y) -> rows = y flipped


def _display(case, smoothed, seg, model) -> CaseOverlay | None:
    """The axial slice with the most lesion (or predicted) voxels, at model size, anterior up."""
    z, to2d = _view(case, case.truth.sum(axis=(0, 1)) if case.truth.any() else seg.sum(axis=(0, 1)))
    image = case.images[z, 0].astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(case.images[z:z + 1].astype(np.float32))
        device = next(model.parameters()).device
        recon = model.reconstruct(x.to(device))[0, 0].float().cpu().numpy()
    return CaseOverlay(case.case_id, 0.0, _show(image), _show(recon), to2d(smoothed),
                       to2d(seg, "nearest") > 0.5, to2d(case.truth, "nearest") > 0.5)


def _side_by_side_row(case):
    """An empty comparison row for the case's slice with the most lesion, and its `to2d`."""
    z, to2d = _view(case, case.truth.sum(axis=(0, 1)))
    return SideBySide(case.case_id, _show(case.images[z, 0].astype(np.float32)),
                      to2d(case.truth, "nearest") > 0.5, {}), to2d


def evaluate_dataset(run_dir: str | Path, data: str | Path, out_dir: str | Path, predictors: str | None = None,
                     save_maps: bool = False, progress: bool = True, predictor_params: dict | None = None,
                     baseline: bool = True) -> dict:
    """Evaluate the run on a labelled test set; returns the metrics of the first predictor (or the
    summary of all). Writes OUT/metrics.json and OUT/report.html (one predictor), or one subfolder
    per predictor plus OUT/summary.json and OUT/report.html (several). `predictor_params` maps a
    predictor name to its hyper-parameters (e.g. {"projection": {"steps": 50}}) for named predictors.
    With `baseline`, the intensity baseline is evaluated in the same pass (module docstring)."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    _check_output_dir(out_dir)
    model, config = load_model(run_dir)
    cases, spec = _test_cases(run_dir, data, config, require_seg=True)
    tallies = {}
    for name in resolve_predictors(run_dir, predictors):
        scorer = calibrate(run_dir, name, None if name is None else dict((predictor_params or {}).get(name, {})),
                           progress)
        tallies[scorer.predictor.name] = PredictorTally(scorer)
    reported = list(tallies)  # the baseline joins the pass, but gets its own results only if asked for
    if baseline and BASELINE not in tallies:
        tallies[BASELINE] = PredictorTally(calibrate(run_dir, BASELINE, {}, progress))
    if baseline and len(reported) > 1:  # compared side by side: the baseline comes first
        tallies = {BASELINE: tallies[BASELINE], **{k: v for k, v in tallies.items() if k != BASELINE}}
        reported = list(tallies)
    model = tallies[reported[0]].scorer.model
    side_by_side: list[tuple[int, str, SideBySide]] = []  # (lesion voxels, case id, panel), largest first
    with atomic_dir(out_dir) as tmp:
        with tqdm(cases, desc="evaluating", unit="case", disable=not progress) as bar:
            for case in bar:
                prepared = _prepare_one(case, spec, config)
                ref = load_volume(prepared.reference, header_only=True) if save_maps else None
                row, to2d = _side_by_side_row(prepared) if len(tallies) > 1 else (None, None)
                for name, tally in tallies.items():
                    smoothed, scores = tally.scorer.predict_case(prepared)
                    seg = tally.scorer.post.segment(smoothed)
                    tally.add(prepared, smoothed, scores, seg, model)
                    if row is not None:
                        row.maps[name] = to2d(smoothed)
                    if save_maps and name in reported:
                        sub = tmp / "maps" / (name if len(reported) > 1 else "")
                        save_like(ref, smoothed, sub / f"{case.case_id}_anomaly_map.nii.gz", np.float32)
                        save_like(ref, seg, sub / f"{case.case_id}_segmentation.nii.gz", np.uint8)
                if row is not None:
                    side_by_side.append((int(prepared.truth.sum()), case.case_id, row))
                    side_by_side.sort(key=lambda r: (-r[0], r[1]))
                    del side_by_side[N_SIDE_BY_SIDE:]
        base = tallies[BASELINE] if baseline else None
        base_metrics = base.metrics() if base is not None else None
        results = {}
        for name in reported:
            folder = tmp if len(reported) == 1 else tmp / name
            results[name] = _write_results(folder, tallies[name], run_dir, data,
                                           None if base is None or name == BASELINE else (base, base_metrics))
        if len(reported) > 1:
            summary = {name: {k: v for k, v in r.items() if k != "per_case"} for name, r in results.items()}
            write_text(tmp / "summary.json", json.dumps(_jsonable(summary), indent=1))
            write_text(tmp / "summary.md", summary_table(summary))
            write_comparison_report(tmp / "report.html", summary, [r for _, _, r in side_by_side], SUMMARY_KEYS,
                                    baseline=BASELINE if baseline else None)
        (tmp / OUTPUT_MARKER).touch()
    return results[next(iter(results))] if len(results) == 1 else results


def _write_results(folder: Path, tally: PredictorTally, run_dir, data, baseline=None) -> dict:
    """metrics.json and report.html of one predictor; `baseline`: (tally, metrics) of the baseline."""
    metrics = tally.metrics()
    metrics["run"], metrics["data"] = str(Path(run_dir).resolve()), str(Path(data).resolve())
    base_curves = None
    if baseline is not None:
        base_tally, base_metrics = baseline
        metrics["baseline"] = {k: v for k, v in base_metrics.items() if k != "per_case"}
        metrics["gain_over_baseline"] = {k: relative_gain(metrics[k], base_metrics[k]) for k in GAIN_KEYS}
        base_dice = {row["case_id"]: row["dice"] for row in base_metrics["per_case"]}
        for row in metrics["per_case"]:
            row["baseline_dice"] = base_dice.get(row["case_id"])
        base_curves = base_tally.voxels.curves()
    write_text(folder / "metrics.json", json.dumps(_jsonable(metrics), indent=1))
    overlays = []
    for dice, case_id, view in tally.views:
        if view is not None:
            view.dice = dice
            overlays.append(view)
    overlays.sort(key=lambda v: -v.dice)
    scalars = {k: v for k, v in metrics.items() if k != "per_case"}
    write_report(folder / "report.html", scalars, tally.voxels.curves(), metrics["per_case"], overlays,
                 title=f"anomaseg evaluation: {metrics['predictor']}",
                 baseline=None if baseline is None else (metrics["baseline"], base_curves), compare_keys=SUMMARY_KEYS)
    return metrics


GAIN_KEYS = ["pixel_auprc", "dice_best"]


def relative_gain(value, reference) -> float:
    """(value - reference) / reference: +0.15 = 15% above the reference; NaN where undefined."""
    if value is None or reference is None or not math.isfinite(value) or not math.isfinite(reference) or reference <= 0:
        return math.nan
    return value / reference - 1.0


def baseline_line(metrics: dict) -> str | None:
    """One line: the predictor's AUPRC and best Dice against the intensity baseline's."""
    base = metrics.get("baseline")
    if not base:
        return None
    parts, wins = [], []
    for key, label in (("pixel_auprc", "AUPRC"), ("dice_best", "best Dice")):
        gain = relative_gain(metrics[key], base[key])
        parts.append(f"{label} {metrics[key]:.3f} vs {base[key]:.3f} ({gain:+.0%})" if math.isfinite(gain)
                     else f"{label} {metrics[key]:.3f} vs {base[key]:.3f}")
        wins.append(metrics[key] > base[key])
    verdict = ("beats the baseline" if all(wins) else "loses to the baseline" if not any(wins)
               else "mixed against the baseline")
    return (f"{metrics['predictor']} vs the intensity baseline: {', '.join(parts)}: {verdict}")


def summary_table(summary: dict) -> str:
    keys = SUMMARY_KEYS
    lines = ["| predictor | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in summary.items():
        label = f"{name} (baseline)" if name == BASELINE else name
        lines.append(f"| {label} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    """NaN -> null so metrics.json stays strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return obj
