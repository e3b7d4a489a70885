"""`--precision auto` never picks an emulated precision: the decision, with mocked CPU and GPU probes."""

import itertools
from pathlib import Path

import pytest
import torch

from anomaseg import runtime


def mock_cpu(monkeypatch, avx512_bf16: bool, amx: bool):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize("avx512_bf16,amx,no_bf16_env", list(itertools.product([False, True], repeat=3)))
def test_auto_picks_bf16_on_the_cpu_only_with_bf16_units(monkeypatch, avx512_bf16, amx, no_bf16_env):
    mock_cpu(monkeypatch, avx512_bf16, amx)
    if no_bf16_env:
        monkeypatch.setenv(runtime.NO_BF16_ENV, "1")
    else:
        monkeypatch.delenv(runtime.NO_BF16_ENV, raising=False)
    expected = "bf16-mixed" if (avx512_bf16 or amx) and not no_bf16_env else "32-true"
    assert runtime.fabric_precision("auto", "cpu") == expected
    # what the user asks for explicitly is kept, whatever the hardware
    assert runtime.fabric_precision("bf16", "cpu") == "bf16-mixed"
    assert runtime.fabric_precision("32", "cpu") == "32-true"


def test_no_bf16_env_of_zero_or_empty_changes_nothing(monkeypatch):
    mock_cpu(monkeypatch, True, False)
    for value in ("0", ""):
        monkeypatch.setenv(runtime.NO_BF16_ENV, value)
        assert runtime.fabric_precision("auto", "cpu") == "bf16-mixed"


@pytest.mark.parametrize("native", [False, True])
def test_auto_on_cuda_ignores_emulated_bf16(monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # torch's default (including_emulation=True) says yes on every GPU; only native units count
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert runtime.fabric_precision("auto", "cuda") == ("bf16-mixed" if native else "32-true")
    assert runtime.fabric_precision("auto", "cuda:0") == ("bf16-mixed" if native else "32-true")


def test_fp16_needs_a_gpu_and_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        runtime.fabric_precision("16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.fabric_precision("64", "cpu")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_torch_probe_agrees_with_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(runtime.NO_BF16_ENV, raising=False)
    info = runtime.cpu_info()
    assert info["model"] and info["flags"]
    assert info["torch_bf16_probe"] == info["flags_bf16"]
    assert info["auto_precision"] == ("bf16-mixed" if info["flags_bf16"] else "32-true")
    monkeypatch.setenv(runtime.NO_BF16_ENV, "1")
    assert runtime.cpu_info()["auto_precision"] == "32-true"


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_the_command_makes_idle_openmp_threads_sleep_unless_told_otherwise(preset):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": preset} if preset else {})
    code = "import sys, os, anomaseg.cli; print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", preset or "PASSIVE"]  # set before torch loads, the user's choice kept
