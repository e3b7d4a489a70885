"""Study: which model, predictor and polarity `anomaseg train` / `evaluate` should use by default.

    .venv/bin/python benchmarks/study_defaults.py --resume          # hours on a 2-core CPU; resumable
    .venv/bin/python benchmarks/study_defaults.py --quick           # smoke test: minutes
    .venv/bin/python benchmarks/study_defaults.py --resume --report # tables and plot from what has finished

Every model configuration of `CONFIGS` (the DAE included) is trained with the same budget on the
healthy subjects of the *realistic* phantom (`make_phantom(realism=True)`: normal FLAIR
hyper-intensities that fool a threshold, lesions that are not the brightest tissue), for each
modality setting of `SETTINGS` (FLAIR, T1, FLAIR+T2 as channels) and each seed, at 64 px; then
evaluated on the lesioned subjects with every predictor it supports (`PREDICTORS`), each beside the
intensity baseline on the same cases (`evaluate_dataset` computes it in the same pass, calibrated on
the same held-out healthy subjects). Stage 2 trains the best few (model, predictor) pairs again at
128 px. A run that finished (training and evaluation) is never redone with `--resume`; results are
written after every run, so the tables can be made at any time with `--report`.

How "best and robust" is decided (chosen before any result was seen): for a (model, predictor) pair
and one modality setting, its gain over the baseline is the mean over seeds of
(AUPRC / AUPRC_baseline + Dice / Dice_baseline) / 2 - 1 (pixel AUPRC and best Dice, the paired
baseline of the same run); a pair's score is the *minimum* of that gain over the modality settings
(a default must hold on every kind of data), its mean reported beside. Stage 2 retrains the
`--top` pairs by that score.

Left out, and why (evidence from the 36-run VAE study and the model comparison of
benchmarks/README.md): grad_kl, combi and the residual + grad_kl ensemble (below grad_elbo and the
residual at every beta), the projection predictor (never better than the residual, at ~21x its
cost), grad_rec (grad_elbo at small beta is grad_rec plus a small KL term). `--predictors` adds any
registered predictor; `--configs` picks model configurations (the GANs lost to every autoencoder
at twice the training cost in the model comparison).

Lesion-wise (issue 18): every record also keeps, per predictor, the lesion-wise metrics at the
calibrated threshold (lesion F1, recall, precision, false-positive lesions per case, recall of lesions
< 0.1 ml and 0.1-1 ml), the FROC score, Dice at the calibrated threshold and per-volume Dice.
`--posts vox,mm,fpl1,...` evaluates every predictor under several post-processing rules (`POSTS`) in
the same pass, the baseline under each of them too; "lesion gain" = mean over seeds of
(lesion F1 / lesion F1_baseline + FROC / FROC_baseline) / 2 - 1 against the baseline under the same
rule, and the lesion-wise ranking is by its worst setting. `--add` evaluates finished runs again
with labels or rules they lack (no training). The diffusion models (`CONFIG_TRAIN`) train at an
equal CPU budget.

    .venv/bin/python benchmarks/study_defaults.py --lesions ms --configs spatial_vae_b0.05 \
        --labels "grad_elbo_auto,grad_elbo+intensity,residual*intensity,residual_auto" --seeds 0 1 2 \
        --healthy 30 --lesioned 10 --sizes 64 --epochs 30 --posts vox,mm,mm6,fpl1,fpl3 \
        --work benchmarks/results/work_defaults_lesionwise --out benchmarks/results/study_defaults_lesionwise --resume

Writes benchmarks/results/study_defaults{_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from anomaseg import config as cfg  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402

# model configurations: preset file (configs/) and parameter overrides
CONFIGS = {
    "dense_ae": ("baur2018_dense_ae", {}),
    "spatial_ae": ("baur2018_spatial_ae", {}),
    "dense_vae_b0.05": ("baur2018_dense_vae", {"beta": 0.05}),
    "spatial_vae_b1": ("baur2018_spatial_vae", {}),
    "spatial_vae_b0.05": ("baur2018_spatial_vae", {"beta": 0.05}),
    "anovaegan": ("baur2018_anovaegan", {}),
    "skip_ganomaly": ("skipganomaly", {"base_channels": 32, "max_channels": 256}),  # CPU budget, as compare_models
    "dae": ("kascenas2022_dae", {}),
    "dae_half": ("kascenas2022_dae", {"base_channels": 32}),  # half the paper's width: 3x its slices per CPU s
    "pddpm": ("behrendt2023_pddpm", {}),
    "cddpm": ("behrendt2024_cddpm", {}),
    "mddpm": ("iqbal2023_mddpm", {}),
    "spatial_vae_b0.05_p64": ("baur2018_spatial_vae", {"beta": 0.05}),  # on 64 px patches: CONFIG_DATA
}
# data overrides per configuration: the model sees 64 px windows of the --sizes slice (data.patch_size),
# so at --sizes 128 (1 mm) it trains on crops and scores in overlapping windows at ~1.4 mm per pixel
CONFIG_DATA = {"spatial_vae_b0.05_p64": {"patch_size": 64}}
# training overrides per configuration: the diffusion models train ~15x fewer slices per CPU second
# than the autoencoders at 64 px (benchmarks/bench_pddpm.py: ~20 vs ~300 on one thread), so 2 epochs
# are about the CPU time of the autoencoders' 30 (an equal budget; each record keeps its train_seconds)
# The DAE at half width trains 45 slices per CPU second at 64 px, the VAE 399 (`bench_dae.py --probe
# --batch-size 32 --modalities flair`, one thread, bf16, Intel Xeon with AMX): its 5 epochs cost ~1.5x the
# VAE's 30 (chosen from an earlier NCHW timing, ~48 vs ~270); at least an equal budget, as for the diffusion models.
CONFIG_TRAIN = {"pddpm": {"epochs": 2}, "cddpm": {"epochs": 2}, "mddpm": {"epochs": 2}, "dae_half": {"epochs": 5}}
QUICK_PARAMS = {"skip_ganomaly": {"base_channels": 16, "max_channels": 128}}
SETTINGS = {"flair": ["flair"], "t1": ["t1"], "flair_t2": ["flair", "t2"]}
AUTO = {"polarity": "auto"}
# label -> (predictor, params, what the model must offer)
PREDICTORS = {
    "residual": ("residual", {}, "recon"),
    "residual_auto": ("residual", AUTO, "recon"),
    "residual+intensity": ("ensemble", {"members": [{"name": "residual", "params": AUTO}, "intensity"]}, "recon"),
    "grad_elbo": ("grad_elbo", {}, "vae"),
    "grad_elbo_auto": ("grad_elbo", AUTO, "vae"),
    # the default's Gaussian blur of the gradient map (sigma 2 model pixels, ~5 mm at 64 px) narrowed
    "grad_elbo_auto_s1": ("grad_elbo", {**AUTO, "sigma": 1.0}, "vae"),
    "grad_elbo_auto_s0": ("grad_elbo", {**AUTO, "sigma": 0.0}, "vae"),
    "grad_elbo+intensity": ("ensemble", {"members": [{"name": "grad_elbo", "params": AUTO}, "intensity"]}, "vae"),
    # the same pairs combined by max (either map flags a voxel) and product (both must)
    "residual|intensity": ("ensemble", {"members": [{"name": "residual", "params": AUTO}, "intensity"],
                                        "combine": "max"}, "recon"),
    "residual*intensity": ("ensemble", {"members": [{"name": "residual", "params": AUTO}, "intensity"],
                                        "combine": "product"}, "recon"),
    "grad_elbo|intensity": ("ensemble", {"members": [{"name": "grad_elbo", "params": AUTO}, "intensity"],
                                         "combine": "max"}, "vae"),
    "grad_elbo*intensity": ("ensemble", {"members": [{"name": "grad_elbo", "params": AUTO}, "intensity"],
                                         "combine": "product"}, "vae"),
}
METRICS = ("pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold")
# lesion-wise metrics at the calibrated threshold (lesion_metrics.py, lesion_sweep.py)
LESION_METRICS = ("lesion_f1", "lesion_recall", "lesion_precision", "false_positive_lesions_per_case", "froc_score",
                  "per_volume_dice_mean")
SIZE_BANDS = ("<0.1 ml", "0.1-1 ml")  # recall per true-lesion volume band (lesion_metrics.SIZE_BIN_NAMES)
# post-processing rules evaluated in the same pass (`score` overrides of each run; "vox" = the run's own:
# 5-voxel median, components < 8 voxels dropped, the 0.5%-healthy-voxel threshold, under voxel_fpr in
# every run made before the default became hysteresis at 1 FP lesion per healthy case (= "hyst1"), and
# under that rule since; "fpr" names voxel_fpr explicitly)
POSTS = {
    "vox": {},
    "fpr": {"calibration": "voxel_fpr"},
    "mm": {"size_units": "mm"},  # 3 mm median (none at 2 mm), components < 0.01 ml dropped, same threshold rule
    "fpl1": {"calibration": "fp_lesions", "healthy_fp_lesions": 1.0},  # threshold + min volume: <= 1 FP lesion/case
    "fpl3": {"calibration": "fp_lesions", "healthy_fp_lesions": 3.0},
    "mm6": {"size_units": "mm", "median_mm": 6.0},  # 3-voxel median at 2 mm (5 at 1 mm), components < 0.01 ml dropped
    "mm6fpl3": {"calibration": "fp_lesions", "healthy_fp_lesions": 3.0, "median_mm": 6.0},
    # hysteresis: the run's threshold for extent, components kept where their peak exceeds a second
    # threshold fitted to <= 1 / 3 FP lesions per healthy case (no minimum volume fitted)
    "hyst1": {"calibration": "hysteresis", "healthy_fp_lesions": 1.0},
    "hyst3": {"calibration": "hysteresis", "healthy_fp_lesions": 3.0},
    "mmhyst1": {"calibration": "hysteresis", "healthy_fp_lesions": 1.0, "size_units": "mm"},
    "mmhyst3": {"calibration": "hysteresis", "healthy_fp_lesions": 3.0, "size_units": "mm"},
    "mm6hyst3": {"calibration": "hysteresis", "healthy_fp_lesions": 3.0, "size_units": "mm", "median_mm": 6.0},
}

FULL = dict(healthy=40, lesioned=12, epochs=12, batch_size=32, max_steps=None, seeds=[0, 1, 2], sizes=[64, 128], top=2)
QUICK = dict(healthy=5, lesioned=2, epochs=1, batch_size=16, max_steps=3, seeds=[0, 1], sizes=[32, 64], top=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budget, 2 seeds, 32/64 px")
    p.add_argument("--configs", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--settings", help=f"comma-separated subset of {', '.join(SETTINGS)}")
    p.add_argument("--predictors", help="extra registered predictors to evaluate (comma-separated names)")
    p.add_argument("--labels", help=f"only these of the study's predictor labels: {', '.join(PREDICTORS)}")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--healthy", type=int)
    p.add_argument("--lesioned", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--sizes", type=int, nargs="+", help="image sizes: stage 1 (all pairs), then stage 2 (the top pairs)")
    p.add_argument("--top", type=int, help="pairs retrained at the stage-2 size")
    p.add_argument("--phantom-seed", type=int, default=0)
    p.add_argument("--resolution", type=float, default=2.0, help="phantom voxel size in mm (2: every study so far)")
    p.add_argument("--no-realism", action="store_true", help="the phantom without the realism features")
    p.add_argument("--lesions", choices=["default", "ms"], default="default",
                   help="ms: lesioned subjects carry realistic MS lesion loads (make_phantom(lesion_load='ms'): "
                        "20-50 mostly 0.01-0.5 ml lesions each); work folder and outputs get the suffix _ms")
    p.add_argument("--posts", default="vox",
                   help=f"post-processing rules evaluated on every run, comma-separated subset of {', '.join(POSTS)} "
                        "(labels get '@rule' except vox; the baseline is evaluated under each rule too)")
    p.add_argument("--add", action="store_true",
                   help="evaluate finished runs again with the --labels / --posts they lack (no training), "
                        "adding them to their records")
    p.add_argument("--work", help="working folder (default benchmarks/results/work_defaults[_quick][_ms])")
    p.add_argument("--resume", action="store_true", help="reuse finished runs")
    p.add_argument("--report", action="store_true", help="only (re)write the tables from finished runs")
    p.add_argument("--out", help="output stem (default benchmarks/results/study_defaults[_quick])")
    args = p.parse_args(argv)
    args.labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if args.labels and set(args.labels) - set(PREDICTORS):
        p.error(f"--labels: unknown {', '.join(sorted(set(args.labels) - set(PREDICTORS)))}")
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------- runs
def run_config(config_name: str, setting: str, size: int, seed: int, args, train_dir: Path, cache: Path) -> cfg.RunConfig:
    preset, params = CONFIGS[config_name]
    params = {**params, **(QUICK_PARAMS.get(config_name, {}) if args.quick else {})}
    data = dict(CONFIG_DATA.get(config_name, {}))
    if data.get("patch_size", 0) > size:  # slices no larger than the patch (--quick's 32 px): whole slices
        data["patch_size"] = 0
    overrides = {"data": {"modalities": SETTINGS[setting], "image_size": size, "cache_dir": str(cache), **data},
                 "model": {"params": params},
                 "train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": seed,
                           "max_steps_per_epoch": args.max_steps, **CONFIG_TRAIN.get(config_name, {})},
                 "score": {"predictor": "residual"}}
    config = cfg.resolve(ROOT / "configs" / f"{preset}.yaml", overrides)
    config.train_dir = str(train_dir)
    return config


def post_label(label: str, post: str) -> str:
    return label if post == "vox" else f"{label}@{post}"


def predictor_specs(model, extra: list[str], posts: list[str] = ("vox",), labels: list[str] | None = None) -> dict:
    """{label[@post]: spec} of every predictor the model offers (of `labels`, default all) under every
    post-processing rule; the baseline under the rules other than the run's own as "intensity@post"."""
    from anomaseg.predictors import model_capabilities

    caps = model_capabilities(model)
    base = {label: {"name": name, "params": params} for label, (name, params, need) in PREDICTORS.items()
            if need in caps and (labels is None or label in labels)}
    for name in extra:
        base.setdefault(name, {"name": name, "params": {}})
    specs = {}
    for post in posts:
        chosen = {**base, "intensity": {"name": "intensity", "params": {}}}  # the baseline, always reported
        for label, spec in chosen.items():
            specs[post_label(label, post)] = {**spec, **({"score": POSTS[post]} if POSTS[post] else {})}
    return specs


