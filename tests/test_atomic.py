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
