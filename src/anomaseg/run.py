"""The run folder: what `anomaseg train` writes and `score` / `evaluate` read.

    RUN/config.yaml            resolved configuration (reproduces the run)
    RUN/split.json             which healthy cases were trained on and which were held out
    RUN/checkpoints/last.pt    model + optimiser state after the last finished epoch (resume)
    RUN/checkpoints/best.pt    model with the lowest validation loss (used for scoring)
    RUN/history.json           per-epoch losses and throughput
    RUN/samples/epoch_NNN.png  held-out slices (top) and their reconstructions (bottom)
    RUN/calibration.json       per predictor: fitted state and the healthy-calibrated threshold
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from anomaseg import config as cfg
from anomaseg.errors import InputError
from anomaseg.models import create_model


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"


def load_run_config(run_dir: str | Path) -> cfg.RunConfig:
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise InputError(paths.root, "run folder not found")
    if not paths.config.is_file():
        raise InputError(paths.root, "not a run folder (no config.yaml): train one with `anomaseg train`")
    try:
        return cfg.RunConfig.from_dict(cfg.load_yaml(paths.config), paths.config)
    except InputError as exc:
        if "unknown config key" not in exc.problem:
            raise
        raise InputError(paths.config, f"{exc.problem} (run folder written by another version of anomaseg?)") from None


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "checkpoint not found (has training finished an epoch?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for damaged files
        raise InputError(path, f"checkpoint is corrupt or unreadable ({exc.__class__.__name__}: {exc})") from None


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    hp = dict(ckpt["hparams"])
    model = create_model(hp.pop("name"), **hp)
    model.load_state_dict(ckpt["model"])
    return model


def scoring_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint scoring uses: the best one (lowest validation loss), else the last."""
    paths = RunPaths(Path(run_dir))
    return paths.best if paths.best.exists() else paths.last


def checkpoint_stamp(run_dir: str | Path) -> str:
    """Identifies the scoring checkpoint's version (a calibration is valid for that version only)."""
    path = scoring_checkpoint(run_dir)
    st = path.stat() if path.exists() else None
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}" if st else "missing"


def load_model(run_dir: str | Path) -> tuple[torch.nn.Module, cfg.RunConfig]:
    """The trained model of a run (eval mode, on the CPU) and the run's configuration."""
    config = load_run_config(run_dir)
    path = scoring_checkpoint(run_dir)
    try:
        model = model_from_checkpoint(load_checkpoint(path))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # unknown model, parameters or weights
        raise InputError(path, "checkpoint does not fit this version of anomaseg's models (written by another "
                               f"version?): {' '.join(str(exc).split())[:300]}") from None
    return model.eval(), config


def load_split(run_dir: str | Path) -> dict:
    path = RunPaths(Path(run_dir)).split
    if not path.is_file():
        raise InputError(path, "run has no split.json")
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"split file is damaged ({exc})") from None
    if not (isinstance(split, dict) and all(isinstance(split.get(k), list) for k in ("train", "val"))):
        raise InputError(path, "split file has no 'train' and 'val' lists (another version of anomaseg?)")
    return split
