"""From a trained run to anomaly maps, segmentations and metrics, one case at a time.

`Scorer` runs a predictor over a case's in-domain slices, maps the result back to the case's
voxel grid and post-processes it. `calibrate` fits predictor and threshold on the run's held-out
healthy cases (never on test data) and stores them in RUN/calibration.json; `score_dataset`
writes NIfTI maps and segmentations; `evaluate_dataset` streams metrics over a labelled test set
and writes metrics.json and report.html. Several predictors share one pass over the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anomaseg import config as cfg
from anomaseg.atomic import OUTPUT_MARKER, atomic_dir, check_output_dir, write_text
from anomaseg.data.io import load_volume, save_like
from anomaseg.data.layout import find_cases
from anomaseg.data.slices import CaseCache, PreparedCase, SliceSpec, prepare_cases
from anomaseg.errors import InputError
from anomaseg.inference import inference_batch_size, inference_copy
from anomaseg.faults import kill_point
from anomaseg.parallel import run_sharded, worker_device
from anomaseg.postprocess import PostProcessor
from anomaseg.predictors.base import Predictor, create_predictor, list_predictors
from anomaseg.run import RunPaths, checkpoint_stamp, load_model, load_run_config, load_split
from anomaseg.runtime import autocast, default_device, fabric_precision


def predictor_key(name: str, params: dict) -> str:
    if not params:
        return name
    return name + "(" + ",".join(f"{k}={params[k]}" for k in sorted(params)) + ")"


def make_postprocessor(score: cfg.ScoreConfig) -> PostProcessor:
    return PostProcessor(score.median_size, score.erosion, score.min_component_size, score.healthy_fpr,
                         score.calibration, score.size_units, score.median_mm, score.min_lesion_ml,
                         score.healthy_fp_lesions, score.min_lesion_ml_candidates)


def case_spacing(case: PreparedCase) -> tuple[float, float, float]:
    """The case's voxel size in mm along the axes of its RAS+ arrays."""
    return tuple(case.meta.get("spacing", (1.0, 1.0, 1.0)))


@dataclass
class Scorer:
    """Runs one predictor of a model over prepared cases and post-processes the maps.

    Scoring runs `net`, the model made fast for inference (`inference.inference_copy`: BatchNorm
    folded into the convolutions, channels_last, no parameter gradients), under
    `torch.inference_mode` (predictors that differentiate re-enable autograd for their input), in
    batches sized to the machine's memory (`batch_size=None`). `optimize=False` runs the trained
    model as it is (the reference the fast path is tested against). `model` stays untouched.
    """

    model: torch.nn.Module
    predictor: Predictor
    post: PostProcessor
    batch_size: int | None = None
    device: str = field(default_factory=default_device)
    precision: str = "auto"
    optimize: bool = True

    def __post_init__(self):
        self.model = self.model.to(self.device).eval()
        self._fabric_precision = fabric_precision(self.precision, self.device)
        self.net = inference_copy(self.model, self.device) if self.optimize else self.model

    def _batch_size(self, sample_shape: tuple[int, ...]) -> int:
        if not self.batch_size:
            self.batch_size = inference_batch_size(self.net, sample_shape, self.device)
        return self.batch_size

    def _batches(self, images: np.ndarray):
        size = self._batch_size(images.shape[1:])
        for i in range(0, len(images), size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + size])).float()
            yield x.to(self.device).contiguous(memory_format=torch.channels_last)

    def predict_batch(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, 1, S, S), scores (B,)) of a batch of model-size slices and their brain masks."""
        return self.predictor.predict(self.net, x, mask)

    def predict_slices(self, case: PreparedCase) -> tuple[np.ndarray, np.ndarray]:
        """Raw maps (Z, S, S) at model size and the predictor's score per slice (Z,). Slices outside
        the model's domain get the case's lowest map value and score."""
        shape = (len(case.keep),) + case.images.shape[-2:]
        maps, scores = np.zeros(shape, np.float32), np.zeros(len(case.keep), np.float32)
        kept_maps, kept_scores = [], []
        masks = case.masks[case.keep]
        start = 0
        with torch.inference_mode(), autocast(self.device, self._fabric_precision):
            for x in self._batches(case.images[case.keep]):
                m = torch.from_numpy(masks[start:start + len(x)]).to(self.device)
                start += len(x)
                batch_maps, batch_scores = self.predict_batch(x, m[:, None])
                kept_maps.append(batch_maps[:, 0].float().cpu().numpy())
                kept_scores.append(batch_scores.float().cpu().numpy())
        if kept_maps:
            maps[case.keep], scores[case.keep] = np.concatenate(kept_maps), np.concatenate(kept_scores)
            maps[~case.keep], scores[~case.keep] = maps[case.keep].min(), scores[case.keep].min()
        return maps, scores

    def predict_case(self, case: PreparedCase) -> tuple[np.ndarray, np.ndarray]:
        """Post-processed anomaly map on the case's RAS+ voxel grid, and the score of every slice."""
        maps, scores = self.predict_slices(case)
        return self.post.smooth(case.geometry.to_volume(maps), case.brain, case_spacing(case)), scores

    def smoothed_volume(self, case: PreparedCase) -> np.ndarray:
        """Post-processed anomaly map on the case's RAS+ voxel grid."""
        return self.predict_case(case)[0]

    def fit(self, healthy: list[PreparedCase], progress: bool = False) -> "Scorer":
        """Fit the predictor on healthy slices, then the threshold on their post-processed maps."""
        from tqdm.auto import tqdm

        def batches():
            for c in healthy:
                yield from self._batches(c.images[c.keep])

        with torch.inference_mode(), autocast(self.device, self._fabric_precision):
            self.predictor.fit(self.net, batches())
        with tqdm(healthy, desc=f"calibrating {self.predictor.name}", unit="case", disable=not progress,
                  leave=False) as cases:
            self.post.fit([(self.smoothed_volume(c), c.brain, case_spacing(c)) for c in cases])
        return self


