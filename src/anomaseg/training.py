"""One training loop for every model, on Lightning Fabric (CPU, one or many GPUs, mixed precision).

Each model supplies its own optimisers and step (`AnomalyModel.make_optimizers`,
`AnomalyModel.training_step`); this loop only feeds batches, re-estimates BatchNorm statistics for
eval mode after each epoch, validates on held-out healthy cases, writes checkpoints atomically and
resumes. Batches come from a per-epoch seeded permutation, so a
run interrupted mid-epoch resumes at the batch after its last checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from anomaseg import config as cfg
from anomaseg.atomic import atomic_path, write_text
from anomaseg.compilation import StepCompiler
from anomaseg.data.layout import find_cases
from anomaseg.data.slices import CaseCache, prepare_cases, training_slices
from anomaseg.errors import InputError
from anomaseg.models import create_model
from anomaseg.models.base import recalibrate_batchnorm
from anomaseg.run import RunPaths, load_checkpoint, load_run_config
from anomaseg.runtime import fabric_precision

CHECKPOINT_SECONDS = 300  # also checkpoint mid-epoch after this long, so long epochs can resume
BN_BATCHES = 32  # training batches used to re-estimate BatchNorm statistics after each epoch
PROGRESS_EVERY = 10  # steps between progress-bar loss updates (each one waits for the device)


def split_cases(case_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole cases (never slices of a training case) for validation and calibration."""
    ids = sorted(case_ids)
    if len(ids) < 2 or val_fraction <= 0:
        return ids, []
    rng = random.Random(seed)
    shuffled = ids[:]
    rng.shuffle(shuffled)
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def cache_for(config: cfg.RunConfig) -> CaseCache:
    folder = config.data.cache_dir
    return CaseCache(CaseCache.default_folder() if folder == "default" else folder)


def scheduled_lr(base: float, schedule: str, step: int, total: int) -> float:
    """Learning rate at a global step. Stateless, so a resumed run continues the same curve."""
    if schedule == "constant" or total <= 0:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def training_memory_format(model, channels_last: bool | str, device: str) -> torch.memory_format:
    """NHWC (channels_last) or NCHW for training: `auto` is NHWC on GPUs, and on CPUs where the model
    says it pays (`AnomalyModel.prefers_channels_last`)."""
    if channels_last == "auto":
        channels_last = device == "cuda" or getattr(model, "prefers_channels_last", True)
    return torch.channels_last if channels_last else torch.contiguous_format


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _save(path: Path, state: dict) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def _sample_grid(images: torch.Tensor, recons: torch.Tensor) -> np.ndarray:
    """Inputs (top row) over reconstructions (bottom row), first channel, anterior up, uint8."""
    def row(t):
        t = t[:, 0].float().clamp(0, 1.5) / 1.5
        return torch.cat([s.T.flip(0) for s in t], dim=1)  # RAS slice (x, y) -> display (y up, x right)
    grid = torch.cat([row(images), row(recons)], dim=0)
    return (grid.numpy() * 255).round().astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


