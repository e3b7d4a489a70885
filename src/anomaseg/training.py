"""One training loop for every model, on Lightning Fabric (CPU, one or many GPUs, mixed precision).

Each model supplies its own optimisers and step (`AnomalyModel.make_optimizers`,
`AnomalyModel.training_step`); this loop only feeds batches, re-estimates BatchNorm statistics for
eval mode after each epoch, validates on held-out healthy cases, writes checkpoints atomically and
resumes.

Kill anywhere, resume to the same result. A run killed at any moment and continued with
`--resume` ends with the same weights, history (but for the wall-clock `slices_per_second`) and
calibration as an uninterrupted run of the same seed, bit for bit on the CPU in fp32, because:

- every random draw is a pure function of (seed, phase, epoch, step, rank): before each training
  step, BatchNorm re-estimation, validation and sample rendering, the torch, numpy and python
  generators (and any `torch.Generator` a model keeps as an attribute) are re-seeded from those
  numbers (`seed_phase`), so a resumed process draws what the uninterrupted one drew, with no RNG
  state to save; batches come from a per-epoch seeded permutation;
- mid-epoch checkpoints (every `train.checkpoint_every_steps` steps, else every CHECKPOINT_SECONDS)
  store the step reached and the epoch's running loss sums, so the resumed epoch continues at the
  next batch and its history record averages over the whole epoch;
- an epoch ends in a fixed order, each step repeatable: history.json and the sample PNG, then
  best.pt, then last.pt (the commit point); a kill before last.pt redoes the epoch's end from the
  previous checkpoint and rewrites the same files;
- checkpoints are written under a temporary name and renamed; the replaced last.pt is kept as
  last.prev.pt and resume falls back to it if last.pt is damaged (`run.load_resume_checkpoint`).

Stopped on request: SIGTERM and SIGUSR1 (a scheduler's preemption or time-limit warning) write a
mid-epoch checkpoint at the next step boundary and raise `errors.Stopped` (`StopSignals`); the CLI
exits 128 + the signal's number. `--resume` with no checkpoint starts the run, so a requeued job
repeats one command.

Not bit for bit: a run whose CPU thread count differs or changes (reductions split differently):
`train.threads: auto` lowers and raises it with other work on the machine, so runs that must match
pin it (`--threads N`, kept on resume; the count used is in each history record);
a run resumed on another number of processes (another split of each batch);
and, untested, a run whose training step `torch.compile` compiles (`train.compile` on, or auto on
long runs): compiled kernels round differently from eager ones, so the steps an uninterrupted auto
run times eagerly before deciding differ; a resumed auto run keeps the decision its checkpoint
records (`resumed_compile_mode`) instead of timing eager steps again.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from anomaseg import config as cfg
from anomaseg import distributed, threads
from anomaseg.atomic import output_lock, write_text
from anomaseg.calibration import calibrate
from anomaseg.compilation import StepCompiler, compile_mode
from anomaseg.data.layout import find_cases
from anomaseg.data.splits import split_cases
from anomaseg.data import store
from anomaseg.data.patches import centre_crops, random_brain_crops
from anomaseg.data.slices import CaseCache
from anomaseg.errors import InputError
from anomaseg.models import create_model
from anomaseg.faults import kill_point
from anomaseg.models.base import recalibrate_batchnorm
from anomaseg.run import RunPaths, load_resume_checkpoint, load_run_config, save_checkpoint, weights_digest
from anomaseg.runtime import fabric_precision
from anomaseg.sample_images import sample_grid, write_png
from anomaseg.scorer import Scorer
from anomaseg.seeding import seed_all, seed_phase
from anomaseg.stop_signals import TIMED_CHECKPOINT_SYNC_STEPS, StopSignals, stopped_error

CHECKPOINT_SECONDS = 300  # also checkpoint mid-epoch after this long, so long epochs can resume
BN_BATCHES = 32  # training batches used to re-estimate BatchNorm statistics after each epoch
PROGRESS_EVERY = 10  # steps between progress-bar loss updates (each one waits for the device)


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


class Trainer:
    """Trains `config.model` on the healthy cases of `config.train_dir` into `run_dir`.

    With several processes (`train.devices` x `train.num_nodes`, Fabric's "ddp" launch), every
    process trains on its share of each global batch (`train.batch_size`), gradients are averaged at
    each optimiser step (`distributed.AveragedGradients`), and after each epoch every process
    re-estimates the BatchNorm statistics on the same batches and takes rank 0's buffers, so all
    processes hold identical models (checked every epoch). Rank 0 alone writes the run folder.
    """

    def __init__(self, config: cfg.RunConfig, run_dir: str | Path, progress: bool = True,
                 stop: StopSignals | None = None):
        self.config = config
        self.paths = RunPaths(Path(run_dir))
        self.progress = progress
        self.stop = stop or StopSignals()  # not entered: no handlers, never asks to stop

    # ----------------------------------------------------------------------------- set-up
    def _launch(self):
        """Start Fabric: on one machine with devices > 1 it starts the other processes, which run
        the same command line; under torchrun or SLURM they already exist."""
        import logging

        from lightning.fabric import Fabric

        for name in ("lightning.fabric", "lightning.pytorch"):  # we print the precision ourselves
            logging.getLogger(name).setLevel(logging.WARNING)
        t = self.config.train
        on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
        self.precision = fabric_precision(t.precision, "cuda" if on_gpu else "cpu")
        several = t.devices * t.num_nodes > 1
        strategy = "ddp" if several or t.strategy == "ddp" else "auto"
        fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
                        precision=self.precision)
        fabric.launch()
        return fabric

    def _prepare_data(self, processes_per_machine: int = 1):
        """The split and the training / validation slices (`data.store`: in memory, or a slice store
        on disk for large sets). Cases are prepared one at a time, so memory holds one case."""
        c = self.config
        if not c.train_dir:
            raise InputError(None, "no training data given (--data)")
        cases = find_cases(c.train_dir, c.data.modalities, bids=c.data.bids_query())
        by_id = {case.case_id: case for case in cases}
        if self.paths.split.exists():
            split = json.loads(self.paths.split.read_text())
        else:
            train_ids, val_ids = split_cases(list(by_id), c.data.val_fraction, c.train.seed)
            split = {"train": train_ids, "val": val_ids}
        missing = [i for i in split["train"] + split["val"] if i not in by_id]
        if missing:
            raise InputError(c.train_dir, f"cases of this run's split are missing: {', '.join(missing[:5])}")
        spec, cache = c.data.slice_spec(), CaseCache.at(c.data.cache_dir)
        train = store.survey([by_id[i] for i in split["train"]], spec, cache, self.progress, "preparing training cases")
        val = store.survey([by_id[i] for i in split["val"]], spec, cache, self.progress, "preparing validation cases")
        labelled = train.anomalous + val.anomalous
        if labelled:
            raise InputError(c.train_dir, f"training data must be healthy, but cases {', '.join(labelled[:3])} "
                                          "have anomalous voxels in their segmentation")
        if train.n == 0:
            raise InputError(c.train_dir, "no training slices: every slice has too little brain (see data.min_brain_fraction)")
        mode = store.choose_storage(c.data.slice_store, train.nbytes + val.nbytes, processes_per_machine, cache)
        val_x = store.load_slices(val, cache, mode, self.progress) if val.n else None
        return split, store.load_slices(train, cache, mode, self.progress), val_x

    # ----------------------------------------------------------------------------- hooks
    # A subclass trains another network on other data through this same loop (the quality networks
    # of `anomaseg.quality` do): it overrides these two methods. What the slices' channels hold is
    # between the data and the model's training_step.
    def training_data(self, processes_per_machine: int = 1):
        """(split {"train": ids, "val": ids}, training slices, validation slices or None); slices are
        `data.store.SliceSource`s (e.g. `store.InMemorySlices` of a tensor (N, C, S, S))."""
        return self._prepare_data(processes_per_machine)

    def build_model(self, in_channels: int, image_size: int) -> torch.nn.Module:
        c = self.config
        return create_model(c.model.name, in_channels=in_channels, image_size=image_size, **c.model.params)

    def _prepare_data_once(self, fabric):
        """`training_data` on the first process of each machine, then on the others (which read what
        it cached); an input error of the first stops every process with its message."""
        local = max(1, fabric.world_size // self.config.train.num_nodes)  # processes on this machine
        if fabric.world_size == 1:
            return self.training_data()
        result, problem = None, None
        if fabric.local_rank == 0:
            try:
                result = self.training_data(local)
            except InputError as exc:
                problem = (exc.path, exc.problem)
        problems: list = [None] * fabric.world_size
        torch.distributed.all_gather_object(problems, problem)
        first = next((p for p in problems if p is not None), None)
        if first is not None:
            raise InputError(*first)
        return result if result is not None else self.training_data(local)

    def _resume_state(self, resume: bool, announce: bool) -> dict | None:
        """The checkpoint to continue from (None: start afresh); refuses to overwrite a run unasked."""
        paths = self.paths
        if paths.last.exists() or paths.last_previous.exists():
            if not resume:
                raise InputError(paths.root, "run folder already holds a training run: pass --resume to "
                                             "continue it, or choose another --out")
            state, used, error = load_resume_checkpoint(paths)
            if error is not None and announce:
                print(f"warning: {error}; resuming from {used.name} instead")
            return state
        if resume:  # idempotent, as requeue scripts need: an attempt killed before its first checkpoint
            if not self.config.train_dir:
                raise InputError(paths.root, "nothing to resume: no checkpoint in this run folder (give --data "
                                             "to start the run)")
            if announce:
                print(f"{paths.root}: no checkpoint yet (an earlier attempt stopped before writing one): "
                      "starting the run from the beginning")
        return None

    def _setup_model(self, fabric, state, in_channels: int, size: int):
        c = self.config
        seed_all(c.train.seed)  # weight initialisation
        model = self.build_model(in_channels, size)
        self.hparams = model.hparams
        self.memory_format = training_memory_format(model, c.train.channels_last, fabric.device.type)
        model = model.to(memory_format=self.memory_format)
        if state is not None:
            model.load_state_dict(state["model"])
        # The model stays a plain module (no strategy wrapper): every model's own `training_step` runs
        # its forward and backward passes; Fabric supplies devices, precision and the optimisers, and
        # several processes average gradients at each optimiser step (see `distributed`).
        model = fabric.to_device(model)
        distributed.broadcast_([*model.parameters(), *model.buffers()])  # one starting point everywhere
        optimizers = model.make_optimizers(c.train.lr, tuple(c.train.betas))
        self.compiler = StepCompiler(model, resumed_compile_mode(c.train.compile, state), fabric.autocast, fabric.print)
        if state is not None:  # after moving the model, so the optimiser state lands on the parameters' device
            for k, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][k])
        wrapped = fabric.setup_optimizers(*optimizers.values())
        wrapped = wrapped if len(optimizers) > 1 else [wrapped]
        if fabric.world_size > 1:
            wrapped = [distributed.AveragedGradients(o) for o in wrapped]
        return model, dict(zip(optimizers, wrapped))

    # ----------------------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> dict:
        from tqdm.auto import tqdm

        c, paths = self.config, self.paths
        fabric = self._launch()
        rank, world, main = fabric.global_rank, fabric.world_size, fabric.is_global_zero
        self.progress = self.progress and main
        state = self._resume_state(resume, announce=main)
        start_epoch, start_step = (state["epoch"], state.get("step_in_epoch", 0)) if state else (0, 0)
        split, train_x, val_x = self._prepare_data_once(fabric)
        kill_point("data_prepared", rank=rank)
        if main:
            paths.root.mkdir(parents=True, exist_ok=True)
            for stale in paths.last.parent.glob(".*.tmp.pt"):  # a checkpoint write a kill interrupted
                stale.unlink(missing_ok=True)
            cfg.save(c, paths.config)
            write_text(paths.split, json.dumps(split, indent=1))
            if state is not None:  # a kill between history.json and last.pt left a record ahead of the checkpoint
                write_text(paths.history, json.dumps(state["history"], indent=1))

        # a patch run's model is built for its patches (data.patch_size), not for the whole slice
        model, optimizers = self._setup_model(fabric, state, train_x.channels, c.data.patch_size or train_x.size)
        compiler = self.compiler
        history = state["history"] if state else []
        best_val = state["best_val"] if state else math.inf
        bs = min(c.train.batch_size, len(train_x) // world * world)  # the global batch
        steps = len(train_x) // bs
        if c.train.max_steps_per_epoch:
            steps = min(steps, c.train.max_steps_per_epoch)
        shown_from = val_x if val_x is not None else train_x
        shown = shown_from.read(torch.linspace(0, len(shown_from) - 1, min(8, len(shown_from))).long())
        fabric.print(f"training {c.model.name} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
                     f"{len(train_x)} slices of {len(split['train'])} cases, validating on "
                     f"{0 if val_x is None else len(val_x)} slices of {len(split['val'])} held-out cases; "
                     f"precision {self.precision}" + (f"; {world} processes, {bs // world} slices each per batch"
                                                      if world > 1 else ""))
        # CPU threads (anomaseg.threads): the free CPUs, re-checked while one process trains on the
        # CPU; a pinned count is shared by the processes of a machine; else what Lightning gave each
        pin = threads.pinned_count(c.train.threads)
        if fabric.device.type == "cpu" and world == 1:
            governor = threads.start(c.train.threads, fabric.print)
        elif pin is not None:
            governor = threads.start(max(1, pin // max(1, world // c.train.num_nodes)), None)
        else:
            governor = None

        def to_batch(t):  # float16 slices travel as they are stored; one conversion, on the device
            return fabric.to_device(t).to(torch.float32, memory_format=self.memory_format)

        # patch runs (data.patch_size, data/patches.py): training steps and BatchNorm re-estimation see
        # one random brain-centred crop per slice (drawn after seed_phase, so resume repeats them);
        # validation and samples the centre crop, the same every epoch
        patch = c.data.patch_size
        train_batch = (lambda t: random_brain_crops(to_batch(t), patch)) if patch else to_batch
        eval_batch = (lambda t: centre_crops(to_batch(t), patch)) if patch else to_batch

        every = c.train.checkpoint_every_steps
        summary = {}
        self._last_save = time.monotonic()
        for epoch in range(start_epoch, c.train.epochs):
            model.train()
            gen = torch.Generator().manual_seed(c.train.seed * 100_003 + epoch)
            perm = torch.randperm(len(train_x), generator=gen)
            first = start_step if epoch == start_epoch else 0
            sums = distributed.restore_sums(state.get("epoch_sums"), rank, world) if state is not None and first else {}
            t0, threads_at_start = time.perf_counter(), torch.get_num_threads()
            shares = [perm[s * bs:(s + 1) * bs][rank::world].numpy() for s in range(first, steps)]
            loader = store.batches(train_x, shares, c.train.num_workers, pin_memory=fabric.device.type == "cuda")
            with tqdm(range(first, steps), desc=f"epoch {epoch + 1}/{c.train.epochs}", unit="batch",
                      disable=not (self.progress and main), leave=False) as bar:
                for step, batch in zip(bar, loader):
                    seed_phase(c.train.seed, "train", epoch, step, rank, model)
                    lr = scheduled_lr(c.train.lr, c.train.lr_schedule, epoch * steps + step, c.train.epochs * steps)
                    for opt in optimizers.values():
                        for group in opt.param_groups:
                            group["lr"] = lr
                    x = train_batch(batch)
                    compiler.before_step(x)
                    started = time.perf_counter()
                    logs = model.training_step(x, optimizers, fabric.backward, fabric.autocast)
                    compiler.after_step(started, (c.train.epochs - epoch) * steps - step - 1)
                    if governor is not None:
                        governor.step(time.perf_counter() - started)
                    for k, v in logs.items():  # summed where the logs live: no device sync per step
                        sums[k] = sums.get(k, 0.0) + v
                    if not bar.disable and (step - first) % PROGRESS_EVERY == 0:
                        bar.set_postfix(loss=f"{float(logs['loss']):.4g}", refresh=False)
                    kill_point("train_step", epoch=epoch + 1, step=step + 1, rank=rank)
                    signum = self.stop.requested(epoch * steps + step + 1, world)
                    if signum:
                        self._checkpoint(fabric, model, optimizers, epoch, step + 1, history, best_val, epoch_sums=sums)
                        raise stopped_error(signum, epoch + 1, step + 1, paths)
                    if step + 1 < steps and self._checkpoint_due(epoch * steps + step + 1, every, world):
                        self._checkpoint(fabric, model, optimizers, epoch, step + 1, history, best_val, epoch_sums=sums)
            if fabric.device.type == "cuda":  # the epoch's time includes the work still queued on the GPU
                torch.cuda.synchronize(fabric.device)
            seconds = time.perf_counter() - t0
            with compiler.eager():
                self._recalibrate(fabric, model, train_x, bs, train_batch, epoch)
            sums = distributed.mean_over_processes(sums, world)
            record = {"epoch": epoch + 1, **{f"train_{k}": v / steps for k, v in sums.items()},
                      "slices_per_second": (steps - first) * bs / seconds, "threads": torch.get_num_threads()}
            if record["threads"] != threads_at_start:  # a neighbour came or went during the epoch
                record["threads_at_start"] = threads_at_start
            if val_x is not None:
                with compiler.eager():
                    record.update({f"val_{k}": v for k, v in self._validate(fabric, model, val_x, bs, eval_batch, epoch).items()})
            history.append(record)
            val_loss = record.get("val_loss", record.get("train_loss", math.inf))
            improved = val_loss < best_val
            best_val = min(best_val, val_loss)
            if main:
                write_text(paths.history, json.dumps(history, indent=1))
                with compiler.eager():
                    self._write_samples(fabric, model, shown, eval_batch, epoch + 1)
            kill_point("epoch_outputs", epoch=epoch + 1, rank=rank)
            self._checkpoint(fabric, model, optimizers, epoch + 1, 0, history, best_val, best=improved)
            fabric.print(f"epoch {epoch + 1}/{c.train.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in record.items() if k != "epoch") + (" (best)" if improved else ""))
            summary = record
            signum = self.stop.requested(0, world, sync=True) if epoch + 1 < c.train.epochs else None
            if signum:
                raise stopped_error(signum, epoch + 1, 0, paths)
        if world > 1:
            fabric.barrier()
        return {"history": history, "best_val_loss": best_val, "global_rank": rank, **summary}

    def _checkpoint_due(self, global_step: int, every: int | None, world: int) -> bool:
        if every:
            return global_step % every == 0
        due = time.monotonic() - self._last_save > CHECKPOINT_SECONDS
        if world == 1:
            return due
        if global_step % TIMED_CHECKPOINT_SYNC_STEPS:  # processes agree on rank 0's clock now and then
            return False
        flag = torch.tensor([float(due)])
        distributed.broadcast_([flag])
        return bool(flag.item())

    def _recalibrate(self, fabric, model, train_x, bs, to_batch, epoch) -> None:
        """Precise BatchNorm statistics for eval mode (see `recalibrate_batchnorm`), from up to
        BN_BATCHES training batches, before validating and checkpointing. Every process uses the same
        batches, then all take rank 0's buffers (also those of layers the pass does not reach, e.g. a
        discriminator's), so the model is the same everywhere (checked)."""
        seed_phase(self.config.train.seed, "bn", epoch, model=model)
        gen = torch.Generator().manual_seed(self.config.train.seed * 7919 + epoch)
        idx = torch.randperm(len(train_x), generator=gen)[:BN_BATCHES * bs]

        def batches():
            for n, i in enumerate(range(0, len(idx), bs)):
                if n == 1:
                    kill_point("bn_recalibration", epoch=epoch + 1, rank=fabric.global_rank)
                yield to_batch(train_x.read(idx[i:i + bs]))

        recalibrate_batchnorm(model, batches())
        if fabric.world_size > 1:
            distributed.broadcast_(list(model.buffers()))
            odd = distributed.disagreeing_ranks(weights_digest(model.state_dict()))
            if odd:
                raise RuntimeError(f"after epoch {epoch + 1}, processes {odd} hold another model than rank 0")

    @torch.no_grad()
    def _validate(self, fabric, model, val_x, bs, to_batch, epoch) -> dict[str, float]:
        """Validation losses averaged over the held-out slices. Every process validates all of them
        (the models are identical, so are the results): no communication, and a validation loss
        that does not depend on the number of processes."""
        seed_phase(self.config.train.seed, "validation", epoch, model=model)
        model.eval()
        sums: dict[str, float] = {}
        for i in range(0, len(val_x), bs):
            x = to_batch(val_x.read(np.arange(i, min(i + bs, len(val_x)))))
            with fabric.autocast():
                losses = model.validation_losses(x)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v * len(x)
            kill_point("validation", epoch=epoch + 1, rank=fabric.global_rank)
        model.train()
        return {k: v / len(val_x) for k, v in sums.items()}

    def _checkpoint(self, fabric, model, optimizers, epoch, step, history, best_val, best=False,
                    epoch_sums=None):
        """best.pt (when improved) before last.pt: last.pt is the commit point of an epoch. Every
        process calls it (the epoch's running sums of all processes go into mid-epoch checkpoints)."""
        sums = distributed.gather_sums(epoch_sums or {}, fabric.world_size)
        self._last_save = time.monotonic()
        if not fabric.is_global_zero:
            return
        state = {"hparams": self.hparams, "model": model.state_dict(), "epoch": epoch, "step_in_epoch": step,
                 "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                 "history": history, "best_val": best_val, "config": self.config.to_dict(),
                 "epoch_sums": sums, "world_size": fabric.world_size, "compiled": compile_decision(self.compiler)}
        self.paths.last.parent.mkdir(parents=True, exist_ok=True)
        if best:
            save_checkpoint(self.paths.best, {k: state[k] for k in ("hparams", "model", "epoch", "best_val", "config")})
        save_checkpoint(self.paths.last, state, keep_previous=True)

    @torch.no_grad()
    def _write_samples(self, fabric, model, shown, to_batch, epoch):
        seed_phase(self.config.train.seed, "samples", epoch, model=model)
        if not getattr(model, "reconstructs", True):  # a regressor (quality REG-Net) has no samples to show
            return
        model.eval()
        with fabric.autocast():
            x = to_batch(shown)  # a patch run's model sees (and shows) the centre crops
            recon = model(x).recon.float().cpu()
        model.train()
        write_png(self.paths.samples / f"epoch_{epoch:03d}.png", sample_grid(x.float().cpu(), recon))


def compile_decision(compiler: StepCompiler) -> bool | None:
    """Whether the run decided to train compiled (True), eagerly (False), or has not decided (None)."""
    return {"compiled": True, "checking": True, "pending": True, "eager": False}.get(compiler.state)


def resumed_compile_mode(mode, state: dict | None):
    """`train.compile` for a resumed run: an "auto" run keeps the decision it had taken, so it goes
    on with the same (compiled or eager) kernels instead of timing eager steps again."""
    decided = state.get("compiled") if state else None
    if compile_mode(mode) != "auto" or decided is None:
        return mode
    return "on" if decided else "off"


LAUNCH_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "threads")  # how to run, not what to train