def record_metrics(m: dict) -> dict:
    """What a study record keeps of one predictor's metrics.json."""
    out = {k: m[k] for k in METRICS}
    out["image_auroc"] = m["image_auroc"]
    out.update({k: m.get(k) for k in LESION_METRICS})
    by_size = m.get("recall_by_lesion_size", {})
    out["recall_by_size"] = {band: by_size.get(band, {}).get("recall") for band in SIZE_BANDS}
    out["lesions_by_size"] = {band: by_size.get(band, {}).get("n_lesions") for band in SIZE_BANDS}
    out["n_true_lesions"] = m.get("n_true_lesions")
    out["threshold"] = m.get("threshold")
    out["per_case_dice"] = {r["case_id"]: r["dice"] for r in m["per_case"]}
    return out


def run_key(config_name: str, setting: str, size: int, seed: int) -> str:
    return f"{config_name}__{setting}__{size}px__seed{seed}"


def train_and_evaluate(key: str, config: cfg.RunConfig, work: Path, test_dir: Path, extra: list[str],
                       posts: list[str] = ("vox",), labels: list[str] | None = None) -> dict:
    """Train (afresh) and evaluate one run; returns its record (metrics of every predictor + baseline)."""
    from anomaseg.evaluation import evaluate_dataset
    from anomaseg.run import RunPaths, load_checkpoint, load_model
    from anomaseg.training import train

    run, evaluation = work / "runs" / key, work / "eval" / key
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(evaluation, ignore_errors=True)
    t0 = time.perf_counter()
    train(config, run, progress=False)
    train_seconds = time.perf_counter() - t0
    model, _ = load_model(run)
    results = evaluate_dataset(run, test_dir, evaluation, predictors=predictor_specs(model, extra, posts, labels),
                               progress=False)
    history = load_checkpoint(RunPaths(run).last)["history"]
    record = {"key": key, "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0 - train_seconds,
              "slices_per_second": statistics.median(h["slices_per_second"] for h in history),
              "parameters": sum(p.numel() for p in model.parameters()), "predictors": {}}
    for label, m in results.items():
        record["predictors"][label] = record_metrics(m)
    record["baseline"] = record["predictors"].pop("intensity")
    record["baselines"] = {post: record["predictors"].pop(post_label("intensity", post)) for post in posts
                           if post != "vox"}
    shutil.rmtree(run / "samples", ignore_errors=True)  # keep checkpoints and evaluations, not the PNGs
    return record


