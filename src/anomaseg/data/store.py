"""Training slices in memory or on disk, read in the same batches either way.

Small sets are held in memory as one float16 tensor (`InMemorySlices`, the fastest). Sets too large
for that are written once, through the case cache, into one `.npy` file per set of cases
(`SliceStore`, `<cache>/stores/<key>.npy`: (N, C, S, S) float16, the in-domain slices of the cases
in order; np.load(path, mmap_mode="r") opens it too). Training reads the rows of each batch with
`os.pread`, in DataLoader workers when `train.num_workers` > 0, so a process holds a few batches,
never the set; not a memory map, whose pages would count in the process's resident memory. The
store's key covers every case's cache key (its files and the preprocessing), so a changed case
makes a new store; delete `<cache>/stores` to reclaim the space of old ones.

`data.slice_store` chooses: "memory", "disk", or "auto" (disk when the slices of all training
processes of this machine would take more than MEMORY_FRACTION of the available memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from anomaseg.atomic import atomic_path
from anomaseg.data.cases import Case
from anomaseg.data.slices import CaseCache, SliceSpec
from anomaseg.errors import InputError

STORE_VERSION = 1
MEMORY_FRACTION = 0.25
MODES = ("auto", "memory", "disk")


class SliceSource(Protocol):
    channels: int
    size: int

    def __len__(self) -> int: ...

    def read(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows `idx`, in that order: (len(idx), C, S, S) float16."""
        ...


class InMemorySlices:
    def __init__(self, data: torch.Tensor):
        self.data = data
        self.channels, self.size = int(data.shape[1]), int(data.shape[-1])

    def __len__(self) -> int:
        return len(self.data)

    def read(self, idx) -> torch.Tensor:
        return self.data[torch.as_tensor(np.asarray(idx), dtype=torch.long)]


class SliceStore:
    """A (N, C, S, S) float16 .npy file whose rows are read with os.pread (safe to share between
    processes and threads: no file position)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except (OSError, ValueError) as exc:
            raise InputError(self.path, f"slice store is unreadable ({exc})") from None
        if dtype != np.float16 or fortran or len(shape) != 4:
            raise InputError(self.path, f"not a slice store: {dtype} {shape}")
        self.shape = shape
        self.channels, self.size = int(shape[1]), int(shape[-1])
        self.row_shape = tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape)) * 2
        if self.path.stat().st_size < self.offset + len(self) * self.row_bytes:
            raise InputError(self.path, "slice store is truncated (delete it: it is rebuilt)")
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getstate__(self):  # worker processes open their own descriptor
        return {**self.__dict__, "_fd": None, "_pid": None}

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, idx) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx),) + self.row_shape, np.float16)
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        # consecutive rows are read in one call
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        fd = self._descriptor()
        for run in np.split(np.arange(len(rows)), breaks):
            if not len(run):
                continue
            first, n = int(rows[run[0]]), len(run)
            buf = os.pread(fd, n * self.row_bytes, self.offset + first * self.row_bytes)
            if len(buf) != n * self.row_bytes:
                raise InputError(self.path, "slice store is truncated (delete it: it is rebuilt)")
            out[order[run]] = np.frombuffer(buf, np.float16).reshape((n,) + self.row_shape)
        return torch.from_numpy(out)


@dataclass
class Survey:
    """What is known of a set of cases after one pass (each case prepared and cached once)."""

    cases: list[Case]
    counts: list[int]  # in-domain slices per case
    anomalous: list[str]  # ids of cases with anomalous voxels
    spec: SliceSpec
    images: list[np.ndarray] | None = field(default=None, repr=False)  # kept slices, without a cache only

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def nbytes(self) -> int:
        return self.n * len(self.spec.modalities) * self.spec.image_size ** 2 * 2


def survey(cases: list[Case], spec: SliceSpec, cache: CaseCache, progress: bool = True,
           desc: str = "preparing cases") -> Survey:
    """Prepare (and cache) each case in turn, holding one at a time; count its in-domain slices."""
    from tqdm.auto import tqdm

    counts, anomalous, images = [], [], ([] if cache.folder is None else None)
    with tqdm(cases, desc=desc, unit="case", disable=not progress, leave=False) as bar:
        for case in bar:
            if images is not None:  # no cache to read them back from: keep them now
                p = cache.get(case, spec)
                keep, bad = p.keep, p.truth is not None and p.truth.any()
                images.append(p.images[keep])
            else:
                keep, bad = cache.training_view(case, spec)
            counts.append(int(keep.sum()))
            if bad:
                anomalous.append(case.case_id)
    return Survey(list(cases), counts, anomalous, spec, images)


def available_memory() -> float:
    """Bytes of memory available to new allocations (Linux: MemAvailable), inf if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return float("inf")


