"""The run folder: what `anomaseg train` writes and `score` / `evaluate` read.

    RUN/config.yaml            resolved configuration (reproduces the run)
    RUN/split.json             which healthy cases were trained on and which were held out
    RUN/checkpoints/last.pt    model + optimiser state at the last epoch end or mid-epoch save (resume)
    RUN/checkpoints/last.prev.pt  the last.pt before it (resume falls back to it if last.pt is damaged)
    RUN/checkpoints/best.pt    model with the lowest validation loss (used for scoring)
    RUN/history.json           per-epoch losses and throughput
    RUN/samples/epoch_NNN.png  held-out slices (top) and their reconstructions (bottom)
    RUN/calibration.json       per predictor: fitted state and the healthy-calibrated threshold
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from anomaseg import config as cfg
from anomaseg.atomic import atomic_path
from anomaseg.errors import InputError
from anomaseg.faults import kill_point
from anomaseg.models import create_model

CHECKPOINT_FORMAT = "anomaseg-checkpoint"
CHECKPOINT_VERSION = 1


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
    def last_previous(self) -> Path:
        return previous_checkpoint(self.last)

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


def previous_checkpoint(path: Path) -> Path:
    """Where `save_checkpoint(..., keep_previous=True)` keeps the file it replaces: last.prev.pt."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def weights_digest(state_dict: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (CPU, no copy)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict, keep_previous: bool = False) -> None:
    """Write a checkpoint atomically (temporary name, fsync, rename), stamped with its format and
    the digest of its weights; with `keep_previous` the file it replaces becomes last.prev.pt."""
    state = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state,
             "weights_sha256": weights_digest(state["model"])}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        kill_point("checkpoint_write", file=path.name, epoch=state.get("epoch"), step=state.get("step_in_epoch"))
        if keep_previous and path.exists():
            os.replace(path, previous_checkpoint(path))


def load_checkpoint(path: Path) -> dict:
    """Read and verify a checkpoint: a truncated, damaged or foreign file raises an InputError naming it.

    Loading uses torch's `weights_only` unpickler, so a foreign file cannot run code on load."""
    if not path.is_file():
        raise InputError(path, "checkpoint not found (has training finished an epoch?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(path, f"checkpoint is truncated, corrupt or not an anomaseg checkpoint "
                               f"({exc.__class__.__name__}: {reason[:200]})") from None
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict) and isinstance(state.get("hparams"), dict)
            and state.get("format", CHECKPOINT_FORMAT) == CHECKPOINT_FORMAT):
        raise InputError(path, "not an anomaseg checkpoint (no model weights and hyper-parameters in it)")
    if state.get("format_version", CHECKPOINT_VERSION) > CHECKPOINT_VERSION:
        raise InputError(path, f"checkpoint format {state['format_version']} was written by a newer anomaseg "
                               f"(this one reads up to {CHECKPOINT_VERSION}); upgrade anomaseg")
    digest = state.get("weights_sha256")  # absent in checkpoints written before checksums existed
    if digest is not None and digest != weights_digest(state["model"]):
        raise InputError(path, "checkpoint is damaged: its weights do not match their checksum")
    return state


def load_resume_checkpoint(paths: RunPaths) -> tuple[dict | None, Path | None, InputError | None]:
    """The checkpoint a resumed run continues from: last.pt, or last.prev.pt when last.pt is missing
    or damaged. Returns (state, its path, the error that made us fall back); (None, None, None)
    when the run has no checkpoint yet. Raises the InputError of last.pt if neither is usable."""
    first_error = None
    for path in (paths.last, paths.last_previous):
        if not path.exists():
            continue
        try:
            return load_checkpoint(path), path, first_error
        except InputError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return None, None, None


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
    """Identifies the scoring checkpoint's version (a calibration is valid for that version only):
    the digest of its weights, so an identical model trained again (or resumed) keeps its calibration."""
    path = scoring_checkpoint(run_dir)
    if not path.exists():
        return "missing"
    try:
        digest = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("weights_sha256")
    except Exception:
        digest = None
    if digest:
        return f"{path.name}:sha256:{digest[:32]}"
    st = path.stat()  # a checkpoint from before digests existed
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


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
