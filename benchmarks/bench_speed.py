"""Training and scoring throughput (slices/s) of Baur et al.'s spatial VAE at 64 and 128 px.

In one run, on the same slices and the same model, compares
- a plain fp32 PyTorch loop (model(x), loss, backward, Adam step: the reference),
- anomaseg's training loop (Lightning Fabric, `Trainer`) at equal settings (fp32, no channels_last):
  the framework's overhead, which must stay under 10%,
- anomaseg's loop with channels_last, and with channels_last + bf16 autocast (the default
  `--precision auto` on CPUs with AVX512-BF16 / GPUs with bf16),
- scoring (residual predictor over batches of slices) in fp32 and bf16.
Configurations are interleaved and repeated; the median of the repeats is reported, so the ratios
come from the same minutes of the same machine.

    python benchmarks/bench_speed.py [--sizes 64 128] [--repeats 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from anomaseg import config as cfg  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.data.phantom import make_phantom  # noqa: E402
from anomaseg.models import create_model  # noqa: E402
from anomaseg.postprocess import PostProcessor  # noqa: E402
from anomaseg.predictors.base import create_predictor  # noqa: E402
from anomaseg.scoring import Scorer  # noqa: E402
from anomaseg.training import Trainer  # noqa: E402


def plain_loop(x_all: torch.Tensor, size: int, batch: int, steps: int) -> float:
    """The reference: what one would write by hand, fp32, contiguous tensors."""
    torch.manual_seed(0)
    model = create_model("spatial_vae", in_channels=1, image_size=size).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)

    def step(i):
        x = x_all[(i * batch) % (len(x_all) - batch):][:batch].float()
        out = model(x)
        loss = model.loss(x, out)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    for i in range(2):  # warm-up
        step(i)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch / (time.perf_counter() - t)


def framework_loop(data: Path, size: int, batch: int, steps: int, precision: str, channels_last: bool) -> float:
    """anomaseg's Trainer; the second epoch's throughput (the first one warms up)."""
    config = cfg.resolve(overrides={
        "data": {"image_size": size, "val_fraction": 0.0},
        "train": {"epochs": 2, "batch_size": batch, "precision": precision, "channels_last": channels_last,
                  "max_steps_per_epoch": steps, "lr": 5e-4}})
    config.train_dir = str(data)
    with tempfile.TemporaryDirectory() as run:
        summary = Trainer(config, Path(run) / "run", progress=False).fit()
    return summary["history"][-1]["slices_per_second"]


def scoring(x_all: torch.Tensor, size: int, precision: str, batches: int = 4, batch: int = 64) -> float:
    model = create_model("spatial_vae", in_channels=1, image_size=size)
    scorer = Scorer(model, create_predictor("residual"), PostProcessor(), batch_size=batch, device="cpu",
                    precision=precision)
    from anomaseg.runtime import autocast

    x = x_all[:batch].float().contiguous(memory_format=torch.channels_last)
    with autocast("cpu", scorer._fabric_precision):
        scorer.predictor.anomaly_map(scorer.model, x)  # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            scorer.predictor.anomaly_map(scorer.model, x)
    return batches * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="timed training steps per measurement")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "results" / "speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from anomaseg.data.layout import find_cases
    from anomaseg.data.slices import CaseCache, prepare_cases, training_slices

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ANOMASEG_CACHE"] = str(Path(tmp) / "cache")
        data = Path(tmp) / "phantom"
        make_phantom(data, 6, 0, seed=0, resolution=2)
        results = {}
        for size in args.sizes:
            spec = cfg.DataConfig(image_size=size).slice_spec()
            cases = prepare_cases(find_cases(data / "train", ["flair"]), spec, CaseCache(None), progress=False)
            x_all = training_slices(cases)
            runs = {
                "plain_fp32": lambda: plain_loop(x_all, size, args.batch_size, args.steps),
                "anomaseg_fp32": lambda: framework_loop(data / "train", size, args.batch_size, args.steps, "32", False),
                "anomaseg_fp32_channels_last": lambda: framework_loop(data / "train", size, args.batch_size, args.steps, "32", True),
                "anomaseg_bf16_channels_last": lambda: framework_loop(data / "train", size, args.batch_size, args.steps, "bf16", True),
                "scoring_fp32": lambda: scoring(x_all, size, "32"),
                "scoring_bf16": lambda: scoring(x_all, size, "bf16"),
            }
            samples = {k: [] for k in runs}
            for r in range(args.repeats):  # interleaved, so every configuration sees the same machine
                for name, fn in runs.items():
                    samples[name].append(fn())
                    print(f"{size}px repeat {r + 1}: {name} {samples[name][-1]:.1f} slices/s", flush=True)
            med = {k: statistics.median(v) for k, v in samples.items()}
            results[str(size)] = {
                "slices_per_second": med, "samples": samples,
                "framework_overhead": 1 - med["anomaseg_fp32"] / med["plain_fp32"],
                "speedup_default_vs_plain_fp32": med["anomaseg_bf16_channels_last"] / med["plain_fp32"],
                "scoring_speedup_bf16": med["scoring_bf16"] / med["scoring_fp32"],
            }
    report = {"batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()},
              "date": time.strftime("%Y-%m-%d"), "results": results}
    write_text(Path(args.out), json.dumps(report, indent=1))
    print("\n| size | plain fp32 | anomaseg fp32 | overhead | anomaseg fp32+CL | anomaseg bf16+CL | speed-up | scoring fp32 | scoring bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, r in results.items():
        m = r["slices_per_second"]
        print(f"| {size} | {m['plain_fp32']:.1f} | {m['anomaseg_fp32']:.1f} | {r['framework_overhead']:+.1%} | "
              f"{m['anomaseg_fp32_channels_last']:.1f} | {m['anomaseg_bf16_channels_last']:.1f} | "
              f"{r['speedup_default_vs_plain_fp32']:.2f}x | {m['scoring_fp32']:.1f} | {m['scoring_bf16']:.1f} |")


if __name__ == "__main__":
    main()