def choose_storage(mode: str, nbytes: int, processes: int, cache: CaseCache) -> str:
    """'memory' or 'disk' for `mode` (auto | memory | disk)."""
    if mode not in MODES:
        raise ValueError(f"slice_store must be one of {MODES}, got {mode!r}")
    if mode == "disk" and cache.folder is None:
        raise InputError(None, "data.slice_store=disk keeps the store in the case cache: set data.cache_dir")
    if mode == "auto":
        big = nbytes * processes > MEMORY_FRACTION * available_memory()
        mode = "disk" if big and cache.folder is not None else "memory"
    return mode


def store_path(s: Survey, cache: CaseCache) -> Path:
    keys = [cache.key(case, s.spec) for case in s.cases]
    digest = hashlib.sha256(json.dumps([STORE_VERSION, keys]).encode()).hexdigest()[:32]
    return cache.folder / "stores" / f"{digest}.npy"


def load_slices(s: Survey, cache: CaseCache, mode: str, progress: bool = True,
                desc: str = "building slice store") -> SliceSource:
    """The survey's in-domain slices, case after case: in memory, or in a slice store on disk
    (built on first use; every later run over the same cases opens it)."""
    from tqdm.auto import tqdm

    if s.n == 0:
        raise ValueError("no training slices: every slice has too little brain")
    if mode == "memory":
        chunks = s.images if s.images is not None else [cache.kept_images(c, s.spec) for c in s.cases]
        return InMemorySlices(torch.from_numpy(np.concatenate(chunks)))
    path = store_path(s, cache)
    if path.exists():
        try:
            store = SliceStore(path)
            if len(store) == s.n:
                return store
        except InputError:
            pass  # damaged: rebuilt below
    shape = (s.n, len(s.spec.modalities), s.spec.image_size, s.spec.image_size)
    header = {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": shape}
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f, tqdm(list(zip(s.cases, s.counts)), desc=desc, unit="case",
                                         disable=not progress, leave=False) as bar:
            np.lib.format.write_array_header_1_0(f, header)
            for case, count in bar:
                rows = np.ascontiguousarray(cache.kept_images(case, s.spec), np.float16)
                if rows.shape != (count,) + shape[1:]:
                    raise InputError(cache.entry(case, s.spec), "cached case changed while building the slice store")
                f.write(rows.tobytes())
    return SliceStore(path)


class _Rows(torch.utils.data.Dataset):
    """`dataset[idx_array]` -> those rows: lets a DataLoader's workers read whole batches."""

    def __init__(self, source: SliceSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, idx) -> torch.Tensor:
        return self.source.read(idx)


# Forked workers are this process's children, so DataLoader's watchdog ends them when a run is killed.
# Under a forkserver (Python 3.14's default on Linux, or in a process a forkserver started) they are
# the server's children and outlive it. Where fork is unsafe (macOS) the platform's default stays.
WORKER_START = "fork" if sys.platform == "linux" else None


def batches(source: SliceSource, index_batches: list[np.ndarray], workers: int = 0,
            pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """The rows of each index array, in order; read ahead by `workers` processes for a store."""
    if isinstance(source, InMemorySlices) or workers <= 0:
        for idx in index_batches:
            yield source.read(idx)
        return
    loader = torch.utils.data.DataLoader(_Rows(source), sampler=index_batches, batch_size=None,
                                         num_workers=workers, pin_memory=pin_memory, prefetch_factor=2,
                                         multiprocessing_context=WORKER_START)
    yield from loader
