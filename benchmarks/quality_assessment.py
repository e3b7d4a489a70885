"""Benchmark: segmentation quality assessment without ground truth (Zhou, Deng & Wu, MIDL 2020).

    .venv/bin/python benchmarks/quality_assessment.py           # full: see the budget below
    .venv/bin/python benchmarks/quality_assessment.py --quick   # smoke test, a few minutes

On the built-in phantom (FLAIR, 2 mm; lesioned subjects alternate MS-like lesions and tumours):

1. Candidate segmentations of widely spread quality for every lesioned subject, from three kinds
   of source (`anomaseg.quality.segmenters`): a spatial VAE trained on the healthy subjects,
   stopped after several epochs, its post-processed residual map thresholded at several multiples
   of its healthy-calibrated threshold ("our models' segmentations at several thresholds and
   epochs", `anomaly_candidates`); small supervised U-Nets of several depths, widths and training
   lengths, each thresholded at probabilities 0.3 / 0.5 / 0.7 (`unet_candidates`, as the paper made
   its pool: cross-fitted over two folds of the training subjects, and fitted on all training
   subjects for the test subjects, so no U-Net segments a subject it was fitted on); and
   perturbations of the ground truth (`anomaseg.quality.pool`); per subject a subset balanced over
   Dice (`select_balanced`), as the paper balanced its pool.
2. Lesioned subjects are split by subject: the QA model (REC-Net, then REG-Net on (I_dif, S), on
   (I, S) as Robinson et al. 2018, and on both) is fitted on the training subjects' pools only
   (`fit_quality`, its own validation subjects among them); nothing of a test subject is seen.
   `fit_quality` recalibrates each variant's predicted Dice on its validation subjects' pool
   (`anomaseg.quality.calibration`, isotonic); both the raw and the recalibrated predictions are
   reported, with calibration plots (predicted against true Dice, one PNG per variant).
3. On the test subjects' pools: MAE, Pearson r and Spearman rho between predicted and true Dice,
   and the AUROC of flagging failed segmentations (true Dice < 0.5, scored by 1 - predicted Dice),
   for the three REG-Net variants and three baselines fitted on the training pool: the
   training-pool mean, and linear maps of two cues, the mean anomaly score of the VAE's final map
   inside the segmentation and the mean normalised FLAIR inside it.
4. FGSM (`anomaseg.quality.attack`: one signed-gradient step on the normalised image slices, through
   REC-Net for the difference variants) at eps 0.05, 0.1, 0.2, 0.3 on the paper's intensity scale
   (each case min-max scaled to [0, 1]; converted per case by `eps_on_our_scale`, see attack.py):
   MAE of each variant, raw and recalibrated.
Also reported: the same metrics on every VAE and U-Net segmentation of the test subjects (no
balancing), the realistic case of assessing one's own segmentations, and per source on the pool.

Budget: this runs on a 2-core machine shared with other jobs, so torch uses one thread (--threads)
and the training steps run eagerly (COMPILE). The full plan (FULL) is 8 healthy + 24 lesioned
subjects, 16 training / 8 test subjects, 12 candidates per subject, REC-Net 10 epochs and REG-Net
8 epochs per variant, on 32 px slices (about 6 minutes there): shrunk from LARGER (64 px, 16
candidates, 15 / 12 epochs, `--larger`, not run) while a spinning OpenMP thread (see the
environment settings below) slowed the training loop 20-40x. `--lesioned 56` gives 48 fitting
subjects (about 13 minutes).

REG-Net's regularisation (flips / 90-degree rotations, channel dropout, weight decay: `REGNet`) and
loss are set with --reg-params, e.g. `--reg-params '{"augment": false, "dropout": 0, "weight_decay": 0}'`
for the unregularised network, `'{"loss": "counts"}'` for the loss before issue 20's fix;
--variants fits a subset of the variants, --reg-epochs sets REG-Net's epochs.

Writes benchmarks/results/quality_assessment.{json,md} (--quick: quality_assessment_quick.*), with
the machine (lscpu model and flags), the load average and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# One OpenMP thread unless asked otherwise, also for numba's (the post-processing median) and for
# threads started later; idle OpenMP threads sleep instead of spinning (as `anomaseg.cli` sets it).
# Set before torch and numba are imported; --threads sets torch's own count, each stage re-asserts it.
# Without these, an idle numba OpenMP thread spun beside the training loop after the scoring stage
# and training steps ran 5-20x slower than the same step alone.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from scipy import stats  # noqa: E402

from anomaseg import config as cfg  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.data.layout import find_cases  # noqa: E402
from anomaseg.data.phantom import make_phantom  # noqa: E402
from anomaseg.data.slices import load_case_volumes, normalise, prepare_case  # noqa: E402
from anomaseg.metrics import binary_auroc, dice_score  # noqa: E402
from anomaseg.quality.assessor import QualityConfig, fit_quality  # noqa: E402
from anomaseg.quality.attack import eps_on_our_scale, fgsm_predictions  # noqa: E402
from anomaseg.quality.calibration import calibration_figure  # noqa: E402
from anomaseg.quality.candidates import Candidate  # noqa: E402
from anomaseg.quality.pool import dice_bin, fill_pool, select_balanced  # noqa: E402
from anomaseg.quality.segmenters import UNetSpec, anomaly_candidates, unet_candidates  # noqa: E402
from anomaseg.training import train  # noqa: E402

# The full plan within about an hour on the shared 2-core machine (see the module docstring);
# LARGER is what we meant to run (64 px slices, more candidates and epochs: `--larger`).
FULL = dict(healthy=8, lesioned=24, test_subjects=8, image_size=32, vae_epochs=[1, 3, 6],
            thresholds=[0.5, 0.7, 1.0, 1.4, 2.0], pool_size=12, test_pool_size=12, rec_epochs=10, reg_epochs=8,
            batch_size=32, eps=[0.0, 0.05, 0.1, 0.2, 0.3],
            unets=[(2, 4, 1), (2, 8, 3), (3, 8, 2), (3, 16, 6)], unet_thresholds=[0.3, 0.5, 0.7])
LARGER = dict(FULL, image_size=64, pool_size=16, rec_epochs=15, reg_epochs=12)
QUICK = dict(healthy=3, lesioned=6, test_subjects=2, image_size=32, vae_epochs=[1, 2], thresholds=[0.7, 1.4],
             pool_size=6, test_pool_size=4, rec_epochs=2, reg_epochs=2, batch_size=16, eps=[0.0, 0.05, 0.1, 0.2, 0.3],
             unets=[(2, 4, 1), (2, 8, 3), (3, 8, 2)], unet_thresholds=[0.3, 0.5, 0.7])
EPS_SCALE = "unit"  # eps on the paper's scale: each case min-max scaled to [0, 1] (anomaseg.quality.attack)
VARIANTS = ["difference", "image", "both"]
# Eager training steps: the runs are short, so compiling (tens of seconds per network) does not pay.
COMPILE = "off"
FAIL = 0.5  # a segmentation with true Dice below this has failed


class PackedMask:
    """A bool volume kept as bits (8x smaller); np.asarray() unpacks it."""

    def __init__(self, mask: np.ndarray):
        self.shape, self.bits = mask.shape, np.packbits(mask)

    def __array__(self, dtype=None, copy=None):
        return np.unpackbits(self.bits, count=math.prod(self.shape)).reshape(self.shape).astype(dtype or bool)


def machine() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Flags"):
                info["cpu_model" if key.strip() == "Model name" else "cpu_flags"] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = info.get("cpu_flags", "").split()
    info["avx512_bf16"] = "avx512_bf16" in flags
    return info


def stage(name: str, seconds: dict, threads: int | None = None) -> None:
    """Report a finished stage; re-assert torch's thread count."""
    if threads is not None:
        torch.set_num_threads(threads)
    print(f"[{time.strftime('%H:%M:%S')}] {name} done in {seconds[name]:.0f} s; load average {load()}",
          file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def link_subjects(phantom: Path, names: list[str], folder: Path) -> Path:
    """A dataset folder of symlinks to some of the phantom's lesioned subjects (split by subject)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for n in names:
        (folder / n).symlink_to((phantom / "test" / n).resolve(), target_is_directory=True)
    return folder


def model_segmentations(plan: dict, phantom: Path, work: Path, cases, progress: bool) -> tuple[dict, dict]:
    """VAE segmentations per subject (source, PackedMask) at several epochs and thresholds, and the
    final epoch's post-processed anomaly map per subject (float16)."""
    run = work / "vae"
    shutil.rmtree(run, ignore_errors=True)
    config = cfg.resolve(overrides={"data": {"modalities": ["flair"], "image_size": plan["image_size"]},
                                    "model": {"name": "spatial_vae", "params": {"beta": 0.05}},
                                    "train": {"epochs": plan["vae_epochs"][0], "seed": 0,
                                              "compile": COMPILE},
                                    # thresholds x factors of the voxel rule, as before the default became
                                    # hysteresis (issue 18): the same candidate pools as every earlier run
                                    "score": {"calibration": "voxel_fpr"}})
    config.train_dir = str((phantom / "train").resolve())
    segs: dict = {c.case_id: [] for c in cases}
    prepared = [prepare_case(case, config.data.slice_spec()) for case in cases]
    for k, epochs in enumerate(plan["vae_epochs"]):
        train(config, run, resume=k > 0, epochs=epochs, progress=progress)
        found, smoothed = anomaly_candidates(run, prepared, factors=plan["thresholds"], label=f"vae_epoch{epochs}",
                                             progress=progress)
        for cid, found_segs in found.items():
            segs[cid] += [(source, PackedMask(seg)) for source, seg in found_segs]
    maps = {cid: m.astype(np.float16) for cid, m in smoothed.items()}  # the final epoch's
    return segs, maps


def unet_segmentations(plan: dict, train_cases, test_cases, seed: int, progress: bool) -> dict:
    """U-Net segmentations per subject (source, PackedMask): cross-fitted on the training subjects;
    fitted on all training subjects for the test subjects."""
    spec = cfg.DataConfig(modalities=["flair"], image_size=plan["image_size"]).slice_spec()
    fit = [prepare_case(c, spec) for c in train_cases]
    specs = [UNetSpec(*u) for u in plan["unets"]]
    found = unet_candidates(fit, specs, plan["unet_thresholds"], folds=2, seed=seed, progress=progress)
    found.update(unet_candidates(fit, specs, plan["unet_thresholds"], seed=seed, progress=progress,
                                 predict=[prepare_case(c, spec) for c in test_cases]))
    return {cid: [(source, PackedMask(seg)) for source, seg in segs] for cid, segs in found.items()}


def build_pools(plan: dict, cases, segs: dict, maps: dict, pool_size: int, seed: int) -> dict:
    """Per subject: a pool balanced over Dice from the VAE segmentations and perturbations, with each
    candidate's true Dice and cues; and all VAE segmentations (unbalanced) with theirs."""
    pools = {}
    for case in cases:
        vols, brain, truth = load_case_volumes(case, cfg.DataConfig(modalities=["flair"]).slice_spec())
        flair = normalise(vols[0].data, brain, cfg.DataConfig().slice_spec())
        amap = maps[case.case_id].astype(np.float32)
        rng = np.random.default_rng([seed, int(case.case_id.split("_")[-1])])
        model = [(src, np.asarray(m)) for src, m in segs[case.case_id]]
        model_dice = [dice_score(s, truth) for _, s in model]
        perts = fill_pool(truth, brain, model_dice, len(model) + pool_size, rng, flair)
        union = model + [(f"perturbation:{k}", s) for k, s, _ in perts]
        dices = model_dice + [d for _, _, d in perts]

        def record(src, s, d):
            inside = s.any()
            return {"source": src, "dice": d, "voxels": int(s.sum()), "seg": PackedMask(s),
                    "cue_anomaly": float(amap[s].mean()) if inside else 0.0,
                    "cue_flair": float(flair[s].mean()) if inside else 0.0}

        chosen = select_balanced(dices, pool_size, rng)
        pools[case.case_id] = {"pool": [record(*union[i], dices[i]) for i in chosen],
                               "model": [record(src, s, d) for (src, s), d in zip(model, model_dice)]}
    return pools


def metrics(pred, true) -> dict:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    failed = true < FAIL
    constant = np.ptp(pred) == 0
    return {"n": int(len(true)), "n_failed": int(failed.sum()), "mae": float(np.abs(pred - true).mean()),
            "pearson_r": math.nan if constant else float(stats.pearsonr(pred, true)[0]),
            "spearman_rho": math.nan if constant else float(stats.spearmanr(pred, true)[0]),
            "failure_auroc": binary_auroc(1 - pred, failed) if 0 < failed.sum() < len(failed) else math.nan}


def linear_map(x_train, y_train):
    slope, intercept = np.polyfit(np.asarray(x_train, float), np.asarray(y_train, float), 1)
    return lambda x: np.clip(slope * np.asarray(x, float) + intercept, 0, 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--larger", action="store_true", help="the larger plan (64 px slices, more candidates and epochs)")
    ap.add_argument("--lesioned", type=int, help="lesioned phantom subjects (default 24; 8 of them are the test subjects)")
    ap.add_argument("--work", help="working folder (default benchmarks/results/work_qa[_quick])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", help="QA training precision (auto, bf16, 32)")
    ap.add_argument("--out", help="output stem (default benchmarks/results/quality_assessment[_quick])")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the machine is shared; the stage times depend on it)")
    ap.add_argument("--reg-params", default=None,
                    help="REG-Net keywords as JSON, e.g. '{\"augment\": false, \"weight_decay\": 0}' "
                         "(regularisation: anomaseg.quality.networks.REGNet; default: its defaults)")
    ap.add_argument("--reg-epochs", type=int, help="REG-Net epochs per variant (default: the plan's, 8 in the full plan)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS, help="REG-Net variants to fit")
    ap.add_argument("--train-sources", nargs="+", choices=["vae", "unet"], default=["vae", "unet"],
                    help="segmenters whose candidates may enter the training pool (perturbations always do); "
                         "e.g. --train-sources unet: the test pool's VAE segmentations come from a source left out of fitting")
    ap.add_argument("--retable", metavar="JSON", help="rewrite the .md table of an earlier run's JSON and stop")
    args = ap.parse_args(argv)
    if args.retable:
        report = json.loads(Path(args.retable).read_text())
        write_text(Path(args.retable).with_suffix(".md"), table(report))
        print(table(report))
        return
    variants = list(args.variants)
    reg_params = json.loads(args.reg_params) if args.reg_params else {}
    torch.set_num_threads(args.threads)
    plan = dict(QUICK if args.quick else LARGER if args.larger else FULL)
    if args.lesioned:
        plan["lesioned"] = args.lesioned
    if args.reg_epochs:
        plan["reg_epochs"] = args.reg_epochs
    suffix = "_quick" if args.quick else ""
    work = Path(args.work or ROOT / "benchmarks" / "results" / f"work_qa{suffix}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"quality_assessment{suffix}")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ANOMASEG_CACHE", str(work / "cache"))
    torch.manual_seed(args.seed)
    progress = sys.stderr.isatty()
    seconds, loads = {}, {"start": load()}

    t = time.perf_counter()
    phantom = work / "phantom"
    make_phantom(phantom, plan["healthy"], plan["lesioned"], seed=args.seed, modalities=("flair",))
    names = sorted(p.name for p in (phantom / "test").iterdir() if p.is_dir())
    test_names = names[-plan["test_subjects"]:]  # alternating MS / tumour by index: both in each split
    train_names = names[:-plan["test_subjects"]]
    train_dir = link_subjects(phantom, train_names, work / "qa_train")
    test_dir = link_subjects(phantom, test_names, work / "qa_test")
    cases = find_cases(train_dir, ["flair"]) + find_cases(test_dir, ["flair"])
    seconds["phantom"] = time.perf_counter() - t
    stage("phantom", seconds, args.threads)

    t = time.perf_counter()
    segs, maps = model_segmentations(plan, phantom, work, cases, progress)
    seconds["vae_segmentations"] = time.perf_counter() - t
    stage("vae_segmentations", seconds, args.threads)
    loads["after_vae"] = load()

    t = time.perf_counter()
    unet_segs = unet_segmentations(plan, cases[:len(train_names)], cases[len(train_names):], args.seed, progress)
    for cid, found in unet_segs.items():
        segs[cid] += found
    seconds["unet_segmentations"] = time.perf_counter() - t
    stage("unet_segmentations", seconds, args.threads)

    t = time.perf_counter()
    train_segs = {cid: [(src, m) for src, m in found if src.split("_")[0] in args.train_sources]
                  for cid, found in segs.items()}
    train_pools = build_pools(plan, cases[:len(train_names)], train_segs, maps, plan["pool_size"], args.seed)
    test_pools = build_pools(plan, cases[len(train_names):], segs, maps, plan["test_pool_size"], args.seed + 1)
    seconds["pools"] = time.perf_counter() - t
    stage("pools", seconds, args.threads)

    t = time.perf_counter()
    qa_dir = work / "qa"
    shutil.rmtree(qa_dir, ignore_errors=True)
    config = QualityConfig(image_size=plan["image_size"], variants=variants, pool_size=0, reg_params=reg_params,
                           calibration="isotonic",
                           rec_epochs=plan["rec_epochs"], reg_epochs=plan["reg_epochs"], batch_size=plan["batch_size"], seed=args.seed,
                           precision=args.precision, compile=COMPILE)
    given = [Candidate(cid, r["source"], array=r["seg"]) for cid, p in train_pools.items() for r in p["pool"]]
    assessor = fit_quality(train_dir, qa_dir, config, candidates=given, progress=progress)
    seconds["qa_fit"] = time.perf_counter() - t
    stage("qa_fit", seconds, args.threads)
    histories = {run: json.loads((qa_dir / run / "history.json").read_text())
                 for run in ["rec"] + [f"reg_{v}" for v in variants]}
    loads["after_fit"] = load()

    # ---------------------------------------------------------------- predictions and attacks
    t = time.perf_counter()
    test_cases = {c.case_id: c for c in find_cases(test_dir, ["flair"])}
    rows = []
    for cid, pools in test_pools.items():
        prepared = assessor.prepare(test_cases[cid])  # the ground truth is stripped
        for kind in ("pool", "model"):
            for r in pools[kind]:
                image, s, areas, outside = assessor.case_inputs(prepared, np.asarray(r["seg"]))
                row = {k: v for k, v in r.items() if k != "seg"}
                eps = eps_on_our_scale(plan["eps"], image, EPS_SCALE) if kind == "pool" else [0.0]
                row.update(case_id=cid, set=kind, eps_ours=eps)
                for v in variants:
                    row[v] = fgsm_predictions(assessor.pipeline(v), image, s, areas, outside, r["dice"], eps)
                    row[f"{v}_recalibrated"] = assessor.calibration(v)(row[v]).tolist()
                rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] assessed {cid}", file=sys.stderr, flush=True)
    seconds["predict_and_attack"] = time.perf_counter() - t
    loads["end"] = load()

    train_rows = [r for p in train_pools.values() for r in p["pool"]]
    true_train = [r["dice"] for r in train_rows]
    baselines = {"training_mean": lambda rs: np.full(len(rs), np.mean(true_train))}
    for cue in ("cue_anomaly", "cue_flair"):
        f = linear_map([r[cue] for r in train_rows], true_train)
        baselines[cue] = (lambda f_, c_: lambda rs: f_([r[c_] for r in rs]))(f, cue)

    predictors = [p for v in variants for p in (v, f"{v}_recalibrated")]
    results = {}
    for kind in ("pool", "model"):
        rs = [r for r in rows if r["set"] == kind]
        true = [r["dice"] for r in rs]
        res = {}
        for v in predictors:
            res[v] = metrics([r[v][0] for r in rs], true)
            res[v]["mean_predicted"] = float(np.mean([r[v][0] for r in rs]))
            if kind == "pool":
                res[v]["fgsm_mae"] = {str(e): float(np.mean([abs(r[v][i] - r["dice"]) for r in rs]))
                                      for i, e in enumerate(plan["eps"])}
        for name, f in baselines.items():
            res[name] = metrics(f(rs), true)
        res["true_mean"] = float(np.mean(true))
        results[kind] = res
    pool_rows = [r for r in rows if r["set"] == "pool"]
    for kind in ("pool", "model"):
        kind_rows = [r for r in rows if r["set"] == kind]
        results[f"{kind}_by_source"] = {
            family: {v: metrics([r[v][0] for r in rs], [r["dice"] for r in rs]) for v in predictors}
            for family in ("vae", "unet", "perturbation")
            if (rs := [r for r in kind_rows if r["source"].startswith(family)])}
    eps_factor = [r["eps_ours"][-1] / plan["eps"][-1] for r in pool_rows if plan["eps"][-1] > 0]
    calibration_plots = []
    for v in variants:
        fig = calibration_figure([r["dice"] for r in pool_rows], {"raw": [r[v][0] for r in pool_rows],
                                                                   "recalibrated": [r[f"{v}_recalibrated"][0] for r in pool_rows]},
                                 title=f"REG-Net {v}: held-out test pool")
        png = out.parent / f"{out.name}_calibration_{v}.png"
        fig.savefig(png, dpi=100)
        calibration_plots.append(str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png))
    pool_hist = np.bincount([dice_bin(r["dice"]) for r in train_rows], minlength=10).tolist()
    command = [".venv/bin/python", "benchmarks/quality_assessment.py", *(argv if argv is not None else sys.argv[1:])]
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": shlex.join(command),
              "train_sources": list(args.train_sources) + ["perturbation"],
              "torch_threads": args.threads, "plan": plan, "machine": machine(), "load_average": loads,
              "seconds": {k: round(v, 1) for k, v in seconds.items()}, "qa_config": assessor.meta["config"],
              "train_subjects": train_names, "test_subjects": test_names,
              "training_pool": {"candidates": len(train_rows), "dice_histogram": pool_hist},
              "histories": histories, "results": results,
              "calibration": json.loads((qa_dir / "calibration.json").read_text()), "calibration_plots": calibration_plots,
              "eps_scale": {"paper": EPS_SCALE, "ours_per_paper_unit": {"min": min(eps_factor, default=None),
                                                                        "mean": float(np.mean(eps_factor)) if eps_factor else None,
                                                                        "max": max(eps_factor, default=None)}},
              "test_rows": [{k: v for k, v in r.items()} for r in rows]}
    write_text(out.with_suffix(".json"), json.dumps(report, indent=1, default=float))
    write_text(out.with_suffix(".md"), table(report))
    print(table(report))


