"""Study: VAE anomaly-localisation predictors vs the KL weight beta (after Zhou, Deng & Wu 2020).

    .venv/bin/python benchmarks/study_vae_predictors.py            # the full study (~100 min, idle 2-core CPU)
    .venv/bin/python benchmarks/study_vae_predictors.py --quick    # a smoke test of the pipeline (~2 min)

Default budget: 2 models x 5 betas (the paper's 0.5, 1, 2, 4, 8; add e.g. 0.05, where our
reconstructions stop blurring, with --betas) x 3 seeds = 30 runs, each 12 epochs at 64 px on the
~1450 slices of 24 healthy training cases (6 more held out), evaluated on 5 lesioned cases with 7
predictors: about 3.3 min per run on an idle 2-core CPU (1.2 min training, 2 min evaluation: the
projection's 21 forward+backward passes per slice and one 3D median filter per volume and predictor,
on the calibration and the test cases). The maps are median-filtered with a 3x3x3 window instead of
the library's 5x5x5 (--median-size): the 5x5x5 filter alone made evaluation ~1.5 min longer per run.
Scale with --epochs, --seeds, --betas, --healthy, --lesioned.

On the built-in phantom (`anomaseg.data.phantom.make_phantom`, 2 mm, FLAIR): for each model (spatial
and dense VAE, the library's default architectures), each beta and each seed, one run is trained
with the library (`anomaseg.config.resolve` + `anomaseg.training.train`) under the same budget
(--epochs, --batch-size, --image-size, same data) and evaluated with
`anomaseg.evaluation.evaluate_dataset` on the lesioned test cases with every predictor in
--predictors (calibration on the run's held-out healthy cases only, never on test data). The seed
sets the weights' initialisation, the batch order and which healthy cases are held out.

The ensemble is the pre-declared default `ensemble` predictor: residual + grad_kl, each z-scored on
healthy calibration pixels, combined by mean; it is fixed before any result is seen (no selection
on test data). The table's "best single predictor" line per (model, beta) *is* selected on the test
set: it is an oracle, reported only to show how far the pre-declared choice is from it.

Outputs (--results, default benchmarks/results; --quick: benchmarks/_work/vae_study_quick/results):
    vae_predictor_study.json   per-run metrics, timings and the aggregate (mean, std over seeds)
    vae_predictor_study.md     pixel AUROC, pixel AUPRC and best Dice as mean +- std over seeds
    vae_predictor_study.png    the same against beta, one panel per model and metric
Runs are kept in --work (default benchmarks/_work/vae_study, git-ignored); a finished run with
the same settings is reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from anomaseg import config as cfg  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.data.phantom import make_phantom  # noqa: E402
from anomaseg.evaluation import evaluate_dataset  # noqa: E402
from anomaseg.training import train  # noqa: E402

PREDICTORS = ["residual", "projection", "grad_elbo", "grad_kl", "grad_rec", "combi", "ensemble"]
METRICS = ["pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold", "image_auroc"]
TABLE_METRICS = [("pixel_auroc", "pixel AUROC"), ("pixel_auprc", "pixel AUPRC"), ("dice_best", "best Dice")]
TINY = {"base_channels": 8, "max_channels": 16, "depth": 3, "latent_channels": 4, "latent_dim": 16}


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="spatial_vae,dense_vae")
    ap.add_argument("--betas", type=floats, default=[0.5, 1, 2, 4, 8])
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--healthy", type=int, default=30, help="phantom healthy cases (training + held-out)")
    ap.add_argument("--lesioned", type=int, default=5, help="phantom lesioned test cases")
    ap.add_argument("--phantom-seed", type=int, default=0)
    ap.add_argument("--median-size", type=int, default=3,
                    help="median filter of the maps (library default 5; 3 here for the CPU budget, see above)")
    ap.add_argument("--predictors", default=",".join(PREDICTORS))
    ap.add_argument("--predictor-params", default="{}", help="YAML {predictor: {param: value}}, as for `anomaseg evaluate`")
    ap.add_argument("--tiny-models", action="store_true", help="the models' tiny test configuration")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--results", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="pipeline smoke test: 32 px tiny models, 1 epoch of 15 steps, beta 1, 1 seed, "
                         "4 healthy + 1 lesioned cases, no median filter (the numbers mean nothing)")
    args = ap.parse_args(argv)
    if args.quick:
        args.betas, args.seeds, args.epochs, args.max_steps_per_epoch = [1.0], [0], 1, 15
        args.image_size, args.healthy, args.lesioned, args.tiny_models = 32, 4, 1, True
    work = Path(args.work) if args.work else ROOT / "benchmarks" / "_work" / ("vae_study_quick" if args.quick else "vae_study")
    args.work = work
    args.results = Path(args.results) if args.results else (work / "results" if args.quick else ROOT / "benchmarks" / "results")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    import yaml

    args.predictor_params = yaml.safe_load(args.predictor_params) or {}
    return args


def run_config(args, model: str, beta: float, seed: int, train_dir: Path) -> cfg.RunConfig:
    params = {"beta": beta, **(TINY if args.tiny_models else {})}
    overrides = {
        "model": {"name": model, "params": params},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": seed,
                  "max_steps_per_epoch": args.max_steps_per_epoch},
        "data": {"image_size": args.image_size, "cache_dir": str(args.work / "cache")},
    }
    # smoke test: no 3D median filter (~0.3-1.5 s per volume and predictor)
    overrides["score"] = {"median_size": 1 if args.quick else args.median_size}
    config = cfg.resolve(None, overrides)
    config.train_dir = str(train_dir.resolve())
    return config


def one_run(args, model: str, beta: float, seed: int, phantom: Path) -> dict:
    tag = f"{model}_beta{beta:g}_seed{seed}"
    folder = args.work / "runs" / tag
    settings = {"model": model, "beta": beta, "seed": seed, "epochs": args.epochs,
                "max_steps_per_epoch": args.max_steps_per_epoch, "batch_size": args.batch_size, "lr": args.lr,
                "image_size": args.image_size, "tiny_models": args.tiny_models, "healthy": args.healthy,
                "lesioned": args.lesioned, "phantom_seed": args.phantom_seed, "median_size": args.median_size,
                "predictors": args.predictors, "quick": args.quick,
                "predictor_params": args.predictor_params}
    done = folder / "result.json"
    if done.exists():
        previous = json.loads(done.read_text())
        if previous.get("settings") == settings:
            print(f"{tag}: reusing {done}", flush=True)
            return previous
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    config = run_config(args, model, beta, seed, phantom / "train")
    t0 = time.perf_counter()
    summary = train(config, folder / "run", progress=False)
    t1 = time.perf_counter()
    results = evaluate_dataset(folder / "run", phantom / "test", folder / "eval", predictors=args.predictors,
                               progress=False, predictor_params=args.predictor_params)
    t2 = time.perf_counter()
    if "per_case" in results:  # a single predictor returns its metrics directly
        results = {results["predictor"]: results}
    record = {"settings": settings, "best_val_loss": summary["best_val_loss"],
              "train_seconds": t1 - t0, "evaluate_seconds": t2 - t1,
              "metrics": {name: {k: _num(r.get(k)) for k in METRICS} for name, r in results.items()}}
    write_text(done, json.dumps(record, indent=1))
    best = max(record["metrics"].items(), key=lambda kv: _nan_low(kv[1]["pixel_auprc"]))
    print(f"{tag}: trained {t1 - t0:.0f} s, evaluated {t2 - t1:.0f} s; best AUPRC {best[0]} "
          f"{best[1]['pixel_auprc']:.3f}", flush=True)
    return record


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _nan_low(v):
    return -math.inf if v is None else v


def aggregate(records: list[dict]) -> dict:
    """{model: {beta: {predictor: {metric: {mean, std, n}}}}}; std over seeds (ddof 1; 0 for one seed)."""
    groups: dict = {}
    for r in records:
        s = r["settings"]
        for pred, m in r["metrics"].items():
            for k, v in m.items():
                groups.setdefault(s["model"], {}).setdefault(f"{s['beta']:g}", {}).setdefault(pred, {}) \
                    .setdefault(k, []).append(v)
    out: dict = {}
    for model, by_beta in groups.items():
        for beta, by_pred in by_beta.items():
            for pred, by_metric in by_pred.items():
                for k, vals in by_metric.items():
                    v = np.array([x for x in vals if x is not None], float)
                    out.setdefault(model, {}).setdefault(beta, {}).setdefault(pred, {})[k] = {
                        "mean": float(v.mean()) if len(v) else None,
                        "std": float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else None),
                        "n": int(len(v))}
    return out


def fmt(cell: dict) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def paired_difference(records: list[dict], a: str, b: str) -> dict:
    """{model: {beta: {metric: mean over seeds of (a - b)}}}, a and b measured on the same run."""
    groups: dict = {}
    for r in records:
        m = r["metrics"]
        if a in m and b in m:
            cell = groups.setdefault(r["settings"]["model"], {}).setdefault(f"{r['settings']['beta']:g}", {})
            for k, _ in TABLE_METRICS:
                if m[a][k] is not None and m[b][k] is not None:
                    cell.setdefault(k, []).append(m[a][k] - m[b][k])
    return {model: {beta: {k: float(np.mean(v)) for k, v in cell.items()} for beta, cell in by_beta.items()}
            for model, by_beta in groups.items()}


def markdown(agg: dict, args, n_runs: int, records: list[dict]) -> str:
    lines = [f"# VAE predictors vs beta on the phantom ({args.image_size} px, {args.epochs} epochs, "
             f"seeds {','.join(map(str, args.seeds))})", "",
             f"Mean ± std over {len(args.seeds)} seed(s); {n_runs} runs; {args.healthy} healthy phantom cases "
             f"(training + held-out calibration), {args.lesioned} lesioned test cases. Voxel metrics inside the brain "
             f"mask, maps post-processed as by `anomaseg evaluate` with a {args.median_size}^3 median. "
             "`ensemble` = residual + grad_kl, z-scored on "
             "healthy calibration pixels, mean (pre-declared, not selected on test data).", ""]
    lines += ["| model | beta | predictor | " + " | ".join(n for _, n in TABLE_METRICS) + " |",
              "|---|---|---|" + "---|" * len(TABLE_METRICS)]
    for model, by_beta in agg.items():
        for beta in sorted(by_beta, key=float):
            for pred, m in by_beta[beta].items():
                lines.append(f"| {model} | {beta} | {pred} | " + " | ".join(fmt(m[k]) for k, _ in TABLE_METRICS) + " |")
    lines += ["", "Best single predictor by mean pixel AUPRC per model and beta — **selected on the test set (an "
              "oracle)**, for reference only:", "", "| model | beta | oracle predictor | pixel AUPRC | ensemble AUPRC |",
              "|---|---|---|---|---|"]
    for model, by_beta in agg.items():
        for beta in sorted(by_beta, key=float):
            singles = {p: m for p, m in by_beta[beta].items() if p != "ensemble"}
            if not singles:
                continue
            best = max(singles, key=lambda p: _nan_low(singles[p]["pixel_auprc"]["mean"]))
            ens = by_beta[beta].get("ensemble")
            lines.append(f"| {model} | {beta} | {best} | {fmt(singles[best]['pixel_auprc'])} | "
                         f"{fmt(ens['pixel_auprc']) if ens else 'n/a'} |")
    diff = paired_difference(records, "projection", "residual")
    if diff:
        lines += ["", "projection minus residual, paired per run (mean over seeds):", "",
                  "| model | beta | " + " | ".join(n for _, n in TABLE_METRICS) + " |",
                  "|---|---|" + "---|" * len(TABLE_METRICS)]
        for model, by_beta in diff.items():
            for beta in sorted(by_beta, key=float):
                lines.append(f"| {model} | {beta} | "
                             + " | ".join(f"{by_beta[beta].get(k, float('nan')):+.3f}" for k, _ in TABLE_METRICS) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(agg)
    fig, axes = plt.subplots(len(TABLE_METRICS), len(models), figsize=(5.5 * len(models), 3.2 * len(TABLE_METRICS)),
                             squeeze=False, sharex=True)
    for j, model in enumerate(models):
        betas = sorted(agg[model], key=float)
        preds = list(agg[model][betas[0]])
        for i, (key, label) in enumerate(TABLE_METRICS):
            ax = axes[i][j]
            for pred in preds:
                cells = [agg[model][b].get(pred, {}).get(key, {"mean": None, "std": None}) for b in betas]
                xs = [float(b) for b, c in zip(betas, cells) if c["mean"] is not None]
                ys = [c["mean"] for c in cells if c["mean"] is not None]
                es = [c["std"] for c in cells if c["mean"] is not None]
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=pred,
                            lw=2.2 if pred == "ensemble" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_xticks([float(b) for b in betas], betas)  # the betas themselves, not powers of 2
            ax.minorticks_off()
            ax.set_title(f"{model}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(TABLE_METRICS) - 1:
                ax.set_xlabel("beta (KL weight)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    phantom = args.work / f"phantom_h{args.healthy}_l{args.lesioned}_s{args.phantom_seed}"
    if not (phantom / "phantom.json").exists():
        print(f"writing the phantom to {phantom}", flush=True)
        make_phantom(phantom, args.healthy, args.lesioned, seed=args.phantom_seed, resolution=2, modalities=("flair",))
    records = []
    for seed in args.seeds:  # seed outermost: an interrupted study has whole seeds to aggregate (--seeds)
        for model in args.models:
            for beta in args.betas:
                records.append(one_run(args, model, beta, seed, phantom))
    agg = aggregate(records)
    result = {
        "study": "VAE anomaly-localisation predictors vs beta (Zhou, Deng & Wu 2020) on the anomaseg phantom",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ensemble": "pre-declared: residual + grad_kl, z-scored on healthy calibration pixels, mean",
        "seconds": time.perf_counter() - t_start, "runs": records, "aggregate": agg,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_text(args.results / "vae_predictor_study.json", json.dumps(result, indent=1))
    table = markdown(agg, args, len(records), records)
    write_text(args.results / "vae_predictor_study.md", table)
    plot(agg, args.results / "vae_predictor_study.png")
    print(table)
    print(f"wrote {args.results}/vae_predictor_study.{{json,md,png}} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
