"""Training slices on disk (`data.store`) give the same rows and batches as in memory."""

import os

import numpy as np
import pytest
import torch

from anomaseg.data import store
from anomaseg.data.layout import find_cases
from anomaseg.data.slices import CaseCache, SliceSpec
from anomaseg.errors import InputError

SPEC = SliceSpec(image_size=32)


@pytest.fixture
def surveyed(healthy_dir, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    return store.survey(find_cases(healthy_dir, ["flair"]), SPEC, cache, progress=False), cache


def test_disk_store_reads_the_rows_of_memory(surveyed):
    s, cache = surveyed
    memory = store.load_slices(s, cache, "memory", progress=False)
    disk = store.load_slices(s, cache, "disk", progress=False)
    assert isinstance(disk, store.SliceStore) and len(disk) == len(memory) == s.n == 96
    assert np.load(disk.path, mmap_mode="r").shape == (96, 1, 32, 32)  # a plain .npy
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(96)[:16], np.arange(10, 30), np.array([5, 5, 95, 0, 1, 2]), np.array([], np.int64)):
        a, b = memory.read(idx), disk.read(idx)
        assert a.dtype == b.dtype == torch.float16 and torch.equal(a, b)


def test_batches_with_workers_equal_memory_batches(surveyed):
    """The same seeded permutation gives the same batches from memory, from disk in this process,
    and from disk through DataLoader workers."""
    s, cache = surveyed
    memory = store.load_slices(s, cache, "memory", progress=False)
    disk = store.load_slices(s, cache, "disk", progress=False)
    perm = torch.randperm(len(memory), generator=torch.Generator().manual_seed(3))
    shares = [perm[i * 16:(i + 1) * 16].numpy() for i in range(len(memory) // 16)]
    expected = list(store.batches(memory, shares))
    for workers in (0, 2):
        got = list(store.batches(disk, shares, workers=workers))
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_store_is_built_once_and_rebuilt_when_damaged(surveyed):
    s, cache = surveyed
    path = store.load_slices(s, cache, "disk", progress=False).path
    stamp = path.stat().st_mtime_ns
    assert store.load_slices(s, cache, "disk", progress=False).path == path and path.stat().st_mtime_ns == stamp
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(InputError, match="truncated"):
        store.SliceStore(path)
    again = store.load_slices(s, cache, "disk", progress=False)
    assert len(again) == s.n and path.stat().st_size > 0
    assert torch.equal(again.read(np.arange(s.n)), store.load_slices(s, cache, "memory", progress=False).read(np.arange(s.n)))


def test_auto_chooses_disk_only_for_sets_too_large_for_memory(monkeypatch, tmp_path):
    cache = CaseCache(tmp_path)
    monkeypatch.setattr(store, "available_memory", lambda: 1000 * 2**20)
    assert store.choose_storage("auto", 200 * 2**20, 1, cache) == "memory"
    assert store.choose_storage("auto", 200 * 2**20, 2, cache) == "disk"  # two processes, two copies
    assert store.choose_storage("memory", 10**15, 1, cache) == "memory"
    assert store.choose_storage("auto", 10**15, 1, CaseCache(None)) == "memory"  # no cache folder to hold it
    with pytest.raises(InputError, match="cache_dir"):
        store.choose_storage("disk", 1, 1, CaseCache(None))