def table(report: dict) -> str:
    plan = report["plan"]
    lines = [f"Test subjects: {', '.join(report['test_subjects'])}; {report['machine'].get('cpu_model', '?')}, "
             f"bf16 units: {report['machine']['avx512_bf16']}; load average {report['load_average']}; "
             f"stage seconds {report['seconds']}", ""]
    factor = report.get("eps_scale", {}).get("ours_per_paper_unit", {})
    if factor.get("mean") is not None:
        lines += [f"FGSM eps on the paper's scale (each case min-max scaled to [0, 1]); on our normalised "
                  f"intensities eps times {factor['min']:.2f}-{factor['max']:.2f} (mean {factor['mean']:.2f}).", ""]
    for kind, title in (("pool", "Balanced test pool (VAE and U-Net segmentations + perturbations)"),
                        ("model", "Every VAE and U-Net segmentation of the test subjects (no balancing)")):
        res = {k: m for k, m in report["results"][kind].items() if isinstance(m, dict)}
        n = next(iter(res.values()))
        lines += [f"**{title}**: {n['n']} segmentations, {n['n_failed']} failed (Dice < {FAIL}), "
                  f"true mean Dice {report['results'][kind].get('true_mean', math.nan):.3f}", ""]
        eps = [e for e in plan["eps"] if e > 0] if kind == "pool" else []
        head = ["predictor", "MAE", "mean predicted", "Pearson r", "Spearman rho", "failure AUROC"] + [f"MAE eps {e:g}" for e in eps]
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for name, m in res.items():
            cells = [name] + [f"{m[k]:.3f}" if k in m and not math.isnan(m[k]) else "n/a"
                              for k in ("mae", "mean_predicted", "pearson_r", "spearman_rho", "failure_auroc")]
            cells += [f"{m['fgsm_mae'][str(e)]:.3f}" for e in eps] if "fgsm_mae" in m else ["" for _ in eps]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for kind, title in (("pool", "Balanced test pool"), ("model", "Every VAE and U-Net segmentation")):
        lines += by_source_table(report["results"].get(f"{kind}_by_source", {}), title)
    lines += error_breakdown_table([r for r in report.get("test_rows", []) if r["set"] == "pool"],
                                   [k for k in report["results"]["pool"] if k in VARIANTS])
    return "\n".join(lines)


