"""The end-of-run check finds processes the suite started, also orphans re-parented to init."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from processes import leftover_processes


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid in leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid not in leftover_processes()


def _wait_found(pid: int, timeout: float = 10.0) -> bool:
    # A process caught in the middle of exec shows an empty /proc/<pid>/environ for a moment (the
    # new image's environment is not mapped yet): look again until it has settled.
    deadline = time.monotonic() + timeout
    while pid not in leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid in leftover_processes()


_SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def test_a_running_child_is_found_and_an_ended_one_is_not():
    child = subprocess.Popen(_SLEEPER, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"  # past exec: its environment is in place
        assert child.pid in leftover_processes()
    finally:
        child.kill()
        child.wait()
    assert child.pid not in leftover_processes()


def test_an_orphan_whose_parent_ended_is_found(tmp_path):
    pid_file = tmp_path / "pid"
    # the shell starts a sleeper in the background and exits at once: the sleeper's parent is gone
    subprocess.run(["sh", "-c", f"sleep 60 >/dev/null 2>&1 & echo $! > {pid_file}"], check=True)
    pid = int(pid_file.read_text())
    try:
        assert _wait_found(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)


def test_a_process_outside_the_suite_is_not_counted():
    env = {k: v for k, v in os.environ.items() if k != "ANOMASEG_TEST_SESSION"}
    child = subprocess.Popen(_SLEEPER, env=env, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"
        assert child.pid not in leftover_processes()
    finally:
        child.kill()
        child.wait()