# ------------------------------------------------------------------------------------- analysis
def gain(m: dict, base: dict) -> float:
    """Mean relative gain in AUPRC and best Dice over the paired baseline."""
    parts = [m[k] / base[k] for k in ("pixel_auprc", "dice_best") if base[k] and base[k] > 0]
    return statistics.fmean(parts) - 1 if parts else math.nan


def lesion_gain(m: dict, base: dict) -> float:
    """Mean relative gain in lesion F1 (at the calibrated threshold) and FROC score over the paired baseline."""
    parts = [m[k] / base[k] for k in ("lesion_f1", "froc_score")
             if m.get(k) is not None and base.get(k) is not None and base[k] > 0]
    return statistics.fmean(parts) - 1 if parts else math.nan


def paired_baseline(rec: dict, label: str) -> dict:
    """The baseline evaluated under the same post-processing rule as `label`."""
    post = label.rpartition("@")[2] if "@" in label else "vox"
    return rec["baseline"] if post == "vox" else rec["baselines"][post]


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: dict, size: int) -> dict:
    """{(config, predictor): {setting: {metric: (mean, std), ..., "gain": (mean, std), "n": seeds}}};
    the baseline as ("baseline", "intensity"), one value per (setting, seed): it does not depend on
    the model (every run of a seed holds out the same healthy subjects)."""
    groups: dict = {}
    baselines: dict = {}
    for rec in records.values():
        if rec["size"] != size:
            continue
        for label, m in rec["predictors"].items():
            groups.setdefault((rec["config"], label), {}).setdefault(rec["setting"], []).append(
                (m, paired_baseline(rec, label)))
        for post, base in {"vox": rec["baseline"], **rec.get("baselines", {})}.items():
            baselines.setdefault(post_label("intensity", post), {}).setdefault(rec["setting"], {})[rec["seed"]] = base
    for label, by_setting in baselines.items():
        groups[("baseline", label)] = {s: [(b, b) for b in by_seed.values()] for s, by_seed in by_setting.items()}
    out = {}
    for pair, by_setting in groups.items():
        out[pair] = {}
        for setting, runs in by_setting.items():
            entry = {k: mean_std([m[k] for m, _ in runs]) for k in METRICS}
            entry["baseline_auprc"] = mean_std([b["pixel_auprc"] for _, b in runs])
            entry["baseline_dice"] = mean_std([b["dice_best"] for _, b in runs])
            entry["gain"] = mean_std([gain(m, b) for m, b in runs])
            entry["n"] = len(runs)
            if all("lesion_f1" in m for m, _ in runs):
                entry.update({k: mean_std([m[k] for m, _ in runs]) for k in LESION_METRICS})
                entry.update({f"baseline_{k}": mean_std([b[k] for _, b in runs]) for k in LESION_METRICS})
                for band in SIZE_BANDS:
                    entry[f"recall {band}"] = mean_std([m["recall_by_size"][band] for m, _ in runs])
                    entry[f"baseline_recall {band}"] = mean_std([b["recall_by_size"][band] for _, b in runs])
                entry["dice_thr_over_best"] = mean_std([m["dice_at_threshold"] / m["dice_best"] for m, _ in runs
                                                        if m["dice_best"]])
                entry["lesion_gain"] = mean_std([lesion_gain(m, b) for m, b in runs])
            out[pair][setting] = entry
    return out


