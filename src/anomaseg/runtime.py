"""Devices and numeric precision: one place decides what `--precision auto` means on this machine."""

from __future__ import annotations

import torch

PRECISIONS = {"auto", "bf16", "32", "16"}


def bf16_is_fast(device: str) -> bool:
    """bf16 pays off on GPUs with bf16 units and on CPUs with AVX512-BF16 or AMX; elsewhere it is
    emulated and slower than fp32."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, c, lambda: False)() for c in checks)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fabric_precision(precision: str, device: str | None = None) -> str:
    """Map our precision names to Lightning Fabric's."""
    device = device or default_device()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if bf16_is_fast(device) else "32"
    if precision == "16" and device != "cuda":
        raise ValueError("precision 16 (fp16 autocast) needs a CUDA GPU; use bf16 or 32 on the CPU")
    return {"bf16": "bf16-mixed", "32": "32-true", "16": "16-mixed"}[precision]


def autocast(device: str, fabric_prec: str):
    """The autocast context matching a Fabric precision string (for inference outside Fabric)."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(fabric_prec)
    return torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None)
