"""Segmentation quality assessment without ground truth: fit on labelled cases, predict Dice.

`fit_quality` builds the candidate pool (given segmentations, completed by perturbations of the
ground truth, `pool.py`), trains REC-Net on the images and their ground truth, then REG-Net for
each requested variant on the pool, all through the project's training loop (`training.py`).
Cases are split by subject (`split_cases`): validation subjects choose the best checkpoints and
nothing else. `QualityAssessor` loads the result and predicts the Dice of any segmentation of a
case from the case's images alone: it strips the case's ground truth before reading it.

    QA/qa.json         configuration, variants, split and pool summary (written last: a QA folder
                       without it is an unfinished fit, continued with --resume)
    QA/pool.json       every candidate of the pool: case, source, true Dice, split
    QA/calibration.json  each variant's recalibration of the predicted Dice, fitted on the validation
                       subjects' pool (`calibration.py`; the identity unless `calibration` names a
                       method); applied by `QualityAssessor.predict`
    QA/unet_candidates/<source>/<case>_segmentation.nii.gz  with `unet_pool`: the cross-fitted U-Nets'
                       candidates (`segmenters.py`), a balanced subset of which joined the pool
    QA/rec/            REC-Net run folder (config.yaml, checkpoints/{last,best}.pt, history.json, samples/)
    QA/reg_<variant>/  REG-Net run folder of each variant
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anomaseg import config as cfg
from anomaseg.atomic import write_text
from anomaseg.data import store
from anomaseg.data.io import Volume, load_volume
from anomaseg.data.cases import Case
from anomaseg.data.layout import find_cases
from anomaseg.data.splits import split_cases
from anomaseg.data.slices import CaseCache, PreparedCase, SliceSpec
from anomaseg.errors import InputError
from anomaseg.metrics import dice_score
from anomaseg.quality.calibration import METHODS as CALIBRATION_METHODS
from anomaseg.quality.calibration import DiceCalibration, load_calibrations, save_calibrations
from anomaseg.quality.candidates import Candidate, check_candidates, find_candidates
from anomaseg.quality.networks import VARIANTS, QualityPipeline, create_network, network_from_checkpoint, volume_dice
from anomaseg.quality.pool import fill_pool
from anomaseg.quality.samples import (assessed_slices, clean_samples, rec_samples, reg_samples, slice_areas,
                                      soft_slices, with_inputs)
from anomaseg.run import load_checkpoint, scoring_checkpoint
from anomaseg.training import Trainer

QA_FILE, POOL_FILE = "qa.json", "pool.json"
FORMAT_VERSION = 1


@dataclass
class QualityConfig:
    """How a QA model is fitted (stored in QA/qa.json)."""

    modalities: list[str] = field(default_factory=lambda: ["flair"])
    image_size: int = 64  # regression of an overlap is coarse work; 128 for very small lesions
    variants: list[str] = field(default_factory=lambda: ["difference"])
    pool_size: int = 24  # candidates per case; perturbations complete what the given ones leave
    rec_epochs: int = 20
    reg_epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    precision: str = "auto"
    rec_params: dict = field(default_factory=dict)  # RECNet keywords, e.g. {base_channels: 16, depth: 3}
    reg_params: dict = field(default_factory=dict)  # REGNet keywords
    max_steps_per_epoch: int | None = None
    compile: str = "auto"  # torch.compile of the training step (train.compile: auto | on | off)
    cache_dir: str | None = "default"
    # recalibration of the predicted Dice on the validation pool: none | isotonic | linear (opt-in: on the
    # phantom it helped in one run and hurt in another with 3 validation subjects; benchmarks/README.md)
    calibration: str = "none"
    unet_pool: bool = False  # add cross-fitted U-Nets' segmentations to the pool (segmenters.py), up to half of it

    def __post_init__(self):
        self.spec()  # validates image size and modalities
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be among {', '.join(VARIANTS)}, got {self.variants}")
        if self.pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {self.pool_size}")
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {self.calibration!r}")

    def spec(self) -> SliceSpec:
        return SliceSpec(tuple(self.modalities), int(self.image_size))

    def cache(self) -> CaseCache:
        return CaseCache(CaseCache.default_folder() if self.cache_dir == "default" else self.cache_dir)

    def run_config(self, network: str, params: dict, epochs: int, data: str | Path) -> cfg.RunConfig:
        return cfg.RunConfig(
            data=cfg.DataConfig(modalities=list(self.modalities), image_size=self.image_size,
                                val_fraction=self.val_fraction, cache_dir=self.cache_dir),
            model=cfg.ModelConfig(name=network, params=dict(params)),
            train=cfg.TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, precision=self.precision,
                                  seed=self.seed, max_steps_per_epoch=self.max_steps_per_epoch,
                                  compile=self.compile),
            train_dir=str(Path(data).resolve()))


class _NetworkTrainer(Trainer):
    """The project's training loop on tensors built here and a quality network."""

    def __init__(self, config: cfg.RunConfig, run_dir: Path, data, in_channels: int, progress: bool):
        super().__init__(config, run_dir, progress=progress)
        self.data, self.net_channels = data, in_channels

    def training_data(self, processes_per_machine: int = 1):
        split, train, val = self.data
        return split, store.InMemorySlices(train), None if val is None else store.InMemorySlices(val)

    def build_model(self, in_channels: int, image_size: int) -> torch.nn.Module:
        c = self.config.model
        return create_network(c.name, in_channels=self.net_channels, image_size=image_size, **c.params)


