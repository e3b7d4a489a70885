"""Run configuration: dataclasses with defaults, YAML presets, `--set a.b=value` overrides.

The resolved configuration is saved as RUN/config.yaml with every run; a run is reproduced from it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from anomaseg.data.patches import check_patch_size
from anomaseg.data.slices import SliceSpec
from anomaseg.errors import InputError
from anomaseg.runtime import PRECISIONS


def _at_least(section, *limits: tuple[str, int]) -> None:
    for name, low in limits:
        if getattr(section, name) is not None and getattr(section, name) < low:  # None: chosen for the machine
            raise ValueError(f"{name} must be >= {low}, got {getattr(section, name)}")


@dataclass
class DataConfig:
    modalities: list[str] = field(default_factory=lambda: ["flair"])
    image_size: int = 64  # the default size: benchmarks/README.md, "Defaults"
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    clip_max: float = 2.0
    min_brain_fraction: float = 0.25
    crop_to_brain: bool = True  # crop slices to the brain's in-plane bounding box before resizing
    val_fraction: float = 0.2  # healthy subjects held out (all their cases) for validation and calibration
    cache_dir: str | None = "default"  # "default": $ANOMASEG_CACHE or ~/.cache/anomaseg; null: no cache
    brain_mask: str = "auto"  # cases without a mask file: auto | nonzero | derived | file (data/brainmask.py)
    bids_derivatives: list[str] = field(default_factory=list)  # BIDS training data: pipelines with masks
    bids_select: list[str] = field(default_factory=list)  # BIDS training data: participants.tsv conditions
    slice_store: str = "auto"  # training slices: memory | disk (a .npy in the cache) | auto (disk when large)
    # 0: the model sees whole image_size slices; N: it trains on N x N crops of them and scores them in
    # overlapping N x N windows (data/patches.py), so image_size can be finer than the model's input
    patch_size: int = 0

    def __post_init__(self):
        self.slice_spec()  # validates image size, modalities, percentiles and the brain mask rule early
        check_patch_size(self.patch_size, self.image_size)
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.slice_store not in ("auto", "memory", "disk"):
            raise ValueError(f"slice_store must be auto, memory or disk, got {self.slice_store!r}")

    def bids_query(self):
        from anomaseg.data.bids import BidsQuery

        return BidsQuery(tuple(self.bids_derivatives), tuple(self.bids_select))

    def slice_spec(self) -> SliceSpec:
        return SliceSpec(tuple(self.modalities), int(self.image_size), tuple(self.percentiles),
                         float(self.clip_max), float(self.min_brain_fraction), bool(self.crop_to_brain),
                         self.brain_mask)


@dataclass
class ModelConfig:
    name: str = "spatial_vae"
    params: dict = field(default_factory=dict)  # constructor keywords, e.g. {beta: 4}


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 5e-4
    lr_schedule: str = "cosine"  # cosine: decays to 0 over all steps of the run; constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    precision: str = "auto"  # auto | bf16 | 32 | 16 (GPU only)
    channels_last: bool | str = "auto"  # NHWC tensors; auto: on GPUs, and on CPUs for models where it pays
    compile: bool | str = "auto"  # torch.compile the training forward: auto (when the run is long enough) | on | off
    seed: int = 0
    num_workers: int = 0
    max_steps_per_epoch: int | None = None
    # mid-epoch checkpoints: every this many optimiser steps; null = every 5 minutes (CHECKPOINT_SECONDS)
    checkpoint_every_steps: int | None = None
    # processes (Lightning Fabric): devices per machine x num_nodes machines; batch_size is the global batch
    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto (one process, or ddp for several) | ddp
    # CPU threads: auto (the free CPUs, adapted while training) | N (pinned: bit-identical reruns; anomaseg.threads)
    threads: int | str = "auto"

    def __post_init__(self):
        from anomaseg.threads import parse_setting

        self.threads = parse_setting(self.threads)
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        _at_least(self, ("epochs", 1), ("batch_size", 1), ("num_workers", 0), ("seed", 0))
        if self.max_steps_per_epoch is not None:
            _at_least(self, ("max_steps_per_epoch", 1))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(sorted(PRECISIONS))}, got {self.precision!r}")
        if self.channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last must be true, false or auto, got {self.channels_last!r}")
        from anomaseg.compilation import compile_mode

        compile_mode(self.compile)
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError(f"checkpoint_every_steps must be >= 1 or null, got {self.checkpoint_every_steps}")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.devices < 1 or self.num_nodes < 1:
            raise ValueError(f"devices and num_nodes must be >= 1, got {self.devices} and {self.num_nodes}")
        if self.batch_size % (self.devices * self.num_nodes):
            raise ValueError(f"batch_size {self.batch_size} (the global batch) must be divisible by the "
                             f"{self.devices * self.num_nodes} processes (devices x num_nodes)")


@dataclass
class ScoreConfig:
    # None: the model's own default (`AnomalyModel.default_predictor`: grad_elbo with polarity auto
    # for VAEs with beta <= 0.5, residual with polarity auto otherwise; benchmarks/study_defaults.py),
    # filled in when the config is built, so a run folder's config.yaml names what it used
    predictor: str | None = None
    predictor_params: dict = field(default_factory=dict)
    median_size: int = 5  # 3D median filter of the anomaly map (voxels); 0/1 = off
    erosion: int = 3  # brain mask erosion (voxels) before masking the map; 0 = off
    min_component_size: int = 8  # connected components with fewer voxels are dropped
    healthy_fpr: float = 0.005  # threshold: this fraction of healthy brain voxels is flagged
    batch_size: int | None = None  # scoring batch; None: sized to the machine (inference.inference_batch_size)
    # threshold rule (postprocess.py): voxel_fpr (the healthy_fpr quantile), fp_lesions (threshold and
    # minimum lesion volume fitted to <= healthy_fp_lesions false-positive lesions per healthy case) or
    # hysteresis (voxel_fpr's threshold for extent, components kept where their peak exceeds a second
    # threshold fitted to <= healthy_fp_lesions false-positive lesions per healthy case)
    calibration: str = "hysteresis"  # chosen by benchmarks/study_defaults.py (issue 18; benchmarks/README.md)
    # post-processing sizes: voxels (median_size, min_component_size) or mm (median_mm, min_lesion_ml,
    # from each case's voxel spacing); None: mm under fp_lesions, voxels otherwise
    size_units: str | None = None
    median_mm: float = 3.0  # median window width (mm) per axis; 3 mm: 3 voxels at 1 mm, off at 2 mm
    min_lesion_ml: float = 0.01  # components below this volume are dropped (size_units mm; fitted under fp_lesions)
    healthy_fp_lesions: float = 1.0  # fp_lesions, hysteresis: target mean false-positive lesions per healthy case
    min_lesion_ml_candidates: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.5])

    def __post_init__(self):
        _at_least(self, ("median_size", 0), ("erosion", 0), ("min_component_size", 0), ("batch_size", 1))
        if not 0 < self.healthy_fpr < 1:
            raise ValueError(f"healthy_fpr must be in (0, 1), got {self.healthy_fpr}")
        from anomaseg.postprocess import PostProcessor

        PostProcessor(calibration=self.calibration, size_units=self.size_units, median_mm=self.median_mm,
                      min_lesion_ml=self.min_lesion_ml, healthy_fp_lesions=self.healthy_fp_lesions,
                      min_lesion_ml_candidates=self.min_lesion_ml_candidates)  # its checks, one message


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train_dir: str | None = None  # healthy training data (folder or datalist)

    def __post_init__(self):
        if self.score.predictor is None:
            self.score.predictor, defaults = default_predictor(self.model.name, self.model.params)
            self.score.predictor_params = {**defaults, **self.score.predictor_params}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | Path | None = None) -> "RunConfig":
        return _build(cls, d or {}, source, "")


def _build(cls, values: dict, source, prefix: str):
    if not isinstance(values, dict):
        raise InputError(source, f"config section {prefix.rstrip('.') or 'root'!r} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(source, f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
                                 f"known: {', '.join(prefix + k for k in fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, source, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, source, prefix + name)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise InputError(source, f"config section {prefix.rstrip('.') or 'root'!r}: {exc}") from None


def _coerce(value, hint, source, key: str):
    """Check scalar config values against the field's type (YAML reads 1e-3 as a string)."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t in (int, float) and not isinstance(value, bool):
            try:
                v = t(value) if not isinstance(value, str) else t(float(value))
            except (TypeError, ValueError):
                continue
            if t is int and float(value) != v:
                continue
            return v
        if t is str and isinstance(value, str):
            return value
        if t is str and isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. `precision: 32` in YAML
        container = typing.get_origin(t) or t
        if container is list and isinstance(value, list):
            (item,) = typing.get_args(t) or (object,)
            return value if item is object else [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
        if container is dict and isinstance(value, dict):
            return value
    raise InputError(source, f"config key {key!r} must be of type {hint}, got {value!r}")


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "config file not found")
    if not path.is_file():
        raise InputError(path, "config path is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "config is not a UTF-8 text file") from None
    except OSError as exc:
        raise InputError(path, f"config file cannot be read ({exc.strerror or exc})") from None
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(path, f"config is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise InputError(path, "config must be a YAML mapping")
    return d


def parse_set(items: list[str]) -> dict:
    """['model.params.beta=4', 'train.lr=1e-3'] -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise InputError(None, f"--set expects key=value (key like train.lr), got {item!r}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(None, f"--set {item!r}: {p!r} was set to a value before, not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise InputError(None, f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return out


def resolve(config_file: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    d = RunConfig().to_dict()
    d["score"].update(predictor=None, predictor_params={})  # the model's default, once the model is known
    if config_file:
        d = merge(d, load_yaml(config_file))
    if overrides:
        d = merge(d, overrides)
    return RunConfig.from_dict(d, config_file)


def default_predictor(model: str, params: dict) -> tuple[str, dict]:
    """The predictor (name, parameters) that model `model` built with `params` is scored with when
    the config names none. An unknown model gets the residual: the model check reports the name."""
    from anomaseg.models import model_entry

    try:
        constructor = model_entry(model).constructor
    except KeyError:
        return "residual", {"polarity": "auto"}
    return constructor.default_predictor(params)


def check_model_and_predictor(config: RunConfig) -> None:
    """Build the configured model and predictor once (milliseconds), so that an unknown name or a
    wrong parameter stops the command before any data is read or any epoch is trained."""
    from anomaseg.models import create_model
    from anomaseg.predictors import create_predictor

    try:
        model = create_model(config.model.name, in_channels=len(config.data.modalities),
                             image_size=config.data.image_size, **config.model.params)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(None, f"model: {_message(exc)}") from None
    try:
        predictor = create_predictor(config.score.predictor, **config.score.predictor_params)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(None, f"score.predictor: {_message(exc)}") from None
    if not predictor.supports(model):
        raise InputError(None, f"score.predictor {config.score.predictor!r} needs a model with "
                               f"{', '.join(predictor.requires)}; {config.model.name} has not")


def _message(exc: Exception) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError quotes its text


def save(config: RunConfig, path: str | Path) -> None:
    from anomaseg.atomic import write_text

    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