# --------------------------------------------------------------------------- calibration
def calibrate(run_dir: str | Path, predictor: str | None = None, params: dict | None = None,
              progress: bool = True, force: bool = False, device: str | None = None) -> Scorer:
    """A fitted Scorer for a run: read from RUN/calibration.json (if it was fitted for the same
    checkpoint, predictor and post-processing), or fitted on the run's held-out healthy cases and
    stored there."""
    model, config = load_model(run_dir)
    name = predictor or config.score.predictor
    params = dict(config.score.predictor_params if predictor is None else (params or {}))
    key = predictor_key(name, params)
    paths = RunPaths(Path(run_dir))
    store = read_calibration(paths.calibration)
    post_settings = make_postprocessor(config.score)
    pred = _predictor(name, params, config)
    if not pred.supports(model):
        raise InputError(paths.root, f"predictor {name!r} needs a model with {', '.join(pred.requires)}; "
                                     f"{config.model.name} has not")
    scorer = Scorer(model, pred, post_settings, config.score.batch_size, device=device or default_device(),
                    precision=config.train.precision)
    entry = store.get(key)
    stamp = checkpoint_stamp(run_dir)
    if entry and not force and entry.get("postprocess") == vars_of(post_settings) and entry.get("checkpoint") == stamp:
        try:  # an entry of another anomaseg version may not load: it is then fitted again
            pred.load_fitted_state(entry["predictor_state"])
            scorer.post.threshold_ = float(entry["threshold"])
            scorer.post.load_fitted_state(entry.get("postprocess_fitted", {}))
            return scorer
        except (KeyError, TypeError, ValueError, AttributeError):
            pred = _predictor(name, params, config)
            scorer.predictor = pred

    split = load_split(run_dir)
    ids = split["val"] or split["train"]
    if not split["val"]:
        print("warning: the run held out no healthy cases; calibrating on training cases (threshold biased low)")
    try:
        cases = [c for c in find_cases(config.train_dir, config.data.modalities, bids=config.data.bids_query())
                 if c.case_id in set(ids)]
    except InputError as exc:
        raise InputError(paths.calibration, f"has no calibration of {key} for this checkpoint, and it cannot be "
                                            f"fitted: the run's healthy training data is unusable ({exc})") from None
    prepared = prepare_cases(cases, config.data.slice_spec(), CaseCache.at(config.data.cache_dir), progress,
                             "preparing calibration cases")
    scorer.fit(prepared, progress)
    kill_point("calibration")
    store[key] = {"predictor": name, "params": params, "checkpoint": stamp, "predictor_state": pred.fitted_state(),
                  "postprocess": vars_of(post_settings), "threshold": scorer.post.threshold_,
                  "postprocess_fitted": scorer.post.fitted_state(),
                  "healthy_fpr": config.score.healthy_fpr, "calibration_cases": ids,
                  "n_calibration_voxels": scorer.post.n_calibration_voxels_}
    write_text(paths.calibration, json.dumps(store, indent=1))
    return scorer


