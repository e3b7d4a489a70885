"""Run `anomaseg` commands in real, separate processes, started quickly.

Processes are forked from a forkserver that imported torch and Lightning once, so a run costs its
work and not a 5 s interpreter start. `run_ranks` starts one process per rank with the variables a
cluster launcher (torchrun, SLURM) would set, so Fabric joins them instead of starting its own.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket

import pytest

_CONTEXT = None


def fork_context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["anomaseg.cli", "anomaseg.training", "anomaseg.scoring", "lightning.fabric"])
    return _CONTEXT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(argv, env):
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    from anomaseg.cli import main

    raise SystemExit(main(argv))


def _env(cache, kill_at) -> dict:
    return {"ANOMASEG_CACHE": str(cache), "ANOMASEG_TEST_KILL_AT": kill_at, "LOCAL_RANK": None,
            "NODE_RANK": None, "MASTER_ADDR": None, "MASTER_PORT": None, "WORLD_SIZE": None}


def _join(procs, argv, timeout=300) -> list[int]:
    for p in procs:
        p.join(timeout=timeout)
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
        pytest.fail(f"anomaseg {' '.join(argv)} did not finish")
    return [p.exitcode for p in procs]


def run_cli(argv, cache, kill_at=None) -> int:
    """Exit code of `anomaseg *argv` in a fresh process (-9: it SIGKILLed itself)."""
    proc = fork_context().Process(target=_run_cli, args=(argv, _env(cache, kill_at)))
    proc.start()
    return _join([proc], argv)[0]


def run_ranks(argv, ranks: int, cache, kill_at=None) -> list[int]:
    """Exit codes of `anomaseg *argv` run as `ranks` processes of one multi-process run, started
    the way torchrun starts them (argv must ask for `--devices ranks`)."""
    port = str(free_port())
    procs = []
    for r in range(ranks):
        env = {**_env(cache, kill_at), "LOCAL_RANK": str(r), "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        procs.append(fork_context().Process(target=_run_cli, args=(argv, env)))
        procs[-1].start()
    return _join(procs, argv)
