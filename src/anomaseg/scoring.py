"""`anomaseg score`: a run's (or an exported model's) scorer over a dataset, one case at a time.

`score_dataset` writes an anomaly map and a segmentation per case (NIfTI, or TIFF/PNG beside
image inputs, or a BIDS-derivatives dataset for BIDS input) and scores.json; `ScorerSource` says how
a worker process rebuilds the fitted scorer. The scorer itself is `scorer.Scorer`, fitted by
`calibration.calibrate`; `evaluation.evaluate_dataset` is the labelled counterpart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaseg import config as cfg
from anomaseg.atomic import write_text
from anomaseg.calibration import calibrate
from anomaseg.data import bids as bids_io
from anomaseg.data.io import load_volume, save_like
from anomaseg.dataset_job import Dataset, OutputFolder
from anomaseg.data.slices import CaseCache, SliceSpec, prepare_cases
from anomaseg.parallel import run_sharded, worker_device
from anomaseg.run import checkpoint_stamp, load_run_config
from anomaseg.scorer import Scorer, case_spacing


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
    score: dict | None = None  # post-processing settings replacing the run's (`calibration.calibrate`)

    def build(self, progress: bool = False, device: str | None = None) -> Scorer:
        if self.onnx:
            from anomaseg.export import OnnxScorer

            return OnnxScorer(self.onnx)
        return calibrate(self.run_dir, self.predictor, None if self.predictor is None else dict(self.params or {}),
                         progress, device=device, score=self.score)

    def maps_key(self) -> tuple:
        """What the raw maps depend on (not the post-processing `score` overrides): sources with the
        same key predict the same maps of a case."""
        return self.run_dir, self.predictor, repr(sorted((self.params or {}).items())), self.onnx

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

    peak = getattr(scorer.post, "peak_threshold_", None)
    return {"Model": config.model.name, "Predictor": scorer.predictor.name, "Threshold": scorer.post.threshold_,
            "ThresholdRule": scorer.post.calibration, **({"PeakThreshold": peak} if peak is not None else {}),
            "HealthyFalsePositiveRate": config.score.healthy_fpr, "Run": str(Path(run_dir).resolve()),
            "Checkpoint": checkpoint_stamp(run_dir), "AnomasegVersion": __version__}


def score_shard(rank: int, cases: list, report, source: ScorerSource, out: Path, scorer: Scorer | None = None,
                bids_out: tuple | None = None, qa: str | None = None) -> list[dict]:
    """Score `cases` into the folder `out` (a worker's share); rows of scores.json, one per case.
    `bids_out`: (BIDS root, sidecar fields) to write BIDS-derivative outputs instead.
    With `qa` (a QA model folder) each row gets the segmentation's predicted Dice."""
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

    output = OutputFolder(out_dir)
    qa = None if qa is None else str(Path(qa).resolve())
    load_assessor(qa)  # a bad QA folder fails here, before any work
    if onnx is not None:
        source = ScorerSource(onnx=str(Path(onnx).resolve()))
    else:
        params = None if predictor is None else dict((predictor_params or {}).get(predictor, {}))
        source = ScorerSource(str(Path(run_dir).resolve()), predictor, params)
    dataset = Dataset.find(data, source.slice_spec().modalities, query=bids, shard=shard)
    scorer = source.build(progress)  # calibrates once, here, before any worker starts
    bids_out = None
    if dataset.is_bids and onnx is None:
        bids_out = (dataset.resolved, bids_output_info(run_dir, load_run_config(run_dir), scorer))
    with output.writing() as tmp:
        parts = run_sharded(score_shard, dataset.cases, workers,
                            (source, tmp, scorer if workers <= 1 else None, bids_out, qa), progress, desc="scoring")
        rows = sorted((row for part in parts for row in part), key=lambda r: r["case_id"])
        summary = {"run": None if onnx is not None else str(Path(run_dir).resolve()),
                   "onnx": None if onnx is None else str(Path(onnx).resolve()), "data": dataset.resolved,
                   "predictor": scorer.predictor.name, "threshold": scorer.post.threshold_,
                   "threshold_rule": scorer.post.calibration, "postprocess_fitted": scorer.post.fitted_state(),
                   "cases": rows}
        if qa is not None:
            summary["qa"] = qa
        if shard is not None:
            summary["shard"] = list(shard)
        write_text(tmp / "scores.json", json.dumps(summary, indent=1))
        if bids_out is not None:
            bids_io.write_description(tmp, Path(data), "anomaly maps and segmentations")
    return rows
