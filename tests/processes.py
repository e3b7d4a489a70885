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
    # A process started by a forkserver makes forkserver its default start method, so the command's
    # DataLoader workers would start a forkserver of their own, orphaned when a test kills the run.
    # The command started from a shell has the platform's default: give it that.
    mp.set_start_method(None, force=True)
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


# Every process the suite starts inherits this variable (set by conftest before any test runs), so
# `leftover_processes` also finds orphans whose parent died and which were re-parented to init.
SESSION_MARKER = "ANOMASEG_TEST_SESSION"


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def leftover_processes() -> dict[int, str]:
    """pid -> command line of every live process but this one that carries this session's marker."""
    entry = f"{SESSION_MARKER}={os.environ.get(SESSION_MARKER, '')}".encode()
    if not os.environ.get(SESSION_MARKER) or not os.path.isdir("/proc"):
        return {}
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and _environ_has(int(name), entry):
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":  # a zombie has ended; its parent reaps it
                    continue
            found[int(name)] = _cmdline(int(name))
    return found


def _stop_in_time(stop, timeout: float) -> None:
    """Call a helper's `_stop` (which waits for the helper to exit) without hanging the run."""
    import threading

    def call():
        try:
            stop()
        except (OSError, ChildProcessError):
            pass

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)


def processes_left_after(grace_s: float = 15.0) -> dict[int, str]:
    """The suite's processes still alive `grace_s` seconds after its multiprocessing helpers were
    told to stop (those found are then killed, so a failing check leaves nothing behind either).

    multiprocessing keeps a forkserver and a resource tracker for the parent's lifetime; they would
    exit once pytest has exited, after any check could run, so they are stopped first (`_stop` is
    the stdlib's own hook; there is no public one). The resource tracker is stopped last: it exits
    when every process holding its pipe has, and an orphan (e.g. a forkserver that a worker started)
    holds it, so waiting for it before the orphans are killed would hang the run."""
    import signal
    import time
    from multiprocessing import forkserver, resource_tracker

    server = getattr(forkserver, "_forkserver", None)
    if getattr(server, "_stop", None):
        _stop_in_time(server._stop, grace_s)
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    tracker_pid = getattr(tracker, "_pid", None)
    deadline = time.monotonic() + grace_s
    while (left := {p: c for p, c in leftover_processes().items() if p != tracker_pid}) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if getattr(tracker, "_stop", None):
        _stop_in_time(tracker._stop, grace_s)
    if tracker_pid is not None and tracker_pid in leftover_processes():
        left[tracker_pid] = _cmdline(tracker_pid)
        os.kill(tracker_pid, signal.SIGKILL)
    return left