def _predictor(name: str, params: dict, config: cfg.RunConfig) -> Predictor:
    try:
        return create_predictor(name, **params).set_modalities(config.data.modalities)
    except (KeyError, TypeError, ValueError) as exc:  # an unknown name or parameter
        raise InputError(None, exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)) from None


def read_calibration(path: Path) -> dict:
    """RUN/calibration.json ({} when absent). A damaged file is an error, never silently replaced."""
    if not path.exists():
        return {}
    try:
        store = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"calibration file is damaged ({exc}); delete it and it is fitted again on the "
                               "run's held-out healthy cases") from None
    if not isinstance(store, dict) or not all(isinstance(v, dict) for v in store.values()):
        raise InputError(path, "calibration file is not a map of predictor entries (another version of anomaseg?); "
                               "delete it and it is fitted again on the run's held-out healthy cases")
    return store


def vars_of(post: PostProcessor) -> dict:
    return {k: v for k, v in vars(post).items() if not k.endswith("_")}


def resolve_predictors(run_dir: str | Path, names: str | None) -> list[str]:
    """'residual' / 'residual,grad_kl' / 'all' (every predictor the run's model supports)."""
    if not names:
        return [None]  # the run's configured predictor
    model, _ = load_model(run_dir)
    if names == "all":
        return [n for n in list_predictors() if create_predictor(n).supports(model)]
    out = [n.strip() for n in names.split(",") if n.strip()]
    for n in out:
        if n not in list_predictors():
            raise InputError(None, f"unknown predictor {n!r}; available: {', '.join(list_predictors())}, all")
    return out


# --------------------------------------------------------------------------- outputs
def cases_to_score(run_dir, data, config: cfg.RunConfig, require_seg: bool, bids=None):
    cases = find_cases(data, config.data.modalities, require_seg=require_seg, bids=bids)
    return cases, config.data.slice_spec()


def prepare_one(case, spec: SliceSpec, config):
    return prepare_cases([case], spec, CaseCache.at(config.data.cache_dir), progress=False)[0]


@dataclass(frozen=True)
class ScorerSource:
    """How to build a fitted Scorer, picklable for worker processes: a run folder (+ predictor) or
    an exported ONNX file (`export.OnnxScorer`, which needs no run folder)."""

    run_dir: str | None = None
    predictor: str | None = None
    params: dict | None = None
    onnx: str | None = None

    def build(self, progress: bool = False, device: str | None = None) -> Scorer:
        if self.onnx:
            from anomaseg.export import OnnxScorer

            return OnnxScorer(self.onnx)
        return calibrate(self.run_dir, self.predictor, None if self.predictor is None else dict(self.params or {}),
                         progress, device=device)

    def slice_spec(self) -> SliceSpec:
        if self.onnx:
            from anomaseg.export import read_metadata

            return read_metadata(self.onnx).slice_spec()
        return load_run_config(self.run_dir).data.slice_spec()

    def cache(self) -> CaseCache:
        if self.onnx:
            return CaseCache(CaseCache.default_folder())
        return CaseCache.at(load_run_config(self.run_dir).data.cache_dir)


def bids_output_info(run_dir, config: cfg.RunConfig, scorer: Scorer) -> dict:
    """What the JSON sidecars of BIDS-derivative outputs record."""
    from anomaseg import __version__

    return {"Model": config.model.name, "Predictor": scorer.predictor.name, "Threshold": scorer.post.threshold_,
            "HealthyFalsePositiveRate": config.score.healthy_fpr, "Run": str(Path(run_dir).resolve()),
            "Checkpoint": checkpoint_stamp(run_dir), "AnomasegVersion": __version__}


