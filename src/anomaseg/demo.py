"""`anomaseg demo`: the whole path on built-in data: phantom -> spatial VAE -> evaluation report.

Everything lands in one folder:

    OUT/phantom/{train,test}   the brain MR phantom (healthy training cases, lesioned test cases)
    OUT/run                    the trained model (checkpoints, config, samples, calibration)
    OUT/eval                   metrics.json and report.html
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from anomaseg import config as cfg
from anomaseg.data.phantom import make_phantom
from anomaseg.evaluation import baseline_line, evaluate_dataset, lesion_summary
from anomaseg.training import train_and_calibrate

# What the demo runs: Baur et al.'s spatial VAE on FLAIR + T2 at 64 px, sized to finish in about 5
# minutes on a 2-core CPU, with the library's default beta (0.05, stated here so the demo stays the
# same if that default moves) and hence its default map (grad_elbo). benchmarks/README.md has the
# measurements behind every choice here.
DEMO = dict(healthy=80, lesioned=12, resolution=2, modalities=["flair", "t2"], image_size=64, epochs=12,
            model_params={"beta": 0.05})
QUICK = dict(healthy=6, lesioned=3, resolution=2, modalities=["flair"], image_size=64, epochs=2, model_params={})


def demo_config(plan: dict, seed: int, precision: str = "auto") -> cfg.RunConfig:
    return cfg.resolve(overrides={"data": {"modalities": plan["modalities"], "image_size": plan["image_size"]},
                                  "model": {"name": "spatial_vae", "params": plan["model_params"]},
                                  "train": {"epochs": plan["epochs"], "seed": seed, "precision": precision}})


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, progress: bool = True,
             precision: str = "auto", timings: dict | None = None) -> dict:
    """Run the demo into `out`; returns the evaluation metrics. `timings` (if given) receives the
    wall time of each stage in seconds."""
    out = Path(out)
    plan = QUICK if quick else DEMO
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    phantom = out / "phantom"
    print(f"[1/3] writing the brain MR phantom: {plan['healthy']} healthy + {plan['lesioned']} lesioned subjects")
    make_phantom(phantom, plan["healthy"], plan["lesioned"], seed=seed, resolution=plan["resolution"],
                 modalities=plan["modalities"], progress=progress)
    timings["phantom"] = time.perf_counter() - t0

    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)  # the demo always starts afresh
    config = demo_config(plan, seed, precision)
    config.train_dir = str((phantom / "train").resolve())
    print(f"[2/3] training {config.model.name} on healthy {' + '.join(m.upper() for m in plan['modalities'])} "
          f"slices ({plan['epochs']} epochs)")
    t = time.perf_counter()
    train_and_calibrate(config, run, progress=progress)
    timings["train"] = time.perf_counter() - t

    print("[3/3] evaluating on the lesioned subjects")
    t = time.perf_counter()
    metrics = evaluate_dataset(run, phantom / "test", out / "eval", progress=progress)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    minutes = timings["total"] / 60
    print(f"\npixel AUROC {metrics['pixel_auroc']:.3f} | pixel AUPRC {metrics['pixel_auprc']:.3f} | "
          f"best Dice {metrics['dice_best']:.3f} | Dice at the healthy-calibrated threshold "
          f"{metrics['dice_at_threshold']:.3f} | slice AUROC {metrics['image_auroc']:.3f}")
    print(lesion_summary(metrics))
    if metrics.get("baseline"):
        print(f"intensity baseline: {lesion_summary(metrics['baseline'])}")
    line = baseline_line(metrics)
    if line:
        print(line)
    print(f"done in {minutes:.1f} min")
    print(f"metrics: {out / 'eval' / 'metrics.json'}")
    print(f"report:  {out / 'eval' / 'report.html'}")
    return metrics
