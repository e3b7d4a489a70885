"""Benchmark: the model comparison of Baur et al. (2018) on the built-in brain MR phantom.

    .venv/bin/python benchmarks/compare_models.py            # full: ~60 min on an idle 2-core CPU
    .venv/bin/python benchmarks/compare_models.py --quick    # smoke test: ~2 min
    .venv/bin/python benchmarks/compare_models.py --resume   # go on after an interruption

Every registered model is trained on the same phantom data (FLAIR, healthy cases in train/, whole
cases held out for validation and threshold calibration) with the same budget (epochs, batch size,
steps per epoch, image size) for each seed, then evaluated on the lesioned test cases with the
project's pipeline (`evaluate_dataset`: residual map |x - recon| for all models, 5x5x5 median,
brain mask eroded by 3 voxels). Each model keeps its own preset's architecture and optimiser
(configs/baur2018_*.yaml, configs/skipganomaly.yaml: Adam 5e-4 for the AEs/VAEs, 1e-4 with betas
(0.5, 0.9) for AnoVAEGAN, 2e-4 with (0.5, 0.999) for Skip-GANomaly); only budget and data are
shared. One exception, for the CPU budget: Skip-GANomaly runs with base_channels 32, max 256
(8M parameters, ~2x the cost per batch of AnoVAEGAN) instead of the paper's 64/512 (32M, ~10x); pass
`--model-params '{"skip_ganomaly": {"base_channels": 64, "max_channels": 512}}'` for the paper's.

Writes benchmarks/results/model_comparison.{json,md} (with --quick: model_comparison_quick.*):
pixel AUROC, pixel AUPRC and best-possible Dice (mean +- std over seeds), Dice at the
healthy-calibrated threshold, and training throughput (slices/s: median over epochs of the
training loop's own measurement, which includes data handling) per model. Throughput depends on
the machine's load: compare it only within one run of this script. The quick mode only checks that
everything runs: its models barely train (their maps are little more than the image itself, so
all models score alike) and its throughput is dominated by the first steps' warm-up.

Full-mode budget (defaults): 40 healthy subjects (32 train, 8 held out per seed; the split follows
the training seed, the same for every model), 8 lesioned, 64 px, 12 epochs of ~60 batches of 32
slices, seeds 0 1 2: 18 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from anomaseg import config as cfg  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.models import list_models  # noqa: E402

PRESETS = {"dense_ae": "baur2018_dense_ae", "spatial_ae": "baur2018_spatial_ae", "dense_vae": "baur2018_dense_vae",
           "spatial_vae": "baur2018_spatial_vae", "anovaegan": "baur2018_anovaegan", "skip_ganomaly": "skipganomaly"}
CPU_OVERRIDES = {"skip_ganomaly": {"base_channels": 32, "max_channels": 256}}
QUICK_OVERRIDES = {"skip_ganomaly": {"base_channels": 16, "max_channels": 128}}
METRICS = ("pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold")

FULL = dict(image_size=64, healthy=40, lesioned=8, epochs=12, batch_size=32, max_steps=None, seeds=[0, 1, 2])
QUICK = dict(image_size=32, healthy=4, lesioned=2, epochs=1, batch_size=16, max_steps=3, seeds=[0, 1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a ~2 minute smoke test (32 px, 4+2 subjects, one 3-step epoch, 2 seeds)")
    p.add_argument("--models", help="comma-separated model names (default: every registered model)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--healthy", type=int, help="healthy phantom subjects (train + validation)")
    p.add_argument("--lesioned", type=int, help="lesioned phantom subjects (test)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-steps", type=int, help="cap on training steps per epoch (default: all batches)")
    p.add_argument("--phantom-seed", type=int, default=0, help="seed of the phantom data (same for every model)")
    p.add_argument("--model-params", default="{}", help="JSON {model: {param: value}} merged over the presets")
    p.add_argument("--work", help="working folder (phantom, runs, evaluations); default benchmarks/results/work[_quick]")
    p.add_argument("--keep", action="store_true", help="keep the working folder (runs and reports)")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs of an interrupted invocation (same settings) that finished training and evaluation")
    p.add_argument("--out", help="output stem (default benchmarks/results/model_comparison[_quick])")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def model_config(name: str, args, seed: int, train_dir: Path, cache: Path, extra: dict) -> cfg.RunConfig:
    preset = ROOT / "configs" / f"{PRESETS[name]}.yaml" if name in PRESETS else None
    params = {**(QUICK_OVERRIDES if args.quick else CPU_OVERRIDES).get(name, {}), **extra.get(name, {})}
    overrides = {"data": {"modalities": ["flair"], "image_size": args.image_size, "cache_dir": str(cache)},
                 "model": {"name": name, "params": params},
                 "train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": seed,
                           "max_steps_per_epoch": args.max_steps},
                 "score": {"predictor": "residual"}}
    config = cfg.resolve(preset, overrides)
    config.train_dir = str(train_dir)
    return config


def training_slice_count(config: cfg.RunConfig, split: dict) -> int:
    """In-domain slices of the run's training cases (read from the shared preprocessing cache)."""
    from anomaseg.data.layout import find_cases
    from anomaseg.data.slices import CaseCache, prepare_cases

    by_id = {c.case_id: c for c in find_cases(config.train_dir, config.data.modalities)}
    prepared = prepare_cases([by_id[i] for i in split["train"]], config.data.slice_spec(),
                             CaseCache.at(config.data.cache_dir), False)
    return int(sum(p.keep.sum() for p in prepared))