def _case_rng(seed: int, case_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def strip_truth(case: Case) -> Case:
    """The case without its segmentation file: what QA reads of a case it assesses."""
    return dataclasses.replace(case, seg=None, normal=False)


@dataclass
class _Pool:
    rec: dict = field(default_factory=lambda: {"train": [], "val": []})
    reg: dict = field(default_factory=lambda: {"train": [], "val": []})
    records: list = field(default_factory=list)
    val_cases: list = field(default_factory=list)  # (prepared case, [(segmentation, true Dice)]) of validation subjects


def _build_pool(cases: list[Case], given: dict[str, list[Candidate]], split: dict, config: QualityConfig,
                progress: bool) -> _Pool:
    from tqdm.auto import tqdm

    pool, spec, cache = _Pool(), config.spec(), config.cache()
    part = {cid: name for name, ids in split.items() for cid in ids}
    with tqdm(cases, desc="building the candidate pool", unit="case", disable=not progress, leave=False) as bar:
        for case in bar:
            prepared = cache.get(case, spec)
            ref = load_volume(prepared.reference, header_only=True)
            rng, name = _case_rng(config.seed, case.case_id), part[case.case_id]
            segs = [(c.source, c.load(ref)) for c in given[case.case_id]]
            dices = [dice_score(s, prepared.truth) for _, s in segs]
            image = prepared.geometry.to_volume(prepared.images[:, 0].astype(np.float32))
            for kind, seg, d in fill_pool(prepared.truth, prepared.brain, dices, config.pool_size, rng, image):
                segs.append((f"perturbation:{kind}", seg))
                dices.append(d)
            if name == "val":
                pool.val_cases.append((prepared, [(seg, d) for (_, seg), d in zip(segs, dices)]))
            for (source, seg), d in zip(segs, dices):
                pool.reg[name].append(reg_samples(prepared, seg))
                pool.records.append({"case_id": case.case_id, "source": source, "dice": d, "split": name,
                                     "voxels": int(seg.sum())})
            if segs:
                pool.reg[name].append(clean_samples(prepared, [seg for _, seg in segs]))
            pool.rec[name].append(rec_samples(prepared, rng))
    return pool


def _stack(chunks: list[np.ndarray]) -> torch.Tensor | None:
    chunks = [c for c in chunks if len(c)]
    return torch.from_numpy(np.concatenate(chunks)) if chunks else None


def _check_out(out: Path, resume: bool) -> None:
    if (out / QA_FILE).exists() and not resume:
        raise InputError(out, "folder already holds a fitted QA model; choose another --out")
    if out.exists() and not resume and any(out.iterdir()):
        ours = (out / "rec").exists() or (out / POOL_FILE).exists()
        raise InputError(out, "folder holds an unfinished QA fit: pass --resume to continue it" if ours
                         else "output folder exists and is not empty; choose another --out")
    if resume and not (out / POOL_FILE).exists():
        raise InputError(out, "nothing to resume: no QA fit in this folder")


def fit_quality(data: str | Path, out: str | Path, config: QualityConfig | None = None,
                segmentations: list[str | Path] = (), candidates: list[Candidate] = (),
                resume: bool = False, progress: bool = True) -> "QualityAssessor":
    """Fit REC-Net and REG-Net (each variant of `config.variants`) on the labelled cases of `data`
    and the candidate segmentations of the `segmentations` folders (plus `candidates` given as
    arrays), completing each case's pool by perturbations; returns the fitted assessor. With
    `resume`, an interrupted fit in `out` goes on with its own stored configuration."""
    out = Path(out)
    _check_out(out, resume)
    config = stored_config(out) if resume else (config or QualityConfig())
    cases = find_cases(data, config.modalities, require_seg=True)
    ids = [c.case_id for c in cases]
    given: dict[str, list[Candidate]] = {cid: [] for cid in ids}
    for folder in segmentations:
        for cid, cand in find_candidates(folder, ids).items():
            given[cid].append(cand)
    for cand in candidates:
        if cand.case_id not in given:
            raise InputError(data, f"candidate {cand.source!r} is for case {cand.case_id!r}, which is not in this dataset")
        given[cand.case_id].append(cand)
    check_candidates([c for cs in given.values() for c in cs], {c.case_id: c for c in cases}, config.modalities[0])
    train_ids, val_ids = split_cases(ids, config.val_fraction, config.seed)
    split = {"train": train_ids, "val": val_ids}

    unets = _unet_pool(cases, config, given, progress) if config.unet_pool else {}
    pool = _build_pool(cases, given, split, config, progress)
    reg_train, reg_val = _stack(pool.reg["train"]), _stack(pool.reg["val"])
    if not pool.records or reg_train is None:
        raise InputError(segmentations[0] if segmentations else data,
                         "the candidate pool is empty: no candidate segmentation matches a training case and "
                         "pool_size adds no perturbations")
    out.mkdir(parents=True, exist_ok=True)
    if unets:
        from anomaseg.quality.segmenters import write_candidates

        cache = config.cache()
        refs = {c.case_id: load_volume(cache.get(c, config.spec()).reference, header_only=True) for c in cases}
        write_candidates(unets, refs, out / "unet_candidates")
    write_text(out / POOL_FILE, json.dumps({"config": dataclasses.asdict(config), "split": split,
                                            "candidates": pool.records}, indent=1))

    channels = len(config.modalities)
    rec_dir = out / "rec"
    rec_data = (split, _stack(pool.rec["train"]), _stack(pool.rec["val"]))
    _NetworkTrainer(config.run_config("rec_net", config.rec_params, config.rec_epochs, data), rec_dir, rec_data,
                    channels, progress).fit(resume=(rec_dir / "checkpoints" / "last.pt").exists())
    rec = network_from_checkpoint(load_checkpoint(scoring_checkpoint(rec_dir)))
    for variant in config.variants:
        reg_dir = out / f"reg_{variant}"
        rows = (split, with_inputs(reg_train, channels, variant, rec),
                None if reg_val is None else with_inputs(reg_val, channels, variant, rec))
        x_channels = 2 * channels if variant == "both" else channels
        _NetworkTrainer(config.run_config("reg_net", config.reg_params, config.reg_epochs, data), reg_dir, rows,
                        x_channels, progress).fit(resume=(reg_dir / "checkpoints" / "last.pt").exists())
    regs = {v: network_from_checkpoint(load_checkpoint(scoring_checkpoint(out / f"reg_{v}"))) for v in config.variants}
    raw = QualityAssessor(config, rec, regs, out, calibrations={})
    calibrations, fitted_on = {}, {"split": "val", "cases": [p.case_id for p, _ in pool.val_cases]}
    for variant in config.variants:
        predicted = [raw.predict(p, seg, variant) for p, segs in pool.val_cases for seg, _ in segs]
        true = [d for _, segs in pool.val_cases for _, d in segs]
        calibrations[variant] = DiceCalibration.fit(predicted, true, config.calibration)
        fitted_on[variant] = {"candidates": len(true), "mean_true": float(np.mean(true)) if true else None,
                              "mean_predicted": float(np.mean(predicted)) if predicted else None}
    save_calibrations(out, calibrations, fitted_on)
    dices = np.array([r["dice"] for r in pool.records])
    summary = {"version": FORMAT_VERSION, "config": dataclasses.asdict(config), "variants": list(config.variants),
               "split": split, "data": str(Path(data).resolve()),
               "segmentations": [str(Path(s).resolve()) for s in segmentations],
               "pool": {"candidates": len(dices), "mean_dice": float(dices.mean()),
                        "dice_histogram": np.histogram(dices, bins=10, range=(0, 1))[0].tolist()}}
    write_text(out / QA_FILE, json.dumps(summary, indent=1))
    return QualityAssessor.load(out)


def _unet_pool(cases: list[Case], config: QualityConfig, given: dict, progress: bool) -> dict:
    """Cross-fitted U-Net candidates of every case (`segmenters.unet_candidates`); a subset of each
    case's, balanced over Dice and up to half the pool, joins `given` (source `unet:<net>_p<threshold>`)."""
    from anomaseg.quality.segmenters import balanced_candidates, unet_candidates

    cache, spec = config.cache(), config.spec()
    prepared = [cache.get(c, spec) for c in cases]
    found = unet_candidates(prepared, folds=2, seed=config.seed, progress=progress)
    for p in prepared:
        rng = _case_rng(config.seed + 1, p.case_id)
        for source, seg, _ in balanced_candidates(p.truth, found[p.case_id], config.pool_size // 2, rng):
            given[p.case_id].append(Candidate(p.case_id, f"unet:{source}", array=seg))
    return found


def stored_config(folder: Path) -> QualityConfig:
    """The configuration a QA folder was fitted (or started) with."""
    path = folder / POOL_FILE
    try:
        return QualityConfig(**json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"cannot read the stored QA configuration ({exc})") from None


class QualityAssessor:
    """A fitted QA model: predicts the Dice of a segmentation of a case, without its ground truth."""

    def __init__(self, config: QualityConfig, rec, regs: dict, folder: Path | None = None, meta: dict | None = None,
                 calibrations: dict[str, DiceCalibration] | None = None):
        self.config, self.rec, self.regs, self.folder, self.meta = config, rec, regs, folder, meta or {}
        self.calibrations = calibrations or {}  # variant -> recalibration; none: predictions uncalibrated
        self.default_variant = next(iter(regs))

    @classmethod
    def load(cls, folder: str | Path) -> "QualityAssessor":
        folder = Path(folder)
        path = folder / QA_FILE
        if not path.is_file():
            raise InputError(folder, "not a fitted QA folder (no qa.json): fit one with `anomaseg qa fit`"
                             if folder.is_dir() else "QA folder not found")
        try:
            meta = json.loads(path.read_text())
            config = QualityConfig(**meta["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(path, f"not a valid QA description ({exc})") from None
        rec = network_from_checkpoint(load_checkpoint(scoring_checkpoint(folder / "rec")))
        regs = {v: network_from_checkpoint(load_checkpoint(scoring_checkpoint(folder / f"reg_{v}")))
                for v in meta["variants"]}
        return cls(config, rec, regs, folder, meta, load_calibrations(folder))

    def pipeline(self, variant: str | None = None) -> QualityPipeline:
        variant = variant or self.default_variant
        if variant not in self.regs:
            raise InputError(self.folder, f"QA model has no {variant!r} variant (fitted: {', '.join(self.regs)})")
        return QualityPipeline(self.regs[variant], self.rec, variant).eval()

    def prepare(self, case: Case) -> PreparedCase:
        """The case at this model's slicing, read without its ground truth."""
        return self.config.cache().get(strip_truth(case), self.config.spec())

    def case_inputs(self, prepared: PreparedCase, seg: np.ndarray):
        """(image slices, candidate slices, candidate area per slice, area outside the box), the
        slices being those `assessed_slices` names; float32 tensors, areas in model pixels."""
        seg = np.asarray(seg, bool)
        if seg.shape != prepared.brain.shape:
            raise ValueError(f"segmentation shape {seg.shape} != case shape {prepared.brain.shape}")
        z = assessed_slices(prepared, seg)
        areas, outside = slice_areas(prepared, seg)
        image = torch.from_numpy(prepared.images[z].astype(np.float32))
        s = torch.from_numpy(soft_slices(prepared, seg)[z, None])
        return image, s, torch.from_numpy(areas[z]).float(), outside

    def calibration(self, variant: str | None = None) -> DiceCalibration:
        """The variant's recalibration (the identity for a QA folder fitted without one)."""
        return self.calibrations.get(variant or self.default_variant, DiceCalibration())

    @torch.no_grad()
    def predict(self, prepared: PreparedCase, seg: np.ndarray, variant: str | None = None,
                calibrated: bool = True) -> float:
        """Predicted Dice of `seg` (bool, the case's RAS+ grid) against the case's unknown ground truth;
        recalibrated (QA/calibration.json) unless `calibrated` is False."""
        image, s, areas, outside = self.case_inputs(prepared, seg)
        raw = float(volume_dice(self.pipeline(variant)(image, s), areas, outside))
        return float(self.calibration(variant)(raw)) if calibrated else raw

    def predict_case(self, case: Case, seg: np.ndarray, variant: str | None = None) -> float:
        return self.predict(self.prepare(case), seg, variant)

    def reference(self, prepared: PreparedCase) -> Volume:
        return load_volume(prepared.reference, header_only=True)


def load_assessor(folder: str | Path | None) -> QualityAssessor | None:
    return None if folder is None else QualityAssessor.load(folder)


def with_predicted_dice(row: dict, predicted: float) -> dict:
    """A per-case row with `predicted_dice` placed right after its true `dice` (when it has one)."""
    out = {}
    for key, value in row.items():
        if key != "predicted_dice":
            out[key] = value
        if key == "dice":
            out["predicted_dice"] = predicted
    out.setdefault("predicted_dice", predicted)
    return out


PREDICTION_COLUMNS = ("case_id", "source", "segmentation", "segmented_voxels", "predicted_dice")


def predict_folders(qa: str | Path, data: str | Path, segmentations: list[str | Path], out: str | Path,
                    variant: str | None = None, progress: bool = True) -> list[dict]:
    """Predicted Dice of every segmentation in the `segmentations` folders that matches a case of
    `data`, written to OUT/predictions.json and OUT/predictions.csv. No ground truth is read: the
    cases' segmentation files are stripped before any case is opened."""
    import csv
    import io

    from tqdm.auto import tqdm

    from anomaseg.dataset_job import Dataset, OutputFolder

    output = OutputFolder(out)
    if not segmentations:
        raise InputError(None, "no segmentation folder given (--segmentations)")
    assessor = QualityAssessor.load(qa)
    variant = variant or assessor.default_variant
    assessor.pipeline(variant)  # an unknown variant fails before any work
    cases = [strip_truth(c) for c in Dataset.find(data, assessor.config.modalities).cases]
    ids = [c.case_id for c in cases]
    found = [find_candidates(folder, ids) for folder in segmentations]
    check_candidates([c for f in found for c in f.values()], {c.case_id: c for c in cases}, assessor.config.modalities[0])
    rows, missing = [], []
    with tqdm(cases, desc="assessing segmentations", unit="case", disable=not progress) as bar:
        for case in bar:
            cands = [f[case.case_id] for f in found if case.case_id in f]
            if not cands:
                missing.append(case.case_id)
                continue
            prepared = assessor.prepare(case)
            ref = assessor.reference(prepared)
            for cand in cands:
                seg = cand.load(ref)
                rows.append({"case_id": case.case_id, "source": cand.source, "segmentation": str(cand.path.resolve()),
                             "segmented_voxels": int(seg.sum()),
                             "predicted_dice": assessor.predict(prepared, seg, variant)})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    summary = {"qa": str(Path(qa).resolve()), "variant": variant, "data": str(Path(data).resolve()),
               "segmentations": [str(Path(s).resolve()) for s in segmentations],
               "cases_without_segmentation": missing, "predictions": rows}
    with output.writing() as tmp:
        write_text(tmp / "predictions.json", json.dumps(summary, indent=1))
        write_text(tmp / "predictions.csv", buffer.getvalue())
    return rows
