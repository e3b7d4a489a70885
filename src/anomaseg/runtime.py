"""Devices and numeric precision: one place decides what `--precision auto` means on this machine.

`auto` picks bf16 autocast only where bf16 runs on real bf16 units: CPUs with AVX512-BF16 or AMX,
CUDA GPUs with native bf16 (compute capability >= 8.0). Everywhere else bf16 is emulated and
slower than fp32, so `auto` is fp32. `ANOMASEG_NO_BF16=1` makes this module treat the CPU as one
without bf16 units (to measure, on a bf16 machine, what users of other CPUs get).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

PRECISIONS = {"auto", "bf16", "32", "16"}
NO_BF16_ENV = "ANOMASEG_NO_BF16"
# /proc/cpuinfo flags naming hardware bf16 support (AVX512-BF16, AMX-BF16)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def torch_cpu_bf16_probe() -> bool:
    """torch's CPUID probes: AVX512-BF16 or AMX tiles present."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, c, lambda: False)() for c in checks)


def cpu_bf16_units() -> bool:
    """True where the CPU has bf16 arithmetic units (torch's probes); False under ANOMASEG_NO_BF16=1."""
    if os.environ.get(NO_BF16_ENV, "").strip() not in ("", "0"):
        return False
    return torch_cpu_bf16_probe()


def cuda_bf16_units() -> bool:
    """True where the current CUDA GPU computes bf16 natively (not emulated)."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no emulation flag: native means compute capability >= 8.0
        return torch.cuda.get_device_capability()[0] >= 8


def bf16_is_fast(device: str) -> bool:
    """bf16 pays off on GPUs with bf16 units and on CPUs with AVX512-BF16 or AMX; elsewhere it is
    emulated and slower than fp32."""
    device = torch.device(device).type
    if device == "cuda":
        return cuda_bf16_units()
    if device == "cpu":
        return cpu_bf16_units()
    return False


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fabric_precision(precision: str, device: str | None = None) -> str:
    """Map our precision names to Lightning Fabric's."""
    device = torch.device(device or default_device()).type
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if bf16_is_fast(device) else "32"
    if precision == "16" and device != "cuda":
        raise ValueError("precision 16 (fp16 autocast) needs a CUDA GPU; use bf16 or 32 on the CPU")
    return {"bf16": "bf16-mixed", "32": "32-true", "16": "16-mixed"}[precision]


def autocast(device: str, fabric_prec: str):
    """The autocast context matching a Fabric precision string (for inference outside Fabric)."""
    device = torch.device(device).type
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(fabric_prec)
    return torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None)


def cpu_info() -> dict:
    """CPU model, the flags that matter for speed (and the full list), torch's bf16 probe and what
    `--precision auto` picks here: what every benchmark records beside its numbers."""
    model, flags = "", []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
    key_flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16")
                 if f in flags]
    return {"model": model or platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "key_flags": key_flags, "flags_bf16": any(f in flags for f in BF16_CPU_FLAGS) if flags else None,
            "torch_bf16_probe": torch_cpu_bf16_probe(), NO_BF16_ENV: os.environ.get(NO_BF16_ENV, ""),
            "auto_precision": fabric_precision("auto", "cpu"), "flags": flags}
