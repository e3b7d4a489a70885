"""Fault injection for tests: named points where a process can be made to SIGKILL itself.

    ANOMASEG_TEST_KILL_AT="train_step:epoch=2,step=3"   # kill after step 3 of epoch 2
    ANOMASEG_TEST_KILL_AT="checkpoint_write:file=last.pt"

`kill_point(name, **where)` does nothing unless the variable names `name` and every `key=value` it
gives equals the matching keyword (compared as strings); keys the variable leaves out match
anything. SIGKILL gives the process no chance to clean up, which is what the tests want to prove
harmless. Points used by training (epochs and steps count from 1, as in history.json):

    train_step        after an optimiser step            epoch, step, rank
    bn_recalibration  after the first re-estimation batch   epoch, rank
    validation        after the first validation batch      epoch, rank
    epoch_outputs     after history.json and samples, before the checkpoints   epoch
    checkpoint_write  a checkpoint written under its temporary name, not yet renamed
                      file, epoch, step (the checkpoint's resume position: epochs done, steps done)
    data_prepared     training slices ready, before config.yaml (a run killed in its first seconds)   rank
    calibration       calibration fitted, calibration.json not yet written

`signal=NAME` in the variable sends that signal instead of SIGKILL (`...,signal=TERM` or `USR1`), to
test what the process does with a scheduler's signals (`stop_signals.StopSignals`).
"""

from __future__ import annotations

import os
import signal

ENV = "ANOMASEG_TEST_KILL_AT"


def _parse(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    where = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
    return name.strip(), {k.strip(): v.strip() for k, v in where.items()}


def kill_point(name: str, **where) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, conditions = _parse(spec)
    sent = getattr(signal, f"SIG{conditions.pop('signal', 'KILL')}")
    if target == name and all(str(where.get(k)) == v for k, v in conditions.items()):
        os.kill(os.getpid(), sent)
