"""Shared fixtures: tiny synthetic NIfTI datasets written to tmp_path (no test depends on another)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `anomaseg` command does; set before torch loads
# Two threads, pinned (anomaseg.threads): the count changes floating-point results, and tests that
# compare runs must not see it move with the load of a shared machine. Tests of the adaptive policy
# remove it (monkeypatch.delenv); spawned and forked processes inherit it.
os.environ.setdefault("ANOMASEG_THREADS", "2")
# Marks every process the suite starts, so the end of the run can check that none outlives it.
os.environ["ANOMASEG_TEST_SESSION"] = f"{os.getpid()}-{os.urandom(4).hex()}"

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def synthetic_case(rng: np.random.Generator, shape=(28, 32, 24), lesion: bool = False):
    """An ellipsoid 'brain' with smooth texture; optionally a bright spherical 'lesion'."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    scale = rng.uniform(0.85, 0.95, 3)
    r2 = (x / scale[0]) ** 2 + (y / scale[1]) ** 2 + (z / scale[2]) ** 2
    brain = r2 < 0.8
    texture = 1.0 + 0.25 * np.cos(3 * x + rng.uniform(0, 0.3)) * np.cos(2 * y) + 0.15 * (r2 < 0.3)
    image = np.where(brain, texture, 0.0) + rng.normal(0, 0.02, shape) * brain
    seg = np.zeros(shape, np.uint8)
    if lesion:
        c = rng.uniform(-0.3, 0.3, 3)
        blob = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < 0.06
        blob &= brain
        image = np.where(blob, 2.2, image)
        seg[blob] = 1
    return image.astype(np.float32), brain.astype(np.uint8), seg


def write_dataset(root: Path, n: int, lesioned: bool, seed: int = 0, modalities=("flair",),
                  with_mask: bool = True, shape=(28, 32, 24)) -> Path:
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(n):
        case = f"{'les' if lesioned else 'hea'}{i:02d}"
        d = root / case
        d.mkdir(parents=True, exist_ok=True)
        image, brain, seg = synthetic_case(rng, shape, lesioned)
        for k, m in enumerate(modalities):
            nib.save(nib.Nifti1Image(image * (1 + 0.1 * k), affine), d / f"{case}_{m}.nii.gz")
        if with_mask:
            nib.save(nib.Nifti1Image(brain, affine), d / f"{case}_mask.nii.gz")
        if lesioned:
            nib.save(nib.Nifti1Image(seg, affine), d / f"{case}_seg.nii.gz")
    return root


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a process started by the suite is still alive once it has ended."""
    from processes import processes_left_after

    left = processes_left_after()
    if left:
        lines = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items()))
        print(f"\nERROR: {len(left)} process(es) started by the tests outlived them (now killed):\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def healthy_dir(tmp_path) -> Path:
    return write_dataset(tmp_path / "healthy", 6, lesioned=False, seed=1)


@pytest.fixture
def lesioned_dir(tmp_path) -> Path:
    return write_dataset(tmp_path / "lesioned", 3, lesioned=True, seed=2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMASEG_CACHE", str(tmp_path / "cache"))


TINY_MODEL = "model.params={base_channels: 8, max_channels: 16, depth: 3, latent_channels: 4, latent_dim: 16}"


def tiny_train_args(data, out, epochs: int = 2, *extra: str) -> list[str]:
    """CLI arguments of a tiny, fast training run (32 px). Scored with the plain residual: the
    default predictor (grad_elbo for a VAE) needs a model trained longer than these runs, and
    the tests that use them test plumbing; tests/test_defaults.py tests the defaults."""
    return ["train", "--data", str(data), "--out", str(out), "--epochs", str(epochs), "--image-size", "32",
            "--batch-size", "16", "--set", TINY_MODEL, "--set", "train.lr=2e-3", "--set", "score.predictor=residual",
            *extra]


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory) -> Path:
    """A tiny trained run, trained once per test session and only read by the tests that use it
    (tests that change a run copy it first). Trained from another working directory with a relative
    --data, so its run folder must not depend on the working directory. Its own cache folder."""
    import os

    from anomaseg.cli import main

    root = tmp_path_factory.mktemp("shared_run")
    write_dataset(root / "data" / "healthy", 6, lesioned=False, seed=1)
    cwd = os.getcwd()
    os.chdir(root / "data")
    try:
        assert main(tiny_train_args("healthy", root / "run", 4, "--set", f"data.cache_dir={root / 'cache'}")) == 0
    finally:
        os.chdir(cwd)
    return root / "run"
