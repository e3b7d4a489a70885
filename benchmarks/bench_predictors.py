"""Benchmark: scoring cost of every predictor relative to one forward pass of the model.

    .venv/bin/python benchmarks/bench_predictors.py            # 64 slices at 128 px, spatial VAE (minutes)
    .venv/bin/python benchmarks/bench_predictors.py --quick    # tiny model, 32 px: a smoke test (seconds)

One run, one model, one batch: the model (default: the library's `spatial_vae` at --image-size, as
trained by `anomaseg train`, untrained weights: cost does not depend on them) scores a batch of
synthetic brain-like slices with each registered predictor it supports, under the same autocast
context as the Scorer (`--precision auto`: bf16 where the CPU/GPU runs it fast). Reported per
predictor: seconds per batch (median of --repeats runs after one warm-up), milliseconds per slice,
and the ratio to (a) one forward pass in the Scorer's precision and (b) one float32 forward pass,
the precision the gradient predictors run in. Expected: residual ~1 forward, gradient maps ~1
forward + 1 backward (~3 forwards), projection ~`steps` of those, combi/ensemble the sum of their
parts. Combinations are fitted on a second synthetic batch first (not timed). Writes
benchmarks/results/predictor_cost.json (--quick: benchmarks/_work/predictor_cost_quick.json) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.models import create_model  # noqa: E402
from anomaseg.predictors import create_predictor, list_predictors  # noqa: E402
from anomaseg.runtime import autocast, default_device, fabric_precision  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synthetic_batch(n: int, size: int, seed: int) -> torch.Tensor:
    """Textured ellipses with zero background and a bright disk in every other slice, (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    r = torch.rand(n, 4, generator=g)[:, :, None, None]
    r2 = (xx / (0.75 + 0.1 * r[:, 0])) ** 2 + (yy / (0.8 + 0.1 * r[:, 1])) ** 2
    x = torch.where(r2 < 1, 0.7 + 0.15 * torch.cos(4 * xx + r[:, 2]) * torch.cos(3 * yy) + 0.2 * (r2 < 0.3),
                    torch.zeros(()))
    disk = ((xx - 0.3 * r[:, 3]) ** 2 + yy**2 < 0.02) & (torch.arange(n)[:, None, None] % 2 == 0)
    return torch.where(disk, torch.full_like(x, 1.6), x)[:, None].float()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (oneDNN / cuDNN algorithm choice, allocator)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="spatial_vae")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "32", "16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--predictors", default=None, help="comma-separated (default: every registered one the model supports)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 32 px, batch 8, one repeat")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.image_size, args.repeats = 8, 32, 1
    out = Path(args.out) if args.out else ROOT / "benchmarks" / ("_work/predictor_cost_quick.json" if args.quick
                                                                 else "results/predictor_cost.json")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = default_device()
    precision = fabric_precision(args.precision, device)
    model = create_model(args.model, tiny=args.quick, image_size=args.image_size).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    x = synthetic_batch(args.batch_size, args.image_size, 0).to(device).contiguous(memory_format=torch.channels_last)
    healthy = synthetic_batch(args.batch_size, args.image_size, 1).to(device).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad(), autocast(device, precision):
            model(x)

    def forward_fp32():
        with torch.no_grad():
            model(x)

    t_fwd = timed(forward, args.repeats, device)
    t_fwd32 = timed(forward_fp32, args.repeats, device)
    names = args.predictors.split(",") if args.predictors else list_predictors()
    rows = {}
    for name in names:
        p = create_predictor(name)
        if not p.supports(model):
            continue
        with autocast(device, precision):
            p.fit(model, iter([healthy]))

        def run(p=p):
            with autocast(device, precision):
                p.anomaly_map(model, x)

        t = timed(run, args.repeats, device)
        rows[name] = {"params": p.get_params(), "seconds_per_batch": t, "ms_per_slice": 1000 * t / args.batch_size,
                      "relative_to_forward": t / t_fwd, "relative_to_forward_fp32": t / t_fwd32}
        print(f"{name}: {1000 * t / args.batch_size:.2f} ms/slice, {t / t_fwd:.1f}x forward", flush=True)

    result = {
        "benchmark": "predictor cost per slice relative to one forward pass",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "device": device, "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": args.model, "tiny_model": args.quick,
        "parameters": sum(q.numel() for q in model.parameters()), "batch_size": args.batch_size,
        "image_size": args.image_size, "precision": precision, "repeats": args.repeats,
        "forward_seconds_per_batch": t_fwd, "forward_fp32_seconds_per_batch": t_fwd32,
        "forward_ms_per_slice": 1000 * t_fwd / args.batch_size, "predictors": rows,
    }
    write_text(out, json.dumps(result, indent=1))
    print(f"\n{args.model}, {args.batch_size} slices of {args.image_size} px, {device} ({cpu_name()}), "
          f"{torch.get_num_threads()} threads, precision {precision}; forward {1000 * t_fwd / args.batch_size:.2f} "
          f"ms/slice ({1000 * t_fwd32 / args.batch_size:.2f} in float32)\n")
    print("| predictor | ms/slice | x forward | x forward (fp32) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ms_per_slice']:.2f} | {r['relative_to_forward']:.1f} | {r['relative_to_forward_fp32']:.1f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
