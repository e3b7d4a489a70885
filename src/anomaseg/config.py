"""Run configuration: dataclasses with defaults, YAML presets, `--set a.b=value` overrides.

The resolved configuration is saved as RUN/config.yaml with every run; a run is reproduced from it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from anomaseg.data.slices import SliceSpec
from anomaseg.errors import InputError


@dataclass
class DataConfig:
    modalities: list[str] = field(default_factory=lambda: ["flair"])
    image_size: int = 128
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    clip_max: float = 2.0
    min_brain_fraction: float = 0.25
    crop_to_brain: bool = True  # crop slices to the brain's in-plane bounding box before resizing
    val_fraction: float = 0.2  # healthy cases held out (whole cases) for validation and calibration
    cache_dir: str | None = "default"  # "default": $ANOMASEG_CACHE or ~/.cache/anomaseg; null: no cache

    def __post_init__(self):
        self.slice_spec()  # validates image size, modalities and percentiles early
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def slice_spec(self) -> SliceSpec:
        return SliceSpec(tuple(self.modalities), int(self.image_size), tuple(self.percentiles),
                         float(self.clip_max), float(self.min_brain_fraction), bool(self.crop_to_brain))


@dataclass
class ModelConfig:
    name: str = "spatial_vae"
    params: dict = field(default_factory=dict)  # constructor keywords, e.g. {beta: 4}


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

    def __post_init__(self):
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last must be true, false or auto, got {self.channels_last!r}")
        from anomaseg.compilation import compile_mode

        compile_mode(self.compile)


@dataclass
class ScoreConfig:
    predictor: str = "residual"
    predictor_params: dict = field(default_factory=dict)
    median_size: int = 5  # 3D median filter of the anomaly map (voxels); 0/1 = off
    erosion: int = 3  # brain mask erosion (voxels) before masking the map; 0 = off
    min_component_size: int = 8  # connected components with fewer voxels are dropped
    healthy_fpr: float = 0.005  # threshold: this fraction of healthy brain voxels is flagged
    batch_size: int | None = None  # scoring batch; None: sized to the machine (inference.inference_batch_size)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train_dir: str | None = None  # healthy training data (folder or datalist)

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
        container = typing.get_origin(t) or t
        if container in (list, dict) and isinstance(value, container):
            return value
    raise InputError(source, f"config key {key!r} must be of type {hint}, got {value!r}")


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        d = yaml.safe_load(path.read_text()) or {}
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
        if not sep or not key:
            raise InputError(None, f"--set expects key=value, got {item!r}")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def resolve(config_file: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    d = RunConfig().to_dict()
    if config_file:
        d = merge(d, load_yaml(config_file))
    if overrides:
        d = merge(d, overrides)
    return RunConfig.from_dict(d, config_file)


def save(config: RunConfig, path: str | Path) -> None:
    from anomaseg.atomic import write_text

    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
