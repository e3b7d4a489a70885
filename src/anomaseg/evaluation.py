"""`anomaseg evaluate`: stream metrics of one or several predictors over a labelled test set.

Per predictor (all of them share one pass over the data: each case is read once):
- voxel metrics over the whole test set, only voxels inside the brain mask count: pixel AUROC,
  pixel AUPRC and the best-possible Dice over thresholds of the post-processed map (Baur et al.'s
  "best Dice"; small-component removal is not applied inside that sweep), from `VoxelMetrics`;
- `dice_at_threshold`: Dice of the actual segmentations (healthy-calibrated threshold, small
  components removed, and under the hysteresis rule the components whose peak stays below its
  second threshold), pooled over all test voxels; per case the same Dice in `per_case`;
- `image_auroc`: slice level; an axial slice with brain is anomalous if it holds a label voxel, and
  its score is the predictor's `score` of the slice (by default the mean of the highest 1% of its
  anomaly map inside the brain; Skip-GANomaly's own image score for that predictor);
- per-volume Dice and AUPRC (mean +- std over the cases with lesions), lesion-wise detection
  (recall, precision, F1, false-positive lesions per case, recall by lesion size), absolute volume
  difference, and a `per_lesion` table, from `lesion_metrics.LesionMetrics`;
- the FROC curve over the threshold sweep (`froc_curve`: lesion sensitivity against false-positive
  lesions per case, components and hits as in the lesion-wise metrics, small components removed as
  in each case's segmentation) and its summary `froc_score` (mean sensitivity at 1/8 ... 8 false
  positives per case) with `froc_sensitivity` per rate, from `lesion_sweep.FrocTally`.

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

from anomaseg import shards
from anomaseg.atomic import write_text
from anomaseg.data import bids as bids_io
from anomaseg.dataset_job import Dataset, OutputFolder
from anomaseg.data.io import load_volume, save_like
from anomaseg.lesion_metrics import LesionMetrics, case_lesions
from anomaseg.lesion_sweep import FrocTally
from anomaseg.metrics import VoxelMetrics, binary_auprc, binary_auroc, dice_score
from anomaseg.quality.assessor import load_assessor, with_predicted_dice
from anomaseg.report import CaseOverlay, SideBySide, write_comparison_report, write_report
from anomaseg.parallel import run_sharded, worker_device
from anomaseg.report_viewer import MAX_VIEWERS, case_slices
from anomaseg.run import checkpoint_stamp, load_run_config
from anomaseg.calibration import resolve_predictors
from anomaseg.scorer import case_spacing
from anomaseg.scoring import ScorerSource, bids_output_info, prepare_one

BASELINE = "intensity"  # the predictor every evaluation is compared with
N_OVERLAYS = 2  # best and worst cases shown in the report
N_SIDE_BY_SIDE = 3  # cases (largest lesions) shown with every predictor's map in the comparison report
TABLE_KEYS = ("per_case", "per_lesion", "froc_curve")  # long lists, kept out of summaries
SUMMARY_KEYS = ["pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold", "image_auroc", "lesion_f1",
                "froc_score"]


@dataclass
class PredictorTally:
    """Everything one predictor accumulates over (a share of) the test set: memory independent of
    its size. Tallies of disjoint shares `merge` exactly (counts add; per-case rows, slice scores and
    overlays are ordered by case id), so N worker processes give the metrics of one, bit for bit."""

    predictor: str  # its name, or the caller's label for one of several settings of it
    threshold: float
    params: dict = field(default_factory=dict)  # the predictor's hyper-parameters
    rule: dict = field(default_factory=dict)  # the threshold rule and what it fitted besides the threshold
    voxels: VoxelMetrics = field(default_factory=VoxelMetrics)
    tp: int = 0
    fp: int = 0
    fn: int = 0
    slices: dict = field(default_factory=dict)  # case id -> (slice scores, slice labels)
    per_case: list = field(default_factory=list)
    views: list = field(default_factory=list)  # (dice, case_id, display arrays) for the report
    lesions: LesionMetrics = field(default_factory=LesionMetrics)
    viewers: list = field(default_factory=list)  # (dice, case_id, CaseSlices): the best and worst cases
    froc: FrocTally = field(default_factory=FrocTally)  # fixed-size histograms and counts; merge adds them

    def add(self, case, smoothed: np.ndarray, scores: np.ndarray, seg: np.ndarray, model,
            min_voxels: int = 1) -> None:
        """Add one case; `min_voxels`: the smallest component its segmentation keeps (for the FROC)."""
        brain, truth = case.brain, case.truth
        self.froc.update(smoothed, brain, truth, min_voxels)
        self.voxels.update(smoothed[brain], truth[brain])
        pred, gt = seg[brain] > 0, truth[brain]
        tp = int(np.count_nonzero(pred & gt))
        fp, fn = int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        zs = brain.any(axis=(0, 1))
        self.slices[case.case_id] = (scores[zs], truth.any(axis=(0, 1))[zs])
        case_metrics = VoxelMetrics(bits=16)
        case_metrics.update(smoothed[brain], gt)
        case_voxels = case_metrics.compute()
        auroc = case_voxels["pixel_auroc"]
        dice = dice_score(pred, gt)
        row = {"case_id": case.case_id, "dice": dice, "pixel_auroc": auroc,
               "lesion_voxels": int(gt.sum()), "predicted_voxels": int(pred.sum()),
               "brain_mask": case.meta.get("brain_mask")}  # file / nonzero / derived (data/brainmask.py)
        spacing = case.meta.get("spacing", (1.0, 1.0, 1.0))
        row.update(self.lesions.update(case_lesions(seg, truth, spacing, case.case_id, brain), dice,
                                       case_voxels["pixel_auprc"]))
        self.per_case.append(row)
        self.viewers.append((dice, case.case_id, _slices(case, smoothed, seg, self.threshold, dice)))
        self._keep_extreme_viewers()
        self.views.append((dice, case.case_id, _display(case, smoothed, seg, model)))
        self._keep_extreme_views()

    def _keep_extreme_views(self) -> None:
        """Only the best and worst cases by (Dice, case id) stay: the same ones in any case order."""
        self.views.sort(key=lambda v: (v[0], v[1]))
        if len(self.views) > 2 * N_OVERLAYS:
            del self.views[N_OVERLAYS:-N_OVERLAYS]

    def _keep_extreme_viewers(self) -> None:
        """Slice viewers of the best and worst cases by (Dice, case id), as for the overlays."""
        self.viewers.sort(key=lambda v: (v[0], v[1]))
        half = MAX_VIEWERS // 2
        if len(self.viewers) > 2 * half:
            del self.viewers[half:-half]

    def merge(self, other: "PredictorTally") -> "PredictorTally":
        """Add the tally of a disjoint share of the cases (another worker's); returns self."""
        if other.predictor != self.predictor:
            raise ValueError(f"cannot merge tallies of {self.predictor!r} and {other.predictor!r}")
        overlap = set(self.slices) & set(other.slices)
        if overlap:
            raise ValueError(f"tallies share cases {sorted(overlap)[:3]}: shares must be disjoint")
        self.voxels.merge(other.voxels)
        self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        self.slices.update(other.slices)
        self.per_case.extend(other.per_case)
        self.views.extend(other.views)
        self._keep_extreme_views()
        self.lesions.merge(other.lesions)
        self.viewers.extend(other.viewers)
        self._keep_extreme_viewers()
        self.froc.merge(other.froc)
        return self

    def metrics(self) -> dict:
        m = self.voxels.compute()
        denom = 2 * self.tp + self.fp + self.fn
        ids = sorted(self.slices)
        scores = np.concatenate([self.slices[i][0] for i in ids])
        labels = np.concatenate([self.slices[i][1] for i in ids])
        two_classes = 0 < labels.sum() < len(labels)
        return {
            "pixel_auroc": m["pixel_auroc"], "pixel_auprc": m["pixel_auprc"],
            "dice_best": m["dice_best"], "dice_best_threshold": m["dice_best_threshold"],
            "dice_at_threshold": 2 * self.tp / denom if denom else 1.0,
            "image_auroc": binary_auroc(scores, labels) if two_classes else math.nan,
            "image_auprc": binary_auprc(scores, labels) if two_classes else math.nan,
            "threshold": self.threshold,
            "threshold_rule": self.rule.get("calibration"), "postprocess_fitted": self.rule.get("fitted", {}),
            "predictor": self.predictor,
            "predictor_params": self.params,
            "n_cases": len(self.per_case), "n_voxels": m["n_voxels"], "n_anomalous_voxels": m["n_positive"],
            "n_slices": int(len(labels)), "n_anomalous_slices": int(labels.sum()),
            **self.lesions.compute(),
            **self.froc.compute(),
            "per_case": sorted(self.per_case, key=lambda row: row["case_id"]),
            "per_lesion": self.lesions.per_lesion(),
            "froc_curve": self.froc.curve(),
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


def _slices(case, smoothed, seg, threshold, dice):
    """Every axial slice of the case at model size, anterior up, encoded for the report's viewer."""
    g = case.geometry

    def show(a):  # (Z, x, y) -> (Z, rows = y flipped, x)
        return np.ascontiguousarray(np.transpose(a, (0, 2, 1))[:, ::-1])

    image = show(case.images[:, 0].astype(np.float32))
    amap = show(g.to_slices(smoothed.astype(np.float32))[:, 0].numpy())
    pred = show(g.to_slices(seg.astype(np.float32), "nearest")[:, 0].numpy() > 0.5)
    truth = show(g.to_slices(case.truth.astype(np.float32), "nearest")[:, 0].numpy() > 0.5)
    return case_slices(case.case_id, dice, image, amap, pred, truth, threshold)


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


@dataclass(frozen=True)
class EvaluationJob:
    """What a worker needs to evaluate its share of the cases (picklable)."""

    run_dir: str
    sources: dict  # predictor name -> ScorerSource, in the order of the reports
    reported: tuple  # the predictors with their own results (the baseline may only join the pass)
    save_maps: bool
    bids_out: tuple | None = None  # (BIDS root, {predictor: sidecar fields}): maps as BIDS derivatives
    qa: str | None = None  # QA model folder: add each segmentation's predicted Dice


def evaluate_shard(rank: int, cases: list, report, job: EvaluationJob, out: Path,
                   scorers: dict | None = None) -> tuple[dict, list]:
    """Tallies of every predictor over `cases` (a worker's share), and the side-by-side rows of the
    cases with the largest lesions; maps written under `out/maps` with `save_maps`."""
    scorers = scorers or {name: src.build(device=worker_device(rank)) for name, src in job.sources.items()}
    config = load_run_config(job.run_dir)
    spec = config.data.slice_spec()
    model = scorers[job.reported[0]].model
    tallies = {name: PredictorTally(name, scorer.post.threshold_, scorer.predictor.get_params(),
                                    {"calibration": scorer.post.calibration, "fitted": scorer.post.fitted_state()})
               for name, scorer in scorers.items()}
    reported = list(job.reported)
    assessor = load_assessor(job.qa)
    side_by_side: list[tuple[int, str, SideBySide]] = []  # (lesion voxels, case id, panel), largest first
    for case in cases:
        report(case.case_id)
        prepared = prepare_one(case, spec, config)
        ref = load_volume(prepared.reference, header_only=True) if job.save_maps else None
        row, to2d = _side_by_side_row(prepared) if len(tallies) > 1 else (None, None)
        qa_case = assessor.prepare(case) if assessor is not None else None  # read without its ground truth
        raw = {}  # predictor maps shared by the labels that differ only in post-processing
        for name, tally in tallies.items():
            scorer = scorers[name]
            key = job.sources[name].maps_key()
            if key not in raw:
                raw[key] = scorer.predict_slices(prepared)
            maps, scores = raw[key]
            smoothed = scorer.smooth_volume(prepared, maps)
            spacing = case_spacing(prepared)
            seg = scorer.post.segment(smoothed, spacing=spacing)
            tally.add(prepared, smoothed, scores, seg, model, scorer.post.min_voxels(spacing))
            if assessor is not None:
                tally.per_case[-1] = with_predicted_dice(tally.per_case[-1], assessor.predict(qa_case, seg > 0))
            if row is not None:
                row.maps[name] = to2d(smoothed)
            if job.save_maps and name in reported:
                sub = out / "maps" / (name if len(reported) > 1 else "")
                if job.bids_out is not None:
                    bids_io.save_case_outputs(sub, Path(job.bids_out[0]), case, ref, smoothed, seg, job.bids_out[1][name])
                else:
                    save_like(ref, smoothed, sub / f"{case.case_id}_anomaly_map.nii.gz", np.float32)
                    save_like(ref, seg, sub / f"{case.case_id}_segmentation.nii.gz", np.uint8)
        if row is not None:
            side_by_side = _largest_lesions(side_by_side + [(int(prepared.truth.sum()), case.case_id, row)])
        report.done()
    return tallies, side_by_side


def _largest_lesions(rows: list) -> list:
    return sorted(rows, key=lambda r: (-r[0], r[1]))[:N_SIDE_BY_SIDE]


def merge_shards(parts: list[tuple[dict, list]]) -> tuple[dict, list]:
    """One (tallies, side-by-side rows) from the workers' (in worker order; the result does not
    depend on how the cases were split)."""
    tallies, side_by_side = parts[0]
    for other_tallies, other_rows in parts[1:]:
        for name, tally in tallies.items():
            tally.merge(other_tallies[name])
        side_by_side = _largest_lesions(side_by_side + other_rows)
    return tallies, side_by_side


def predictor_specs(run_dir, predictors: str | dict | None, predictor_params: dict | None = None) -> dict:
    """{label: (name, params, score overrides or None)} to evaluate. `predictors`: None (the run's
    configured predictor), the command line's 'a,b' / 'all' (labels = names; `predictor_params`
    {name: params}), or a mapping {label: {"name": ..., "params": {...}, "score": {...}}} (one
    predictor under several settings or post-processing rules in one pass; "score" replaces keys of
    the run's `score` section, e.g. {"calibration": "fp_lesions"})."""
    if isinstance(predictors, dict):
        return {label: (spec["name"], dict(spec.get("params") or {}), dict(spec["score"]) if spec.get("score") else None)
                for label, spec in predictors.items()}
    return {name: (name, None if name is None else dict((predictor_params or {}).get(name, {})), None)
            for name in resolve_predictors(run_dir, predictors)}


def evaluate_dataset(run_dir: str | Path, data: str | Path, out_dir: str | Path, predictors: str | dict | None = None,
                     save_maps: bool = False, progress: bool = True, predictor_params: dict | None = None,
                     baseline: bool = True, workers: int = 1, bids=None, qa: str | Path | None = None,
                     shard: tuple[int, int] | None = None) -> dict:
    """Evaluate the run on a labelled test set; returns the metrics of the first predictor (or the
    summary of all). Writes OUT/metrics.json and OUT/report.html (one predictor), or one subfolder
    per predictor plus OUT/summary.json and OUT/report.html (several). `predictors`: see
    `predictor_specs`; `predictor_params` maps a predictor name to its hyper-parameters (e.g.
    {"projection": {"steps": 50}}) for named predictors.
    With `baseline`, the intensity baseline is evaluated in the same pass (module docstring).
    `workers` > 1 splits the cases over that many processes; the results equal those of one.
    On a BIDS dataset (`bids`: its `BidsQuery`), `save_maps` writes OUT/maps[/<predictor>] as a
    BIDS-derivatives dataset (see `data.bids`).
    With `qa` (a folder from `anomaseg qa fit`), every per-case row also gets the `predicted_dice`
    of its segmentation, predicted without the case's ground truth.
    `shard` (index, count): only that share of the cases (`shards.select`), and the state that
    `anomaseg merge` combines exactly with the other shards' (`shards.write_state`)."""
    output = OutputFolder(out_dir)
    qa = None if qa is None else str(Path(qa).resolve())
    load_assessor(qa)  # a bad QA folder fails here, before any work
    run_dir = str(Path(run_dir).resolve())
    config = load_run_config(run_dir)
    dataset = Dataset.find(data, config.data.modalities, require_seg=True, query=bids, shard=shard)
    built = {}  # label -> (source, fitted scorer); calibrated here, once, before any worker starts
    for label, (name, params, score) in predictor_specs(run_dir, predictors, predictor_params).items():
        source = ScorerSource(run_dir, name, params, score=score)
        scorer = source.build(progress)
        built[label or scorer.predictor.name] = (source, scorer)
    reported = list(built)  # the baseline joins the pass, but gets its own results only if asked for
    if baseline and BASELINE not in built:
        source = ScorerSource(run_dir, BASELINE, {})
        built[BASELINE] = (source, source.build(progress))
    if baseline and len(reported) > 1:  # compared side by side: the baseline comes first
        built = {BASELINE: built[BASELINE], **{k: v for k, v in built.items() if k != BASELINE}}
        reported = list(built)
    bids_out = None
    if save_maps and dataset.is_bids:
        bids_out = (dataset.resolved,
                    {name: bids_output_info(run_dir, config, built[name][1]) for name in reported})
    job = EvaluationJob(run_dir, {name: src for name, (src, _) in built.items()}, tuple(reported), save_maps,
                        bids_out, qa)
    with output.writing() as tmp:
        scorers = {name: scorer for name, (_, scorer) in built.items()} if workers <= 1 else None
        parts = run_sharded(evaluate_shard, dataset.cases, workers, (job, tmp, scorers), progress, desc="evaluating")
        tallies, side_by_side = merge_shards(parts)
        if bids_out is not None:
            for name in reported:
                bids_io.write_description(tmp / "maps" / (name if len(reported) > 1 else ""), Path(data),
                                          f"anomaly maps and segmentations ({name})")
        if shard is not None:  # before the results are written (writing them annotates per-case rows)
            shards.write_state(tmp, shards.shard_meta(shard, run_dir, checkpoint_stamp(run_dir), data, dataset.all_ids,
                                                      [c.case_id for c in dataset.cases], tallies, reported, baseline,
                                                      qa), tallies, side_by_side)
        results = write_evaluation(tmp, tallies, side_by_side, reported, baseline, run_dir, data, qa)
    return results[next(iter(results))] if len(results) == 1 else results


def write_evaluation(tmp: Path, tallies: dict, side_by_side: list, reported: list, baseline: bool, run_dir, data,
                     qa=None) -> dict:
    """The results of merged tallies into folder `tmp`: metrics.json and report.html (one reported
    predictor), or a folder per predictor plus summary.json, summary.md and the comparison report.
    `evaluate` and `anomaseg merge` (shards of an array job) both write through here."""
    base = tallies[BASELINE] if baseline else None
    base_metrics = base.metrics() if base is not None else None
    results = {}
    for name in reported:
        folder = tmp if len(reported) == 1 else tmp / name
        results[name] = _write_results(folder, tallies[name], run_dir, data,
                                       None if base is None or name == BASELINE else (base, base_metrics), qa)
    if len(reported) > 1:
        summary = {name: {k: v for k, v in r.items() if k not in TABLE_KEYS} for name, r in results.items()}
        write_text(tmp / "summary.json", json.dumps(_jsonable(summary), indent=1))
        write_text(tmp / "summary.md", summary_table(summary))
        write_comparison_report(tmp / "report.html", summary, [r for _, _, r in side_by_side], SUMMARY_KEYS,
                                baseline=BASELINE if baseline else None)
    return results


def _write_results(folder: Path, tally: PredictorTally, run_dir, data, baseline=None, qa=None) -> dict:
    """metrics.json and report.html of one predictor; `baseline`: (tally, metrics) of the baseline."""
    metrics = tally.metrics()
    metrics["run"], metrics["data"] = str(Path(run_dir).resolve()), str(Path(data).resolve())
    if qa is not None:
        metrics["qa"] = qa
    base_curves = base_froc = None
    if baseline is not None:
        base_tally, base_metrics = baseline
        metrics["baseline"] = {k: v for k, v in base_metrics.items() if k not in TABLE_KEYS}
        metrics["gain_over_baseline"] = {k: relative_gain(metrics[k], base_metrics[k]) for k in GAIN_KEYS}
        base_dice = {row["case_id"]: row["dice"] for row in base_metrics["per_case"]}
        for row in metrics["per_case"]:
            row["baseline_dice"] = base_dice.get(row["case_id"])
        base_curves = base_tally.voxels.curves()
        base_froc = base_metrics["froc_curve"]
    write_text(folder / "metrics.json", json.dumps(_jsonable(metrics), indent=1))
    overlays = []
    for dice, case_id, view in tally.views:
        if view is not None:
            view.dice = dice
            overlays.append(view)
    overlays.sort(key=lambda v: -v.dice)
    scalars = {k: v for k, v in metrics.items() if k not in TABLE_KEYS}
    write_report(folder / "report.html", scalars, tally.voxels.curves(), metrics["per_case"], overlays,
                 title=f"anomaseg evaluation: {metrics['predictor']}",
                 baseline=None if baseline is None else (metrics["baseline"], base_curves), compare_keys=SUMMARY_KEYS,
                 viewers=[v for _, _, v in sorted(tally.viewers, key=lambda v: (-v[0], v[1]))],
                 per_lesion=metrics["per_lesion"], froc=(metrics["froc_curve"], base_froc))
    return metrics


GAIN_KEYS = ["pixel_auprc", "dice_best", "lesion_f1", "froc_score"]


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
    lesions = ""
    if "lesion_f1" in metrics and "lesion_f1" in base:
        lesions = (f"; lesion F1 at the calibrated threshold {_fmt3(metrics['lesion_f1'])} vs "
                   f"{_fmt3(base['lesion_f1'])}, FROC score {_fmt3(metrics.get('froc_score'))} vs "
                   f"{_fmt3(base.get('froc_score'))}")
    return (f"{metrics['predictor']} vs the intensity baseline: {', '.join(parts)}: {verdict}{lesions}")


def _fmt3(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def lesion_summary(metrics: dict) -> str:
    """Lesion-level numbers of one predictor for the command line: F1 (recall / precision) at the
    calibrated threshold, false-positive lesions per case and the FROC score."""
    return (f"lesion F1 {_fmt3(metrics.get('lesion_f1'))} (recall {_fmt3(metrics.get('lesion_recall'))}, "
            f"precision {_fmt3(metrics.get('lesion_precision'))}, "
            f"{_fmt3(metrics.get('false_positive_lesions_per_case'))} false-positive lesions per case), "
            f"FROC score {_fmt3(metrics.get('froc_score'))}")


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