def finished(run: Path, evaluation: Path, epochs: int) -> bool:
    """True when `run` trained all `epochs` and `evaluation` holds its metrics."""
    from anomaseg.run import RunPaths

    history = run / "history.json"
    return (RunPaths(run).last.exists() and (evaluation / "metrics.json").exists() and history.exists()
            and len(json.loads(history.read_text())) >= epochs)


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(summary: dict, setup: dict) -> str:
    lines = [f"# Model comparison on the phantom ({'quick smoke test' if setup['quick'] else 'full'})", "",
             f"{setup['n_train_cases']} healthy training cases ({setup['n_train_slices']} slices), "
             f"{setup['n_val_cases']} held out, {setup['lesioned']} lesioned test cases; {setup['image_size']} px FLAIR; "
             f"{setup['epochs']} epoch(s) x {setup['steps_per_epoch']} steps of {setup['batch_size']} slices; "
             f"seeds {', '.join(map(str, setup['seeds']))}; residual map, 5x5x5 median, erosion 3. "
             f"Mean +- std over seeds. Throughput: training slices/s on {setup['machine']} "
             f"(load average at start {setup['load_average']}).", "",
             "| model | params | pixel AUROC | pixel AUPRC | best Dice | Dice at threshold | slices/s | train s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        cells = [f"{s[m]['mean']:.3f} +- {s[m]['std']:.3f}" for m in METRICS]
        lines.append(f"| {name} | {s['parameters'] / 1e6:.2f}M | " + " | ".join(cells)
                     + f" | {s['slices_per_second']['mean']:.0f} | {s['train_seconds']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from anomaseg.data.phantom import make_phantom
    from anomaseg.evaluation import evaluate_dataset
    from anomaseg.run import RunPaths, load_checkpoint, load_split, model_from_checkpoint
    from anomaseg.training import train

    suffix = "_quick" if args.quick else ""
    work = Path(args.work) if args.work else ROOT / "benchmarks" / "results" / f"work{suffix}"
    out_stem = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"model_comparison{suffix}"
    models = [m.strip() for m in args.models.split(",")] if args.models else list_models()
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        raise SystemExit(f"unknown model(s): {', '.join(unknown)}; registered: {', '.join(list_models())}")
    extra = json.loads(args.model_params)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    t0 = time.perf_counter()
    print(f"phantom: {args.healthy} healthy + {args.lesioned} lesioned subjects (FLAIR, 2 mm) in {work / 'phantom'}", flush=True)
    make_phantom(work / "phantom", args.healthy, args.lesioned, seed=args.phantom_seed, resolution=2,
                 modalities=("flair",))
    phantom_seconds = time.perf_counter() - t0

    rows = []
    n_runs = len(models) * len(args.seeds)
    for i, (seed, name) in enumerate((s, m) for s in args.seeds for m in models):
        run, evaluation = work / "runs" / f"{name}_seed{seed}", work / "eval" / f"{name}_seed{seed}"
        config = model_config(name, args, seed, work / "phantom" / "train", work / "cache", extra)
        if args.resume and finished(run, evaluation, args.epochs):
            # Timings of a run finished before the interruption come from its files' modification times.
            train_seconds = RunPaths(run).last.stat().st_mtime - (run / "config.yaml").stat().st_mtime
            eval_seconds = (evaluation / "metrics.json").stat().st_mtime - RunPaths(run).last.stat().st_mtime
            metrics = json.loads((evaluation / "metrics.json").read_text())
        else:
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(evaluation, ignore_errors=True)
            t = time.perf_counter()
            train(config, run, progress=False)
            train_seconds = time.perf_counter() - t
            metrics = evaluate_dataset(run, work / "phantom" / "test", evaluation, progress=False)
            eval_seconds = time.perf_counter() - t - train_seconds
        state = load_checkpoint(RunPaths(run).last)
        history = state["history"]
        split = load_split(run)
        model = model_from_checkpoint(state)
        row = {"model": name, "seed": seed, "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": train_seconds, "eval_seconds": eval_seconds,
               "slices_per_second": statistics.median(h["slices_per_second"] for h in history),
               "n_train_cases": len(split["train"]), "n_val_cases": len(split["val"]),
               "n_train_slices": training_slice_count(config, split),
               "final_train_loss": history[-1].get("train_loss"), "best_val_loss": state["best_val"],
               "hparams": state["hparams"], "lr": config.train.lr,
               "betas": list(getattr(model, "betas", None) or config.train.betas),
               **{m: metrics[m] for m in METRICS}, "image_auroc": metrics["image_auroc"]}
        rows.append(row)
        print(f"[{i + 1}/{n_runs}] {name} seed {seed}: pixel AUROC {row['pixel_auroc']:.3f}, AUPRC "
              f"{row['pixel_auprc']:.3f}, best Dice {row['dice_best']:.3f}; {row['slices_per_second']:.0f} slices/s, "
              f"train {train_seconds:.0f} s, eval {row['eval_seconds']:.0f} s (elapsed {time.perf_counter() - t0:.0f} s)",
              flush=True)

    summary = {}
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        entry = {"parameters": mine[0]["parameters"], "runs": len(mine)}
        for key in METRICS + ("image_auroc", "slices_per_second", "train_seconds"):
            mean, std = mean_std([r[key] for r in mine])
            entry[key] = {"mean": mean, "std": std}
        summary[name] = entry

    n_slices = sorted({r["n_train_slices"] for r in rows})
    steps = [n // min(args.batch_size, n) for n in n_slices]
    if args.max_steps:
        steps = [min(s, args.max_steps) for s in steps]
    span = lambda v: str(v[0]) if v[0] == v[-1] else f"{v[0]}-{v[-1]}"  # noqa: E731
    setup = {"quick": args.quick, "models": models, "seeds": args.seeds, "image_size": args.image_size,
             "healthy": args.healthy, "lesioned": args.lesioned, "epochs": args.epochs, "batch_size": args.batch_size,
             "max_steps_per_epoch": args.max_steps, "steps_per_epoch": span(steps),
             "n_train_cases": rows[0]["n_train_cases"], "n_val_cases": rows[0]["n_val_cases"],
             "n_train_slices": span(n_slices), "phantom_seed": args.phantom_seed, "model_params": extra,
             "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
             "load_average": None if load is None else round(load, 2),
             "phantom_seconds": round(phantom_seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    result = {"setup": setup, "summary": summary, "runs": rows}
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    write_text(out_stem.with_suffix(".json"), json.dumps(result, indent=1, default=str))
    table = markdown(summary, setup)
    write_text(out_stem.with_suffix(".md"), table)
    print(table)
    print(f"total {setup['total_seconds']:.0f} s; wrote {out_stem.with_suffix('.json')} and {out_stem.with_suffix('.md')}")
    if not (args.keep or args.resume):
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