def ranking(agg: dict, settings: list[str]) -> list[tuple]:
    """Pairs with results in every setting, best first: (pair, min gain, mean gain)."""
    rows = []
    for pair, by_setting in agg.items():
        if pair[0] == "baseline" or any(s not in by_setting for s in settings):
            continue
        gains = [by_setting[s]["gain"][0] for s in settings]
        rows.append((pair, min(gains), statistics.fmean(gains)))
    return sorted(rows, key=lambda r: (-r[1], -r[2]))


def lesion_ranking(agg: dict, settings: list[str]) -> list[tuple]:
    """Like `ranking`, by the lesion-wise gain (lesion F1 and FROC score over the paired baseline)."""
    rows = []
    for pair, by_setting in agg.items():
        if pair[0] == "baseline" or any(s not in by_setting or "lesion_gain" not in by_setting[s] for s in settings):
            continue
        gains = [by_setting[s]["lesion_gain"][0] for s in settings]
        rows.append((pair, min(gains), statistics.fmean(gains)))
    return sorted(rows, key=lambda r: (-r[1], -r[2]))


def lesion_markdown(agg: dict, settings: list[str], size: int) -> list[str]:
    """Lesion-wise tables of one image size: every (model, predictor@rule) beside the baseline under
    each rule, per setting; then the ranking by the worst setting's lesion gain."""
    lines = []
    cols = ["lesion F1", "FROC", "recall <0.1 ml", "recall 0.1-1 ml", "FP lesions/case", "Dice at thr",
            "best Dice", "AUPRC", "lesion gain", "pooled gain", "seeds"]
    keys = ["lesion_f1", "froc_score", "recall <0.1 ml", "recall 0.1-1 ml", "false_positive_lesions_per_case",
            "dice_at_threshold", "dice_best", "pixel_auprc"]
    for setting in settings:
        rows = [(pair, e[setting]) for pair, e in agg.items() if setting in e and "lesion_gain" in e[setting]]
        if not rows:
            continue
        rows.sort(key=lambda r: (r[0][0] != "baseline", -r[1]["lesion_gain"][0]))
        lines += [f"### Lesion-wise, {setting.replace('_', ' + ').upper()} ({size} px)", "",
                  "| model | predictor@rule | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for (config_name, label), e in rows:
            name = "**baseline**" if config_name == "baseline" else config_name
            cells = [fmt(e[k]) for k in keys]
            gains = ("0", "0") if config_name == "baseline" else (f"{e['lesion_gain'][0]:+.1%}", f"{e['gain'][0]:+.1%}")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {gains[0]} | {gains[1]} | {e['n']} |")
        lines.append("")
    ranked = lesion_ranking(agg, settings)
    if ranked:
        reference = agg.get(REFERENCE)
        lines += [f"### Lesion-wise ranking at {size} px (score = worst setting's lesion gain over the baseline "
                  "under the same rule)", "",
                  f"Pooled vs {REFERENCE[0]} / {REFERENCE[1]}: the lowest ratio of pixel AUPRC or best Dice to that pair's "
                  "(today's default, under its own rule) over the settings; the issue allows 0.95.", "",
                  "| rank | model | predictor@rule | worst-setting lesion gain | mean | " + " | ".join(settings)
                  + " | worst-setting pooled gain | pooled vs today's default |",
                  "|---|---|---|---|---|" + "---|" * len(settings) + "---|---|"]
        for i, ((config_name, label), worst, mean) in enumerate(ranked[:40], 1):
            e = agg[(config_name, label)]
            cells = " | ".join(f"{e[s]['lesion_gain'][0]:+.1%}" for s in settings)
            pooled = min(e[s]["gain"][0] for s in settings)
            vs = (min(e[s][k][0] / reference[s][k][0] for s in settings for k in ("pixel_auprc", "dice_best"))
                  if reference and all(s in reference for s in settings) else math.nan)
            lines.append(f"| {i} | {config_name} | {label} | {worst:+.1%} | {mean:+.1%} | {cells} | {pooled:+.1%} | "
                         f"{vs:.3f} |")
        lines.append("")
    return lines


REFERENCE = ("spatial_vae_b0.05", "grad_elbo_auto")  # today's default (model, predictor under the vox rule)


def fmt(ms) -> str:
    mean, std = ms
    return "n/a" if math.isnan(mean) else f"{mean:.3f} +- {std:.3f}"


def markdown(agg_by_size: dict, settings: list[str], setup: dict) -> str:
    lines = [f"# Defaults study ({'quick smoke test' if setup['quick'] else 'full'})", "",
             f"Realistic phantom ({'realism on' if setup['realism'] else 'realism OFF'}"
             f"{', MS lesion loads' if setup.get('lesion_load') == 'ms' else ''}): {setup['healthy']} healthy "
             f"subjects (80% train, 20% held out for validation and calibration), {setup['lesioned']} lesioned test "
             f"subjects; {setup['epochs']} epochs of batches of {setup['batch_size']}; seeds "
             f"{', '.join(map(str, setup['seeds']))}. Pixel AUPRC and best Dice, mean +- std over seeds; "
             "gain = mean over seeds of (AUPRC/AUPRC_baseline + Dice/Dice_baseline)/2 - 1 against the intensity "
             "baseline of the same run. Machine: " + setup["machine"] + ".", ""]
    for size, agg in agg_by_size.items():
        ranked = ranking(agg, settings)
        if not agg:
            continue
        lines += [f"## {size} px", ""]
        for setting in settings:
            base = agg.get(("baseline", "intensity"), {}).get(setting)
            rows = sorted(((pair, e[setting]) for pair, e in agg.items() if setting in e and pair[0] != "baseline"),
                          key=lambda r: -r[1]["gain"][0])
            if not rows:
                continue
            lines += [f"### {setting.replace('_', ' + ').upper()}", "",
                      "| model | predictor | pixel AUROC | pixel AUPRC | best Dice | Dice at threshold | gain over baseline | seeds |",
                      "|---|---|---|---|---|---|---|---|"]
            if base:
                lines.append(f"| **baseline** | intensity | {fmt(base['pixel_auroc'])} | {fmt(base['pixel_auprc'])} | "
                             f"{fmt(base['dice_best'])} | {fmt(base['dice_at_threshold'])} | 0 | {base['n']} |")
            for (config_name, label), e in rows:
                lines.append(f"| {config_name} | {label} | {fmt(e['pixel_auroc'])} | {fmt(e['pixel_auprc'])} | "
                             f"{fmt(e['dice_best'])} | {fmt(e['dice_at_threshold'])} | {e['gain'][0]:+.1%} "
                             f"+- {e['gain'][1]:.1%} | {e['n']} |")
            lines.append("")
        if ranked:
            lines += [f"### Ranking at {size} px (pairs with every setting; score = worst setting's gain)", "",
                      "| rank | model | predictor | worst-setting gain | mean gain | " + " | ".join(settings) + " |",
                      "|---|---|---|---|---|" + "---|" * len(settings)]
            for i, ((config_name, label), worst, mean) in enumerate(ranked[:12], 1):
                cells = " | ".join(f"{agg[(config_name, label)][s]['gain'][0]:+.1%}" for s in settings)
                lines.append(f"| {i} | {config_name} | {label} | {worst:+.1%} | {mean:+.1%} | {cells} |")
            lines.append("")
        lines += lesion_markdown(agg, settings, size)
    return "\n".join(lines) + "\n"


def plot(agg_by_size: dict, settings: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    size = min(agg_by_size)
    agg = agg_by_size[size]
    ranked = [pair for pair, _, _ in ranking(agg, settings)][:10]
    if not ranked:
        return
    fig = Figure(figsize=(4.2 * len(settings), 4.6))
    axes = fig.subplots(1, len(settings), sharey=True, squeeze=False)[0]
    for ax, setting in zip(axes, settings):
        ys = range(len(ranked))
        for offset, key, colour, name in ((-0.2, "pixel_auprc", "C0", "pixel AUPRC"), (0.2, "dice_best", "C1", "best Dice")):
            vals = [agg[p][setting][key] for p in ranked]
            ax.barh([y + offset for y in ys], [v[0] for v in vals], height=0.38, xerr=[v[1] for v in vals],
                    color=colour, label=name)
        base = agg.get(("baseline", "intensity"), {}).get(setting)
        if base:
            ax.axvline(base["pixel_auprc"][0], color="C0", ls="--", lw=1, label="baseline AUPRC")
            ax.axvline(base["dice_best"][0], color="C1", ls="--", lw=1, label="baseline Dice")
        ax.set_yticks(list(ys), [f"{c} / {p}" for c, p in ranked], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(f"{setting.replace('_', ' + ').upper()} ({size} px)", fontsize=10)
        ax.legend(fontsize=6, loc="lower right")
    axes[0].invert_yaxis()  # shared y axis: once, best pair on top
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def machine() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("Model name")), "?")
        bf16 = "avx512_bf16" in info
    except (OSError, subprocess.CalledProcessError):
        model, bf16 = platform.processor() or platform.machine(), False
    return f"{model}, {os.cpu_count()} cores, {'AVX512-BF16 (bf16 autocast)' if bf16 else 'no bf16 (fp32)'}"


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    from anomaseg.data.phantom import make_phantom

    suffix = ("_quick" if args.quick else "") + ("_ms" if args.lesions == "ms" else "")
    work = Path(args.work) if args.work else ROOT / "benchmarks" / "results" / f"work_defaults{suffix}"
    out_stem = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"study_defaults{suffix}"
    configs = [c.strip() for c in args.configs.split(",")] if args.configs else list(CONFIGS)
    settings = [s.strip() for s in args.settings.split(",")] if args.settings else list(SETTINGS)
    extra = [p.strip() for p in args.predictors.split(",")] if args.predictors else []
    bad = sorted(set(configs) - set(CONFIGS)) + sorted(set(settings) - set(SETTINGS))
    if bad:
        raise SystemExit(f"unknown config(s)/setting(s): {', '.join(bad)}")
    posts = [x.strip() for x in args.posts.split(",")]
    if set(posts) - set(POSTS) or ("vox" not in posts and not args.add):
        raise SystemExit(f"--posts: a subset of {', '.join(POSTS)} that includes vox (the runs' own rule)")
    records = load_records(work) if (args.resume or args.report or args.add) else {}
    setup = {"quick": args.quick, "configs": configs, "settings": settings, "seeds": args.seeds, "sizes": args.sizes,
             "healthy": args.healthy, "lesioned": args.lesioned, "epochs": args.epochs, "batch_size": args.batch_size,
             "max_steps_per_epoch": args.max_steps, "phantom_seed": args.phantom_seed, "realism": not args.no_realism,
             "lesion_load": args.lesions, "posts": {p: POSTS[p] for p in posts}, "resolution_mm": args.resolution,
             "top": args.top, "machine": machine(), "torch_threads": None,
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def save(key):  # one file per run: several study processes (disjoint seeds or settings) share a work folder
        write_text(work / "records" / f"{key}.json", json.dumps(records[key], indent=1))

    if args.add:
        labels = args.labels or list(PREDICTORS)
        for key, rec in sorted(records.items()):
            if rec["config"] in configs and rec["setting"] in settings and rec["size"] in args.sizes \
                    and rec["seed"] in args.seeds:
                if add_to_record(rec, work, labels, posts):
                    save(key)
                    print(f"added to {key}", flush=True)
    elif not args.report:
        import torch

        setup["torch_threads"] = torch.get_num_threads()
        phantom = work / "phantom"
        print(f"phantom: {args.healthy} healthy + {args.lesioned} lesioned subjects in {phantom}", flush=True)
        kwargs = {} if args.no_realism else {"realism": True}
        if args.lesions != "default":
            kwargs["lesion_load"] = args.lesions
        made = dict(healthy=args.healthy, lesioned=args.lesioned, seed=args.phantom_seed, resolution=args.resolution,
                    **kwargs)
        marker = phantom / "study_phantom.json"  # made once per work folder (several study processes share it)
        if not (marker.exists() and {"resolution": 2.0, **json.loads(marker.read_text())} == made):
            make_phantom(phantom, args.healthy, args.lesioned, seed=args.phantom_seed, resolution=args.resolution,
                         modalities=("t1", "t2", "flair"), **kwargs)
            write_text(marker, json.dumps(made))
        t0 = time.perf_counter()
        stage1 = [(c, s, args.sizes[0], seed) for seed in args.seeds for s in settings for c in configs]
        for i, (c, s, size, seed) in enumerate(stage1):
            execute(records, c, s, size, seed, args, work, extra, posts, save, f"[stage 1: {i + 1}/{len(stage1)}]", t0)
        if len(args.sizes) > 1:
            top = ranking(aggregate(records, args.sizes[0]), settings)[:args.top]
            chosen = sorted({c for (c, _), _, _ in top})
            print(f"stage 2 at {args.sizes[1]} px: {', '.join(f'{c} / {p}' for (c, p), _, _ in top)}", flush=True)
            stage2 = [(c, s, args.sizes[1], seed) for seed in args.seeds for s in settings for c in chosen]
            for i, (c, s, size, seed) in enumerate(stage2):
                execute(records, c, s, size, seed, args, work, extra, posts, save, f"[stage 2: {i + 1}/{len(stage2)}]", t0)

    agg_by_size = {size: aggregate(records, size) for size in sorted({r["size"] for r in records.values()})}
    table = markdown(agg_by_size, settings, setup)
    result = {"setup": setup, "runs": records,
              "summary": {str(size): {f"{c}/{p}": e for (c, p), e in agg.items()} for size, agg in agg_by_size.items()}}
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    write_text(out_stem.with_suffix(".json"), json.dumps(result, indent=1, default=str))
    write_text(out_stem.with_suffix(".md"), table)
    if agg_by_size:
        plot(agg_by_size, settings, out_stem.with_suffix(".png"))
    print(table)
    return 0


def add_to_record(rec: dict, work: Path, labels: list[str], posts: list[str]) -> bool:
    """Evaluate a finished run with the labels x posts its record lacks (and the baseline under new
    posts) in one pass; False when nothing was missing."""
    from anomaseg.evaluation import evaluate_dataset
    from anomaseg.run import load_model

    run = work / "runs" / rec["key"]
    model, _ = load_model(run)
    have = set(rec["predictors"]) | {post_label("intensity", p) for p in ["vox", *rec.get("baselines", {})]}
    specs = {label: spec for label, spec in predictor_specs(model, [], posts, labels).items() if label not in have}
    if not specs:
        return False
    if "intensity" not in specs:
        specs["intensity"] = {"name": "intensity", "params": {}}  # the run's own baseline, so several are reported
    out = work / "eval_added" / rec["key"]
    shutil.rmtree(out, ignore_errors=True)
    results = evaluate_dataset(run, work / "phantom" / "test", out, predictors=specs, progress=False)
    for label, m in results.items():
        if label == "intensity":
            continue
        if label.startswith("intensity@"):
            rec.setdefault("baselines", {})[label.partition("@")[2]] = record_metrics(m)
        else:
            rec["predictors"][label] = record_metrics(m)
    shutil.rmtree(out / "maps", ignore_errors=True)
    return True


def load_records(work: Path) -> dict:
    """Finished runs: work/records/<key>.json (and the single records.json of earlier versions)."""
    records = json.loads((work / "records.json").read_text()) if (work / "records.json").exists() else {}
    for path in sorted((work / "records").glob("*.json")):
        records[path.stem] = json.loads(path.read_text())
    return records


def execute(records, c, s, size, seed, args, work, extra, posts, save, tag, t0) -> None:
    import torch

    key = run_key(c, s, size, seed)
    if args.resume or args.report:
        done = work / "records" / f"{key}.json"  # finished since this process started: another study process's run
        if key not in records and done.exists():
            records[key] = json.loads(done.read_text())
        if key in records:
            return
    config = run_config(c, s, size, seed, args, work / "phantom" / "train", work / "cache")
    rec = train_and_evaluate(key, config, work, work / "phantom" / "test", extra, posts, args.labels)
    rec.update(config=c, setting=s, size=size, seed=seed, load_average=round(os.getloadavg()[0], 2),
               torch_threads=torch.get_num_threads())
    records[key] = rec
    save(key)
    best = max(rec["predictors"].items(), key=lambda kv: gain(kv[1], rec["baseline"]))
    print(f"{tag} {key}: baseline AUPRC {rec['baseline']['pixel_auprc']:.3f} Dice {rec['baseline']['dice_best']:.3f}; "
          f"best {best[0]} AUPRC {best[1]['pixel_auprc']:.3f} Dice {best[1]['dice_best']:.3f}; "
          f"train {rec['train_seconds']:.0f} s, eval {rec['eval_seconds']:.0f} s "
          f"(elapsed {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
