"""The denoising autoencoder (Kascenas et al. 2022) next to the spatial VAE and the intensity
baseline, on the phantom, with the same training budget in CPU time.

    .venv/bin/python benchmarks/bench_dae.py                  # 6 runs of 300 CPU s of training + evaluation
    .venv/bin/python benchmarks/bench_dae.py --budget 120 --modalities flair   # a quick look
    .venv/bin/python benchmarks/bench_dae.py --probe --batch-size 32 --modalities flair   # throughput only

For each modality set (FLAIR; FLAIR + T2) and model (`dae` at the paper's width, `dae` at half
width, `spatial_vae` with its preset), a short probe measures the model's training throughput
per CPU second (slices per second of process time: bf16 autocast where the CPU runs it fast,
channels_last, the loop's own training_step on random batches). CPU time, not wall time, because
the machine is shared: a budget in CPU seconds buys each model the same computation whatever else
runs (300 CPU s is ~2.5 minutes on an idle 2-core machine). The run then gets the number of steps
that fit in `--budget` CPU seconds, in
`--epochs` epochs of equal length (cosine learning rate over the run, best checkpoint on the
held-out validation loss). Evaluation: `evaluate_dataset` (residual map, the run's preset
post-processing), which also evaluates the intensity baseline on the same cases. The phantom:
40 healthy (32 train / 8 held out) and 8 lesioned subjects, seed 0, 2 mm, at 64 px.

Writes benchmarks/results/dae.json (setup, machine with lscpu flags and load, one row per run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from anomaseg import config as cfg  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402

VARIANTS = {
    "dae": ("kascenas2022_dae", {}),
    "dae_half_width": ("kascenas2022_dae", {"base_channels": 32}),
    "spatial_vae": ("baur2018_spatial_vae", {}),
}
METRICS = ("pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold")


def machine() -> dict:
    info = {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        info["flags"] = sorted(set(fields.get("Flags", "").split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor() or platform.machine()
    return info


def run_config(variant: str, modalities: list[str], args, work: Path) -> cfg.RunConfig:
    preset, params = VARIANTS[variant]
    overrides = {"data": {"modalities": modalities, "image_size": args.image_size, "cache_dir": str(work / "cache")},
                 "model": {"params": params},
                 "train": {"batch_size": args.batch_size, "seed": args.seed, "epochs": args.epochs}}
    config = cfg.resolve(ROOT / "configs" / f"{preset}.yaml", overrides)
    config.train_dir = str(work / "phantom" / "train")
    return config


def probe_throughput(config: cfg.RunConfig, cpu_seconds: float = 20.0) -> float:
    """Training slices per CPU second of the run's model on random batches (the loop's precision and
    memory format)."""
    from anomaseg.models import create_model
    from anomaseg.runtime import autocast, fabric_precision

    torch.manual_seed(0)
    size, channels, bs = config.data.image_size, len(config.data.modalities), config.train.batch_size
    model = create_model(config.model.name, in_channels=channels, image_size=size, **config.model.params)
    model = model.to(memory_format=torch.channels_last).train()
    opts = model.make_optimizers(config.train.lr, tuple(config.train.betas))
    precision = fabric_precision(config.train.precision, "cpu")
    x = (torch.rand(bs, channels, size, size) * 0.8).contiguous(memory_format=torch.channels_last)
    step = lambda: model.training_step(x, opts, lambda loss: loss.backward(), lambda: autocast("cpu", precision))  # noqa: E731
    step()
    n, t0 = 0, time.process_time()
    while n < 2 or time.process_time() - t0 < cpu_seconds:
        step()
        n += 1
    return n * bs / (time.process_time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=300.0, help="training CPU seconds per run (default 300)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(VARIANTS))
    ap.add_argument("--modalities", nargs="+", default=["flair", "flair,t2"])
    ap.add_argument("--realistic", action="store_true", help="phantom with every realism feature")
    ap.add_argument("--probe", action="store_true",
                    help="only print each model's training slices per CPU second (one thread), nothing trained")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "work_dae"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dae.json"))
    args = ap.parse_args()

    from anomaseg.data.phantom import make_phantom
    from anomaseg.evaluation import evaluate_dataset
    from anomaseg.run import RunPaths, load_checkpoint
    from anomaseg.training import train

    work = Path(args.work)
    start = machine()
    if args.probe:
        torch.set_num_threads(1)
        print(f"{start['cpu']}, flags {', '.join(start.get('flags', []))}, load {start['load_average']}")
        for mods in args.modalities:
            for variant in args.models.split(","):
                config = run_config(variant, [m.strip() for m in mods.split(",")], args, work)
                print(f"{variant} ({mods}, batch {args.batch_size}, {args.image_size} px): "
                      f"{probe_throughput(config):.1f} training slices per CPU second", flush=True)
        return
    t_all = time.perf_counter()
    if not (work / "phantom" / "phantom.json").exists():
        make_phantom(work / "phantom", 40, 8, seed=0, resolution=2, modalities=("flair", "t2"),
                     realism=args.realistic)
    rows = []
    for mods in args.modalities:
        modalities = [m.strip() for m in mods.split(",")]
        for variant in args.models.split(","):
            config = run_config(variant, modalities, args, work)
            rate = probe_throughput(config)
            steps = max(args.epochs, round(args.budget * rate / args.batch_size))
            config.train.max_steps_per_epoch = math.ceil(steps / args.epochs)
            name = f"{variant}_{'_'.join(modalities)}"
            run, evaluation = work / "runs" / name, work / "eval" / name
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(evaluation, ignore_errors=True)
            t0, c0 = time.perf_counter(), time.process_time()
            train(config, run, progress=False)
            train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
            metrics = evaluate_dataset(run, work / "phantom" / "test", evaluation, progress=False)
            state = load_checkpoint(RunPaths(run).last)
            history = state["history"]
            row = {"model": variant, "modalities": modalities, "hparams": state["hparams"],
                   "parameters": sum(v.numel() for k, v in state["model"].items() if v.is_floating_point()
                                     and "running_" not in k),
                   "probe_slices_per_cpu_second": round(rate, 2),
                   "loop_slices_per_second": round(sorted(h["slices_per_second"] for h in history)[len(history) // 2], 2),
                   "steps": config.train.max_steps_per_epoch * args.epochs,
                   "slices_seen": config.train.max_steps_per_epoch * args.epochs * args.batch_size,
                   "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(train_cpu, 1),
                   "eval_seconds": round(time.perf_counter() - t0 - train_seconds, 1),
                   "best_val_loss": state["best_val"],
                   **{m: metrics[m] for m in METRICS},
                   "baseline": {m: metrics["baseline"][m] for m in METRICS} if "baseline" in metrics else None,
                   "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
            rows.append(row)
            b = row["baseline"] or {}
            print(f"{name}: {row['steps']} steps ({row['slices_seen']} slices, {train_seconds:.0f} s), "
                  f"AUROC {row['pixel_auroc']:.3f} AUPRC {row['pixel_auprc']:.3f} best Dice {row['dice_best']:.3f}"
                  f" | baseline AUPRC {b.get('pixel_auprc', float('nan')):.3f} best Dice {b.get('dice_best', float('nan')):.3f}",
                  flush=True)
    result = {"setup": {"budget_cpu_seconds": args.budget, "epochs": args.epochs, "batch_size": args.batch_size,
                        "image_size": args.image_size, "seed": args.seed, "realistic_phantom": args.realistic,
                        "phantom": "40 healthy (32 train, 8 validation) + 8 lesioned, seed 0, 2 mm",
                        "machine_at_start": start, "seconds": round(time.perf_counter() - t_all, 1),
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
              "runs": rows}
    write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    print("\n| model | modalities | params | slices/CPU s | slices seen | AUROC | AUPRC | best Dice | baseline AUPRC | baseline best Dice |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["baseline"] or {}
        print(f"| {r['model']} | {'+'.join(r['modalities'])} | {r['parameters'] / 1e6:.2f}M | {r['probe_slices_per_cpu_second']} | "
              f"{r['slices_seen']} | {r['pixel_auroc']:.3f} | {r['pixel_auprc']:.3f} | {r['dice_best']:.3f} | "
              f"{b.get('pixel_auprc', float('nan')):.3f} | {b.get('dice_best', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
