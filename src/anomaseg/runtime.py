"""Devices and numeric precision: one place decides what `--precision auto` means on this machine.

`auto` picks bf16 autocast only where bf16 runs on real bf16 units: CPUs with AVX512-BF16 or AMX,
CUDA GPUs with native bf16 (compute capability >= 8.0). Everywhere else bf16 is emulated and
slower than fp32, so `auto` is fp32. `ANOMASEG_NO_BF16=1` makes this module treat the CPU as one
without bf16 units (to measure, on a bf16 machine, what users of other CPUs get).
"""

from __future__ import annotations

import os
import platform
import time
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


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity set; all CPUs where the OS has none)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over `cpus`, from /proc/stat's per-CPU lines."""
    busy = total = 0
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                continue
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def busy_cpus(interval: float = 0.1) -> int | None:
    """How many of the CPUs this process may run on other work keeps busy: their busy time over
    `interval` seconds while this thread sleeps, in CPUs, rounded. Only the CPUs of this process's
    affinity set count, so a container pinned to a few CPUs of a large host sees its own. None
    where /proc/stat is unavailable (not Linux)."""
    cpus = usable_cpus()
    before = _cpu_times(cpus)
    time.sleep(interval)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return int(share * len(cpus) + 0.5)


def shared_cpu_hint(threads: int, cpus: int | None = None, busy: int | None = None) -> str | None:
    """A one-line hint when this process's torch threads need more CPUs than other work leaves free:
    a thread sharing its CPU stalls the others at every operator's barrier, which made bf16
    training 3x slower and fp32 1.1x slower on a 2-CPU machine with one CPU busy than with one thread
    (benchmarks/bench_contention.py). None when the free CPUs suffice."""
    cpus = cpus or len(usable_cpus())
    busy = busy_cpus() if busy is None else busy
    free = max(1, cpus - (busy or 0))
    if not busy or threads <= free:
        return None
    return (f"note: other work keeps {min(busy, cpus)} of the {cpus} CPUs busy and torch runs {threads} threads; "
            f"sharing CPUs slows training several-fold (bf16 most): OMP_NUM_THREADS={free} gives this run "
            "the free CPUs alone")
