import os
import stat

import pytest

from anomaseg.atomic import atomic_dir, atomic_path, write_text


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_written_files_are_not_private(tmp_path):
    write_text(tmp_path / "report.html", "<html></html>")
    mode = stat.S_IMODE(os.stat(tmp_path / "report.html").st_mode)
    assert mode & stat.S_IRGRP or os.umask(os.umask(0)) & stat.S_IRGRP


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyError):
        with atomic_dir(out) as tmp:
            (tmp / "b").write_text("2")
            raise KeyError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_forked_child_does_not_keep_a_killed_parents_output_locked(tmp_path):
    """A command holding an output lock forks a worker (as DataLoader and process pools do) and is
    then killed: the worker lives on, but the same command can take the output again at once."""
    import signal
    import subprocess
    import sys
    import time

    from anomaseg.atomic import output_lock

    out, child_pid = tmp_path / "run", tmp_path / "child.pid"
    code = f"""
import os, signal, time
from anomaseg.atomic import output_lock
with output_lock({str(out)!r}):
    if os.fork() == 0:  # the worker: says it runs (fork handlers done), then works on
        open({str(child_pid)!r} + ".tmp", "w").write(str(os.getpid()))
        os.rename({str(child_pid)!r} + ".tmp", {str(child_pid)!r})
        time.sleep(60)
        os._exit(0)
    while not os.path.exists({str(child_pid)!r}):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    child = int(child_pid.read_text())
    try:
        os.kill(child, 0)  # the forked worker still runs
        with output_lock(out):  # and does not hold the lock
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    break
            time.sleep(0.05)