def error_breakdown_table(rows: list[dict], variants: list[str]) -> list[str]:
    """Where the balanced pool's error sits: MAE (mean signed error) of each variant's raw prediction
    by true-Dice band and by kind of ground-truth perturbation."""
    if not rows or not variants:
        return []
    true = np.array([r["dice"] for r in rows])
    groups = [(f"true Dice {lo:.1f}-{lo + 0.2:.1f}", (true >= lo) & (true < lo + 0.2 if lo < 0.8 else true <= 1.0))
              for lo in (0.0, 0.2, 0.4, 0.6, 0.8)]
    kinds = sorted({r["source"] for r in rows if r["source"].startswith("perturbation:")})
    groups += [(kind, np.array([r["source"] == kind for r in rows])) for kind in kinds]
    lines = ["**Balanced test pool: error by true Dice and by perturbation** (MAE (mean signed error))", "",
             "| group | n | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for name, mask in groups:
        if mask.any():
            cells = []
            for v in variants:
                err = np.array([r[v][0] for r in rows])[mask] - true[mask]
                cells.append(f"{np.abs(err).mean():.3f} ({err.mean():+.3f})")
            lines.append(f"| {name} | {int(mask.sum())} | " + " | ".join(cells) + " |")
    return lines + [""]


def by_source_table(by_source: dict, title: str) -> list[str]:
    lines = []
    if by_source:
        lines += [f"**{title} by source** (MAE / Spearman rho)", "",
                  "| source | n | " + " | ".join(next(iter(by_source.values()))) + " |",
                  "|---|---|" + "---|" * len(next(iter(by_source.values())))]
        for family, res in by_source.items():
            n = next(iter(res.values()))["n"]
            lines.append(f"| {family} | {n} | " + " | ".join(
                f"{m['mae']:.3f} / " + ("n/a" if math.isnan(m["spearman_rho"]) else f"{m['spearman_rho']:.3f}")
                for m in res.values()) + " |")
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
