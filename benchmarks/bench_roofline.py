"""How far fp32 training can go on this CPU: the spatial VAE's convolution work per slice against
the machine's own convolution peak.

A training step costs three times the forward pass's multiply-accumulates (MACs) in its
convolutions (forward, gradient of the input, gradient of the weights); everything else
(BatchNorm, activations, the optimiser) is memory traffic on top. The peak is what oneDNN reaches
on a large, well-shaped convolution here (128 -> 128 channels, 3x3 and 5x5, 32x32 maps, batch 32,
channels_last, no autograd), in fp32 and, where the CPU has bf16 units, bf16. So

    ceiling slices/s = peak MACs/s / (3 x forward MACs per slice)

is what a loop whose convolutions all ran at the peak and whose other work took no time would
reach: no implementation of the same arithmetic in the same precision goes faster. The plain fp32
loop and anomaseg's fp32 + channels_last loop (bench_speed.py's rows, no Trainer) are measured in
the same run, as fractions of that ceiling.

    python benchmarks/bench_roofline.py [--sizes 64 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `anomaseg` command does; before torch loads
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from anomaseg import runtime  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.models import create_model  # noqa: E402
from anomaseg.models.base import adam  # noqa: E402
from bench_speed import machine_info, set_threads  # noqa: E402


def forward_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the convolutions and linear layers in one forward pass of one input."""
    total = []

    def count(module, inputs, output):
        w = module.weight
        if isinstance(module, nn.Linear):
            total.append(w.numel() * (output.numel() // output.shape[-1]))
        elif isinstance(module, nn.ConvTranspose2d):  # every input pixel meets the whole kernel
            total.append(inputs[0].numel() * w.shape[1] * w.shape[2] * w.shape[3])
        else:
            total.append(output.numel() * w.shape[1] * w.shape[2] * w.shape[3])

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return sum(total)


def conv_peak(dtype: torch.dtype, repeats: int) -> float:
    """MACs/s of oneDNN on large, well-shaped convolutions (the best of a few shapes)."""
    best = 0.0
    for channels, k in ((128, 3), (128, 5), (256, 3)):
        conv = nn.Conv2d(channels, channels, k, padding=k // 2, bias=False)
        conv = conv.to(dtype).to(memory_format=torch.channels_last)
        x = torch.rand(32, channels, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
        macs = 32 * 32 * 32 * channels * channels * k * k
        with torch.no_grad():
            conv(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - t)
        best = max(best, macs / statistics.median(times))
    return best


def loop_speed(size: int, channels_last: bool, repeats: int, steps: int = 8, batch: int = 32) -> float:
    """The plain fp32 training loop (torch Adam, NCHW) or anomaseg's fp32 loop without the
    Trainer (fused Adam, channels_last): slices/s, median of `repeats`."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model("spatial_vae", in_channels=1, image_size=size).train().to(memory_format=fmt)
    opt = adam(model.parameters(), 5e-4) if channels_last else torch.optim.Adam(model.parameters(), lr=5e-4)
    x = torch.rand(batch, 1, size, size).contiguous(memory_format=fmt)

    def step():
        loss = model.loss(x, model(x))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    speeds = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        speeds.append(steps * batch / (time.perf_counter() - t))
    return statistics.median(speeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS, else all CPUs)")
    ap.add_argument("--out", default=str(ROOT / "results" / "roofline_cpu.json"))
    args = ap.parse_args()
    threads = set_threads(args.threads)
    peaks = {"fp32": conv_peak(torch.float32, args.repeats)}
    if runtime.cpu_bf16_units():
        peaks["bf16"] = conv_peak(torch.bfloat16, args.repeats)
    print(f"{threads} threads; convolution peak " + ", ".join(f"{k} {v / 1e9:.1f} GMAC/s" for k, v in peaks.items()),
          flush=True)
    results = {}
    for size in args.sizes:
        macs = forward_macs(create_model("spatial_vae", in_channels=1, image_size=size), (1, size, size))
        ceiling = {k: v / (3 * macs) for k, v in peaks.items()}
        plain, ours = loop_speed(size, False, args.repeats), loop_speed(size, True, args.repeats)
        results[str(size)] = {
            "forward_macs_per_slice": macs, "ceiling_slices_per_second": ceiling,
            "plain_fp32_slices_per_second": plain, "anomaseg_fp32_cl_slices_per_second": ours,
            "plain_fp32_fraction_of_fp32_ceiling": plain / ceiling["fp32"],
            "anomaseg_fp32_cl_fraction_of_fp32_ceiling": ours / ceiling["fp32"],
            "fp32_ceiling_vs_plain": ceiling["fp32"] / plain}
        print(f"{size} px: {macs / 1e6:.1f} M forward MACs per slice; fp32 ceiling {ceiling['fp32']:.0f} slices/s "
              f"= {ceiling['fp32'] / plain:.2f}x the plain loop ({plain:.1f}, {plain / ceiling['fp32']:.0%} of it); "
              f"fp32 + channels_last {ours:.1f} ({ours / ceiling['fp32']:.0%})"
              + (f"; bf16 ceiling {ceiling['bf16']:.0f}" if "bf16" in ceiling else ""), flush=True)
    report = {"threads": threads, "conv_peak_macs_per_second": peaks, "results": results,
              "machine": machine_info("cpu"), "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    write_text(Path(args.out), json.dumps(report, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