def train(config: cfg.RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          epochs: int | None = None, launch: dict | None = None) -> dict:
    """Train (or resume) a run. On resume the run's own config.yaml is used; `epochs` may extend it
    and `launch` ({devices: 2, ...}: LAUNCH_KEYS) may change the processes it runs on.

    With several processes, call this from a script (or `anomaseg train`): on one machine Fabric
    starts the other processes by running the same command line again."""
    if resume and RunPaths(Path(run_dir)).config.exists():
        config = load_run_config(run_dir)
    if epochs is not None:
        if epochs < 1:
            raise InputError(None, f"epochs must be >= 1, got {epochs}")
        config.train.epochs = epochs
    if config.train_dir:  # the run folder must not depend on the working directory
        config.train_dir = str(Path(config.train_dir).absolute())
    if launch:
        unknown = set(launch) - set(LAUNCH_KEYS)
        if unknown:
            raise ValueError(f"launch settings are {LAUNCH_KEYS}, got {sorted(unknown)}")
        d = config.to_dict()
        d["train"].update({k: v for k, v in launch.items() if v is not None})
        config = cfg.RunConfig.from_dict(d)
    with contextlib.nullcontext() if distributed.started_by_launcher() else output_lock(run_dir), \
            StopSignals() as stop:
        return Trainer(config, run_dir, progress=progress, stop=stop).fit(resume=resume)


def train_and_calibrate(config: cfg.RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
                        epochs: int | None = None, launch: dict | None = None) -> tuple[dict, Scorer | None]:
    """Train (or resume) a run (`train`), then fit its scorer on the run's held-out healthy cases
    (`calibration.calibrate`, the "calibration" random stream, so a calibration repeated after a kill
    draws the same). Returns (training summary, fitted Scorer); the Scorer is None in the other
    processes of a multi-process run (rank 0 calibrates). `anomaseg train` and the demo both run this."""
    summary = train(config, run_dir, resume=resume, progress=progress, epochs=epochs, launch=launch)
    if summary["global_rank"] != 0:
        return summary, None
    seed_phase(config.train.seed, "calibration")
    return summary, calibrate(run_dir, progress=progress, force=True)
