"""Write outputs under a temporary name and rename, so a failure never leaves a half-written file;
and one writer per output at a time (`output_lock`).

A write that fails (a full disk, a read-only folder) raises OSError naming the final path, never
the temporary one, and leaves what was there before untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from anomaseg.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent writers are not detected there
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    `suffix` is kept on the temporary name (writers such as nibabel choose the format from it).
    """
    path = Path(path)
    make_parent(path)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with _naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming(path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes files private; outputs are ordinary files
            os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """OSErrors raised while writing `path` name `path`, not the temporary file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename) == path:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def make_parent(path: str | Path) -> None:
    """Create the folder that will hold `path`; an InputError when that cannot be (a file is in
    the way, a read-only folder)."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), parent)
        raise InputError(blocker, f"is a file, so {Path(path)} cannot be created inside it") from None
    except OSError as exc:
        raise InputError(parent, f"cannot create this folder ({exc.strerror or exc})") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (which must not hold
    anything we would lose: an existing folder is replaced only after the new one is complete)."""
    path = Path(path)
    with output_lock(path):
        with _naming(path):
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            try:
                yield tmp
            except OSError as exc:  # name the file as it will be called, not its temporary folder
                if exc.filename is None or tmp not in Path(exc.filename).parents:
                    raise
                final = path / Path(exc.filename).relative_to(tmp)
                raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
            with _naming(path):
                os.chmod(tmp, 0o777 & ~_umask())
                if path.exists():
                    old = path.with_name(f".{path.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(path, old)
                    os.replace(tmp, path)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


OUTPUT_MARKER = ".anomaseg-output"  # in every output folder anomaseg writes: it may replace that folder


def check_output_dir(out: str | Path) -> None:
    """Refuse an output folder that is a file, or a non-empty folder anomaseg did not write (we
    replace output folders whole, so a user's folder would be lost)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output exists and is a file, not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / OUTPUT_MARKER).exists():
        raise InputError(out, "output folder exists and was not written by anomaseg; choose another --out")


_held: dict[Path, int] = {}  # locks this process holds (re-entrant: a command may lock, then call a writer that locks)
_lock_fds: dict[Path, int] = {}  # the descriptor holding each of them


def _drop_inherited_locks() -> None:
    """In a child made by fork: close its copies of the parent's lock descriptors. An flock belongs
    to the open file, which a forked child shares, so a child (a DataLoader worker, a process pool
    worker) would otherwise keep the output locked after a killed parent, and the re-run of the
    same command (`--resume`) would be refused as "another command is writing"."""
    for fd in _lock_fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _lock_fds.clear()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_file(path: str | Path) -> Path:
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold the exclusive lock on output `path` (a file or folder) while the block runs: a second
    anomaseg command writing the same output stops at once with an InputError saying so, instead of
    mixing its files with ours. The lock is `flock` on `.NAME.lock` beside the output, so it goes
    away with the process however that ends (no stale locks after a kill); the file is removed on exit."""
    path = Path(path).absolute()
    make_parent(path)
    lock = lock_file(path)
    if fcntl is None or lock in _held:
        _held[lock] = _held.get(lock, 0) + 1
        try:
            yield
        finally:
            _held[lock] -= 1
            if not _held[lock]:
                del _held[lock]
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise InputError(path.parent, f"cannot write in this folder ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise InputError(path, f"another anomaseg command{f' (pid {holder})' if holder else ''} is writing "
                                   "this output right now; wait for it to finish or choose another output") from None
        try:  # the previous holder may have removed the file between our open and our lock: lock the new one
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    _held[lock], _lock_fds[lock] = 1, fd
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        del _held[lock], _lock_fds[lock]
        lock.unlink(missing_ok=True)
        os.close(fd)
