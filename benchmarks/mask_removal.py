"""Cases without brain mask files: what the old rule cost and what the derived mask recovers.

Trains the demo's model (spatial VAE, FLAIR + T2, 64 px, beta 0.05, 12 epochs on the demo's 80
healthy phantom subjects, which have mask files), then evaluates it on the 12 lesioned test
subjects three ways:

    with masks      the test cases with their <case>_mask.nii.gz files (the reference)
    nonzero         mask files removed, brain = nonzero voxels (the rule before issue 9:
                    data.brain_mask=nonzero); the phantom's background holds Rician noise
    auto            mask files removed, the default rule: the background is not empty, so the
                    mask is derived from the images (anomaseg.data.brainmask)

For each: the evaluation's metrics (inside the mask each setting uses, as `anomaseg evaluate`
reports them) with the intensity baseline's beside them, and how well the mask used matches the
phantom's true brain mask (Dice, fraction of the volume).

    python benchmarks/mask_removal.py [--work benchmarks/results/work_masks] [--seed 0] [--healthy 80] [--epochs 12]
                                      [--model-params '{"base_channels": 16, "max_channels": 32}']

The defaults are the demo's; on a busy machine a smaller model (--model-params) and fewer
subjects and epochs keep it to minutes (the JSON records what ran).

Writes benchmarks/results/mask_removal.{json,md}. The work folder is kept (the trained run is
reused when the script runs again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

import numpy as np  # noqa: E402

from anomaseg import demo  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.data.layout import find_cases  # noqa: E402
from anomaseg.data.phantom import make_phantom  # noqa: E402
from anomaseg.data.slices import load_case_with_mask_source  # noqa: E402
from anomaseg.evaluation import evaluate_dataset  # noqa: E402
from anomaseg.run import RunPaths  # noqa: E402
from anomaseg.calibration import calibrate  # noqa: E402
from anomaseg.training import train  # noqa: E402

KEYS = ("pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold")


def machine() -> dict:
    flags = ""
    try:
        flags = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Flags"))
    except (OSError, StopIteration):
        pass
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags.split(),
            "load_average_at_start": os.getloadavg(), "python": platform.python_version()}


def without_masks(test: Path, dst: Path) -> Path:
    """The test set with its mask files left out (other files linked, not copied)."""
    if dst.exists():
        shutil.rmtree(dst)
    for case in sorted(p for p in test.iterdir() if p.is_dir()):
        (dst / case.name).mkdir(parents=True)
        for f in case.iterdir():
            if not f.name.endswith("_mask.nii.gz"):
                (dst / case.name / f.name).symlink_to(f.resolve())
    return dst


def run_with_rule(run: Path, dst: Path, rule: str) -> Path:
    """A copy of the run whose config uses brain mask rule `rule` (calibration is unaffected: the
    held-out healthy cases have mask files)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(run, dst)
    config = yaml.safe_load((dst / "config.yaml").read_text())
    config["data"]["brain_mask"] = rule
    (dst / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dst


def mask_quality(with_masks: Path, no_masks: Path, spec) -> dict:
    """Per case: Dice of the mask a rule produces against the phantom's true mask."""
    truth = {c.case_id: load_case_with_mask_source(c, spec)[1] for c in find_cases(with_masks, list(spec.modalities))}
    out = {}
    for rule in ("nonzero", "auto"):
        rows = []
        for case in find_cases(no_masks, list(spec.modalities)):
            _, brain, _, source = load_case_with_mask_source(case, type(spec)(**{**spec.__dict__, "brain_mask": rule}))
            t = truth[case.case_id]
            rows.append({"case_id": case.case_id, "source": source,
                         "dice_vs_true_mask": float(2 * (brain & t).sum() / (brain.sum() + t.sum())),
                         "volume_fraction": float(brain.mean()), "true_volume_fraction": float(t.mean())})
        out[rule] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "results" / "work_masks"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--healthy", type=int, default=demo.DEMO["healthy"], help="healthy training subjects")
    ap.add_argument("--epochs", type=int, default=demo.DEMO["epochs"])
    ap.add_argument("--model-params", default="{}", help="JSON, added to the demo's model parameters")
    ap.add_argument("--out", default=str(ROOT / "results" / "mask_removal"))
    args = ap.parse_args()
    work = Path(args.work)
    os.environ.setdefault("ANOMASEG_CACHE", str(work / "cache"))
    plan = dict(demo.DEMO, healthy=args.healthy, epochs=args.epochs,
                model_params={**demo.DEMO["model_params"], **json.loads(args.model_params)})
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "plan": plan, "seed": args.seed}
    t0 = time.perf_counter()
    phantom, run = work / "phantom", work / "run"
    if not RunPaths(run).best.exists():
        meta = json.loads((phantom / "phantom.json").read_text()) if (phantom / "phantom.json").exists() else {}
        if (meta.get("n_healthy"), meta.get("n_lesioned"), meta.get("seed")) != (plan["healthy"], plan["lesioned"], args.seed):
            make_phantom(phantom, plan["healthy"], plan["lesioned"], seed=args.seed, resolution=plan["resolution"],
                         modalities=plan["modalities"], progress=True)
        shutil.rmtree(run, ignore_errors=True)
        config = demo.demo_config(plan, args.seed)
        config.train_dir = str((phantom / "train").resolve())
        train(config, run)
        calibrate(run, force=True)
    info["train_seconds"] = time.perf_counter() - t0
    test = phantom / "test"
    no_masks = without_masks(test, work / "test_without_masks")
    settings = {"with masks": (run, test), "nonzero": (run_with_rule(run, work / "run_nonzero", "nonzero"), no_masks),
                "auto": (run_with_rule(run, work / "run_auto", "auto"), no_masks)}
    results = {}
    for name, (r, data) in settings.items():
        t = time.perf_counter()
        m = evaluate_dataset(r, data, work / f"eval_{name.replace(' ', '_')}", progress=False)
        results[name] = {**{k: m[k] for k in KEYS}, "baseline": {k: m["baseline"][k] for k in KEYS},
                         "n_voxels": m["n_voxels"], "seconds": time.perf_counter() - t,
                         "per_case_brain_mask": sorted({c.get("brain_mask", "?") for c in m["per_case"]})}
        print(name, json.dumps(results[name]), flush=True)
    from anomaseg.run import load_run_config
    info["mask_quality"] = mask_quality(test, no_masks, load_run_config(run).data.slice_spec())
    info["results"] = results
    info["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    write_text(out.with_suffix(".json"), json.dumps(info, indent=1))
    lines = ["| test cases | brain mask used | mask Dice vs true | pixel AUROC | pixel AUPRC | best Dice | "
             "Dice at threshold | baseline AUPRC | baseline best Dice |", "|---" * 9 + "|"]
    quality = {k: np.mean([r["dice_vs_true_mask"] for r in v]) for k, v in info["mask_quality"].items()}
    for name, r in results.items():
        used = {"with masks": "mask files", "nonzero": "nonzero voxels (old rule)", "auto": "derived (new default)"}[name]
        q = 1.0 if name == "with masks" else quality[name]
        lines.append(f"| {'with mask files' if name == 'with masks' else 'mask files removed'} | {used} | {q:.3f} | "
                     + " | ".join(f"{r[k]:.3f}" for k in KEYS)
                     + f" | {r['baseline']['pixel_auprc']:.3f} | {r['baseline']['dice_best']:.3f} |")
    table = "\n".join(lines) + "\n"
    write_text(out.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