class Trainer:
    """Trains `config.model` on the healthy cases of `config.train_dir` into `run_dir`."""

    def __init__(self, config: cfg.RunConfig, run_dir: str | Path, progress: bool = True,
                 accelerator: str = "auto", devices: int | str = 1):
        self.config = config
        self.paths = RunPaths(Path(run_dir))
        self.progress = progress
        self.accelerator = accelerator
        self.devices = devices

    # ----------------------------------------------------------------------------- set-up
    def _prepare_data(self):
        c = self.config
        if not c.train_dir:
            raise InputError(None, "no training data given (--data)")
        cases = find_cases(c.train_dir, c.data.modalities)
        by_id = {case.case_id: case for case in cases}
        if self.paths.split.exists():
            split = json.loads(self.paths.split.read_text())
        else:
            train_ids, val_ids = split_cases(list(by_id), c.data.val_fraction, c.train.seed)
            split = {"train": train_ids, "val": val_ids}
        missing = [i for i in split["train"] + split["val"] if i not in by_id]
        if missing:
            raise InputError(c.train_dir, f"cases of this run's split are missing: {', '.join(missing[:5])}")
        spec, cache = c.data.slice_spec(), cache_for(c)
        train_cases = prepare_cases([by_id[i] for i in split["train"]], spec, cache, self.progress, "preparing training cases")
        val_cases = prepare_cases([by_id[i] for i in split["val"]], spec, cache, self.progress, "preparing validation cases")
        labelled = [p.case_id for p in train_cases + val_cases if p.truth is not None and p.truth.any()]
        if labelled:
            raise InputError(c.train_dir, f"training data must be healthy, but cases {', '.join(labelled[:3])} "
                                          "have anomalous voxels in their segmentation")
        return split, training_slices(train_cases), (training_slices(val_cases) if val_cases else None)

    # ----------------------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> dict:
        import logging

        from lightning.fabric import Fabric
        from tqdm.auto import tqdm

        for name in ("lightning.fabric", "lightning.pytorch"):  # we print the precision ourselves
            logging.getLogger(name).setLevel(logging.WARNING)

        c, paths = self.config, self.paths
        start_epoch, start_step, state = 0, 0, None
        if paths.last.exists():
            if not resume:
                raise InputError(paths.root, "run folder already holds a training run: pass --resume to "
                                             "continue it, or choose another --out")
            state = load_checkpoint(paths.last)
            start_epoch, start_step = state["epoch"], state.get("step_in_epoch", 0)
        elif resume and not paths.config.exists():
            raise InputError(paths.root, "nothing to resume: no checkpoint in this run folder")

        _seed_all(c.train.seed + start_epoch)
        split, train_x, val_x = self._prepare_data()
        paths.root.mkdir(parents=True, exist_ok=True)
        cfg.save(c, paths.config)
        write_text(paths.split, json.dumps(split, indent=1))

        precision_device = "cuda" if torch.cuda.is_available() and self.accelerator != "cpu" else "cpu"
        precision = fabric_precision(c.train.precision, precision_device)
        fabric = Fabric(accelerator=self.accelerator, devices=self.devices, precision=precision)
        fabric.launch()
        in_channels, size = train_x.shape[1], train_x.shape[-1]
        model = create_model(c.model.name, in_channels=in_channels, image_size=size, **c.model.params)
        hparams = model.hparams
        memory_format = training_memory_format(model, c.train.channels_last, precision_device)
        model = model.to(memory_format=memory_format)
        if state is not None:
            model.load_state_dict(state["model"])
        optimizers = model.make_optimizers(c.train.lr, tuple(c.train.betas))
        names = list(optimizers)
        compiler = StepCompiler(model, c.train.compile, fabric.autocast, fabric.print)
        model, *opts = fabric.setup(model, *optimizers.values())
        optimizers = dict(zip(names, opts))
        if state is not None:  # after setup, so the optimiser state lands on the parameters' device
            for k, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][k])

        history = state["history"] if state else []
        best_val = state["best_val"] if state else math.inf
        bs = min(c.train.batch_size, len(train_x))
        steps = len(train_x) // bs
        if c.train.max_steps_per_epoch:
            steps = min(steps, c.train.max_steps_per_epoch)
        shown = val_x[torch.linspace(0, len(val_x) - 1, min(8, len(val_x))).long()] if val_x is not None else train_x[:8]
        fabric.print(f"training {c.model.name} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
                     f"{len(train_x)} slices of {len(split['train'])} cases, validating on "
                     f"{0 if val_x is None else len(val_x)} slices of {len(split['val'])} held-out cases; "
                     f"precision {precision}")

        def to_batch(t):  # float16 slices travel as they are stored; one conversion, on the device
            return fabric.to_device(t).to(torch.float32, memory_format=memory_format)

        summary = {}
        last_save = time.monotonic()
        for epoch in range(start_epoch, c.train.epochs):
            model.train()
            gen = torch.Generator().manual_seed(c.train.seed * 100_003 + epoch)
            perm = torch.randperm(len(train_x), generator=gen)
            first = start_step if epoch == start_epoch else 0
            sums: dict[str, torch.Tensor | float] = {}  # summed where the logs live: no device sync per step
            t0 = time.perf_counter()
            with tqdm(range(first, steps), desc=f"epoch {epoch + 1}/{c.train.epochs}", unit="batch",
                      disable=not (self.progress and fabric.is_global_zero), leave=False) as bar:
                for step in bar:
                    lr = scheduled_lr(c.train.lr, c.train.lr_schedule, epoch * steps + step, c.train.epochs * steps)
                    for opt in optimizers.values():
                        for group in opt.param_groups:
                            group["lr"] = lr
                    idx = perm[step * bs:(step + 1) * bs][fabric.global_rank::fabric.world_size]
                    x = to_batch(train_x[idx])
                    compiler.before_step(x)
                    started = time.perf_counter()
                    logs = model.training_step(x, optimizers, fabric.backward, fabric.autocast)
                    compiler.after_step(started, (c.train.epochs - epoch) * steps - step - 1)
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + v
                    if not bar.disable and (step - first) % PROGRESS_EVERY == 0:
                        bar.set_postfix(loss=f"{float(logs['loss']):.4g}", refresh=False)
                    if time.monotonic() - last_save > CHECKPOINT_SECONDS and step + 1 < steps:
                        self._checkpoint(fabric, model, optimizers, hparams, epoch, step + 1, history, best_val)
                        last_save = time.monotonic()
            if fabric.device.type == "cuda":  # the epoch's time includes the work still queued on the GPU
                torch.cuda.synchronize(fabric.device)
            seconds = time.perf_counter() - t0
            with compiler.eager():
                self._recalibrate(model, train_x, bs, to_batch, epoch)
            done = max(1, steps - first)
            record = {"epoch": epoch + 1, **{f"train_{k}": float(v) / done for k, v in sums.items()},
                      "slices_per_second": done * bs / seconds}
            if val_x is not None:
                with compiler.eager():
                    record.update({f"val_{k}": v for k, v in self._validate(fabric, model, val_x, bs, to_batch).items()})
            history.append(record)
            val_loss = record.get("val_loss", record.get("train_loss", math.inf))
            improved = val_loss < best_val
            best_val = min(best_val, val_loss)
            self._checkpoint(fabric, model, optimizers, hparams, epoch + 1, 0, history, best_val, best=improved)
            last_save = time.monotonic()
            if fabric.is_global_zero:
                write_text(paths.history, json.dumps(history, indent=1))
                with compiler.eager():
                    self._write_samples(model, shown, to_batch, epoch + 1)
            fabric.print(f"epoch {epoch + 1}/{c.train.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in record.items() if k != "epoch") + (" (best)" if improved else ""))
            summary = record
        return {"history": history, "best_val_loss": best_val, **summary}

    def _recalibrate(self, model, train_x, bs, to_batch, epoch) -> None:
        """Precise BatchNorm statistics for eval mode (see `recalibrate_batchnorm`), from up to
        BN_BATCHES training batches, before validating and checkpointing."""
        gen = torch.Generator().manual_seed(self.config.train.seed * 7919 + epoch)
        idx = torch.randperm(len(train_x), generator=gen)[:BN_BATCHES * bs]
        recalibrate_batchnorm(model, (to_batch(train_x[idx[i:i + bs]]) for i in range(0, len(idx), bs)))

    @torch.no_grad()
    def _validate(self, fabric, model, val_x, bs, to_batch) -> dict[str, float]:
        model.eval()
        sums: dict[str, float] = {}
        n = 0
        for i in range(0, len(val_x), bs):
            x = to_batch(val_x[i:i + bs])
            with fabric.autocast():
                losses = model.validation_losses(x)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v * len(x)
            n += len(x)
        model.train()
        return {k: v / n for k, v in sums.items()}

    def _checkpoint(self, fabric, model, optimizers, hparams, epoch, step, history, best_val, best=False):
        if not fabric.is_global_zero:
            return
        state = {"hparams": hparams, "model": model.state_dict(), "epoch": epoch, "step_in_epoch": step,
                 "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                 "history": history, "best_val": best_val, "config": self.config.to_dict()}
        self.paths.last.parent.mkdir(parents=True, exist_ok=True)
        _save(self.paths.last, state)
        if best:
            _save(self.paths.best, {k: state[k] for k in ("hparams", "model", "epoch", "best_val", "config")})

    @torch.no_grad()
    def _write_samples(self, model, shown, to_batch, epoch):
        model.eval()
        recon = model(to_batch(shown)).recon.float().cpu()  # the Fabric wrapper's forward autocasts
        model.train()
        _write_png(self.paths.samples / f"epoch_{epoch:03d}.png", _sample_grid(shown.float(), recon))


def train(config: cfg.RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          epochs: int | None = None) -> dict:
    """Train (or resume) a run. On resume the run's own config.yaml is used; `epochs` may extend it."""
    if resume and RunPaths(Path(run_dir)).config.exists():
        config = load_run_config(run_dir)
    if epochs is not None:
        config.train.epochs = epochs
    return Trainer(config, run_dir, progress=progress).fit(resume=resume)
