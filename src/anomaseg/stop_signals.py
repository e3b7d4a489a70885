"""Stopping a training run on a scheduler's signal, with a checkpoint to resume from."""

from __future__ import annotations

import signal
import threading

import torch

from anomaseg.errors import Stopped
from anomaseg.run import RunPaths

TIMED_CHECKPOINT_SYNC_STEPS = 16  # several processes agree on a timed checkpoint every this many steps


class StopSignals:
    """SIGTERM (preemption, `scancel`, a time limit's end) and SIGUSR1 (SLURM's warning before the
    time limit, `--signal=USR1@90`) ask a run to stop: the handler only notes the signal; the loop
    writes a checkpoint at the next step boundary (or right after an epoch's own checkpoint) and
    raises `errors.Stopped`. With several processes they agree on it every
    TIMED_CHECKPOINT_SYNC_STEPS steps (any process's signal stops all), as for timed checkpoints."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _note(self, signum, frame) -> None:
        self.received = self.received or signum

    def requested(self, global_step: int, world: int, sync: bool = False) -> int | None:
        """The signal to stop on, if one came (agreed by every process)."""
        if world == 1:
            return self.received
        if not sync and global_step % TIMED_CHECKPOINT_SYNC_STEPS:
            return None
        flag = torch.tensor([float(self.received or 0)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def stopped_error(signum: int, epoch: int, steps_done: int, paths: RunPaths) -> Stopped:
    """The error a run stopped by `signum` raises: where it stopped, and that --resume continues it."""
    where = f"after step {steps_done} of epoch {epoch}" if steps_done else f"after epoch {epoch}"
    return Stopped(signum, f"{signal.Signals(signum).name}: stopped {where} with a checkpoint in "
                           f"{paths.last}; the same command with --resume continues the run")