def score_shard(rank: int, cases: list, report, source: ScorerSource, out: Path, scorer: Scorer | None = None,
                bids_out: tuple | None = None, qa: str | None = None) -> list[dict]:
    """Score `cases` into the folder `out` (a worker's share); rows of scores.json, one per case.
    `bids_out`: (BIDS root, sidecar fields) to write BIDS-derivative outputs instead.
    With `qa` (a QA model folder) each row gets the segmentation's predicted Dice."""
    from anomaseg.data import bids as bids_io
    from anomaseg.quality.assessor import load_assessor

    scorer = scorer or source.build(device=worker_device(rank))
    spec, cache = source.slice_spec(), source.cache()
    assessor = load_assessor(qa)
    rows = []
    for case in cases:
        report(case.case_id)
        prepared = prepare_cases([case], spec, cache, progress=False)[0]
        smoothed = scorer.smoothed_volume(prepared)
        seg = scorer.post.segment(smoothed, spacing=case_spacing(prepared))
        ref = load_volume(prepared.reference, header_only=True)
        if bids_out is not None:
            bids_io.save_case_outputs(out, Path(bids_out[0]), case, ref, smoothed, seg, bids_out[1])
        else:
            save_like(ref, smoothed, out / f"{case.case_id}_anomaly_map.nii.gz", np.float32)
            save_like(ref, seg, out / f"{case.case_id}_segmentation.nii.gz", np.uint8)
        rows.append({"case_id": case.case_id, "anomalous_voxels": int(seg.sum()), "max_anomaly": float(smoothed.max())})
        if assessor is not None:
            rows[-1]["predicted_dice"] = assessor.predict_case(case, seg > 0)
        report.done()
    return rows


def score_dataset(run_dir: str | Path | None, data: str | Path, out_dir: str | Path, predictor: str | None = None,
                  progress: bool = True, predictor_params: dict | None = None, workers: int = 1,
                  onnx: str | Path | None = None, bids=None, qa: str | Path | None = None,
                  shard: tuple[int, int] | None = None) -> list[dict]:
    """Write `<case>_anomaly_map.nii.gz` (float32) and `<case>_segmentation.nii.gz` (uint8) per case,
    on the input's grid, affine and header. The output folder appears only when complete. For a BIDS
    dataset (`bids`: its `BidsQuery`) the output folder is a BIDS-derivatives dataset instead
    (`sub-XX/[ses-YY/]anat/..._desc-anomaly_{map,mask}.nii.gz` + sidecars, see `data.bids`).

    `workers` > 1 splits the cases over that many processes (`parallel.run_sharded`); the outputs
    are the same as with one. `onnx`: score with an exported model (`anomaseg export`) and ONNX
    Runtime instead of a run folder (`run_dir` is then not used). With `qa` (a folder from
    `anomaseg qa fit`) each case also gets the `predicted_dice` of its segmentation. `shard` (index,
    count): only that share of the cases (`shards.select`, for array jobs; scores.json names it)."""
    from anomaseg.quality.assessor import load_assessor

    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    qa = None if qa is None else str(Path(qa).resolve())
    load_assessor(qa)  # a bad QA folder fails here, before any work
    if onnx is not None:
        source = ScorerSource(onnx=str(Path(onnx).resolve()))
    else:
        params = None if predictor is None else dict((predictor_params or {}).get(predictor, {}))
        source = ScorerSource(str(Path(run_dir).resolve()), predictor, params)
    spec = source.slice_spec()
    from anomaseg.data import bids as bids_io

    cases = find_cases(data, spec.modalities, require_seg=False, bids=bids)
    if shard is not None:
        from anomaseg.shards import select

        cases = select(cases, shard)
    scorer = source.build(progress)  # calibrates once, here, before any worker starts
    bids_out = None
    if bids_io.is_bids_root(data) and onnx is None:
        bids_out = (str(Path(data).resolve()), bids_output_info(run_dir, load_run_config(run_dir), scorer))
    with atomic_dir(out_dir) as tmp:
        parts = run_sharded(score_shard, cases, workers,
                            (source, tmp, scorer if workers <= 1 else None, bids_out, qa), progress, desc="scoring")
        rows = sorted((row for part in parts for row in part), key=lambda r: r["case_id"])
        summary = {"run": None if onnx is not None else str(Path(run_dir).resolve()),
                   "onnx": None if onnx is None else str(Path(onnx).resolve()), "data": str(Path(data).resolve()),
                   "predictor": scorer.predictor.name, "threshold": scorer.post.threshold_, "cases": rows}
        if qa is not None:
            summary["qa"] = qa
        if shard is not None:
            summary["shard"] = list(shard)
        write_text(tmp / "scores.json", json.dumps(summary, indent=1))
        if bids_out is not None:
            bids_io.write_description(tmp, Path(data), "anomaly maps and segmentations")
        (tmp / OUTPUT_MARKER).touch()
    return rows
