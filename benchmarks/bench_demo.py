"""The demo's quality and run time, and whether bf16 keeps its quality.

Runs `anomaseg demo` (phantom -> spatial VAE -> evaluation) with the default precision (`auto`:
bf16 autocast on this CPU) and again with `--precision 32`, same seed and data, and records every
stage's wall time and the metrics of both. The bf16 run is the demo as users run it.

    python benchmarks/bench_demo.py [--seed 0] [--skip-fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from anomaseg import demo  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402

KEYS = ("pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold", "image_auroc", "threshold")


def run(out: Path, precision: str, seed: int) -> dict:
    """The demo with one precision; returns metrics and stage times."""
    times: dict = {}
    metrics = demo.run_demo(out, seed=seed, progress=False, precision=precision, timings=times)
    return {"precision": precision, "seconds": times, **{k: metrics[k] for k in KEYS},
            "per_case": metrics["per_case"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-fp32", action="store_true", help="only the default (bf16) run")
    ap.add_argument("--out", default=str(ROOT / "results" / "demo.json"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ANOMASEG_CACHE"] = str(Path(tmp) / "cache")
        for precision in ("auto",) + (() if args.skip_fp32 else ("32",)):
            r = run(Path(tmp) / f"demo_{precision}", precision, args.seed)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "per_case"}, indent=1), flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "seed": args.seed, "plan": demo.DEMO,
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
              "runs": results}
    if len(results) == 2:
        report["dice_best_bf16_minus_fp32"] = results[0]["dice_best"] - results[1]["dice_best"]
        report["pixel_auroc_bf16_minus_fp32"] = results[0]["pixel_auroc"] - results[1]["pixel_auroc"]
    write_text(Path(args.out), json.dumps(report, indent=1))
    print("\n| precision | pixel AUROC | pixel AUPRC | dice_best | dice@threshold | slice AUROC | phantom s | train s | eval s | total min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["seconds"]
        print(f"| {r['precision']} | {r['pixel_auroc']:.3f} | {r['pixel_auprc']:.3f} | {r['dice_best']:.3f} | "
              f"{r['dice_at_threshold']:.3f} | {r['image_auroc']:.3f} | {s['phantom']:.0f} | {s['train']:.0f} | "
              f"{s['evaluate']:.0f} | {s['total'] / 60:.1f} |")


if __name__ == "__main__":
    main()
