"""The training fast paths keep the quality: short phantom runs, several seeds, plain settings against
the fast ones, evaluated with the project's pipeline.

Variants (the same data, seeds and budget; only the training path differs):
- plain: fp32, contiguous tensors, no torch.compile (what `bench_speed.py` calls anomaseg_fp32);
- fast_fp32: channels_last + torch.compile: the default path on a CPU without bf16 units;
- fast_default: what `--precision auto` picks here (bf16 autocast on CPUs with bf16 units) +
  channels_last + torch.compile; left out where auto picks fp32 (it equals fast_fp32);
- more with `--variants NAME:KEY=VALUE,...`, e.g. `--variants fast_fp32_b64:batch_size=64` to check
  a larger batch.
Each run trains the demo's spatial VAE (FLAIR + T2, beta 0.05, 64 px) on the healthy phantom
subjects and is evaluated on the lesioned ones (residual map, Baur's post-processing, threshold
calibrated on held-out healthy subjects). Reported: mean +- std over seeds of pixel AUROC, pixel
AUPRC, best Dice, final validation loss, and the training loss curve per epoch.

    python benchmarks/quality_fast_paths.py [--seeds 0 1 2] [--epochs 8] [--healthy 24] [--lesioned 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `anomaseg` command does (bench_threads.py)
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from anomaseg import config as cfg  # noqa: E402
from anomaseg import runtime  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.data.phantom import make_phantom  # noqa: E402
from anomaseg.evaluation import evaluate_dataset  # noqa: E402
from anomaseg.training import train  # noqa: E402
from bench_speed import machine_info  # noqa: E402

METRICS = ("pixel_auroc", "pixel_auprc", "dice_best")


def variants(extra: list[str]) -> dict[str, dict]:
    here = {"bf16-mixed": "bf16", "32-true": "32"}[runtime.fabric_precision("auto", "cpu")]
    out = {"plain": dict(precision="32", channels_last=False, compile="off"),
           "fast_fp32": dict(precision="32", channels_last=True, compile="on")}
    if here != "32":
        out["fast_default"] = dict(precision=here, channels_last=True, compile="on")
    for item in extra:
        name, _, settings = item.partition(":")
        base = dict(out["fast_fp32"])
        for kv in filter(None, settings.split(",")):
            k, _, v = kv.partition("=")
            base[k] = int(v) if v.isdigit() else v
        out[name] = base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--healthy", type=int, default=24)
    ap.add_argument("--lesioned", type=int, default=6)
    ap.add_argument("--variants", nargs="*", default=[], help="extra variants NAME:key=value,... over fast_fp32")
    ap.add_argument("--work", default=str(ROOT / "results" / "work_quality"))
    ap.add_argument("--out", default=str(ROOT / "results" / "quality_fast_paths"))
    args = ap.parse_args()
    work = Path(args.work)
    os.environ.setdefault("ANOMASEG_CACHE", str(work / "cache"))
    phantom = work / "phantom"
    if not (phantom / "test").exists():
        make_phantom(phantom, args.healthy, args.lesioned, seed=0, resolution=2, modalities=["flair", "t2"])
    plan = variants(args.variants)
    load_before = os.getloadavg()
    runs = []
    for seed in args.seeds:  # seed-major: every variant sees the machine of the same minutes
        for name, v in plan.items():
            run, ev = work / "runs" / f"{name}_seed{seed}", work / "eval" / f"{name}_seed{seed}"
            for p in (run, ev):
                shutil.rmtree(p, ignore_errors=True)
            config = cfg.resolve(overrides={
                "data": {"modalities": ["flair", "t2"], "image_size": 64},
                "model": {"name": "spatial_vae", "params": {"beta": 0.05}},
                "train": {"epochs": args.epochs, "seed": seed, "batch_size": v.get("batch_size", args.batch_size),
                          "precision": v["precision"], "channels_last": v["channels_last"], "compile": v["compile"]}})
            config.train_dir = str(phantom / "train")
            t = time.perf_counter()
            summary = train(config, run, progress=False)
            train_s = time.perf_counter() - t
            metrics = evaluate_dataset(run, phantom / "test", ev, progress=False, baseline=False)
            runs.append({"variant": name, "seed": seed, "train_seconds": train_s, **v,
                         **{m: metrics[m] for m in METRICS}, "val_loss": summary["history"][-1].get("val_loss"),
                         "train_loss_curve": [h["train_loss"] for h in summary["history"]],
                         "val_loss_curve": [h.get("val_loss") for h in summary["history"]]})
            print(f"{name} seed {seed}: " + ", ".join(f"{m} {metrics[m]:.3f}" for m in METRICS)
                  + f", val_loss {runs[-1]['val_loss']:.2f}, train {train_s:.0f} s (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    table = ["| variant | settings | " + " | ".join(METRICS) + " | final val loss | train s (median) |",
             "|---|---|" + "---|" * (len(METRICS) + 2)]
    summary = {}
    for name, v in plan.items():
        rows = [r for r in runs if r["variant"] == name]

        def ms(key):
            vals = [r[key] for r in rows]
            return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        summary[name] = {k: ms(k) for k in METRICS + ("val_loss",)}
        settings = ", ".join(f"{k} {v[k]}" for k in v)
        table.append(f"| {name} | {settings} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in
                                                         (summary[name][k] for k in METRICS))
                     + f" | {summary[name]['val_loss'][0]:.2f} ± {summary[name]['val_loss'][1]:.2f} | "
                     + f"{statistics.median(r['train_seconds'] for r in rows):.0f} |")
    cpu = runtime.cpu_info()
    header = (f"Mean ± std over seeds {args.seeds}; spatial VAE (beta 0.05, FLAIR + T2, 64 px), {args.epochs} "
              f"epochs, batch {args.batch_size} unless stated, {args.healthy} healthy / {args.lesioned} lesioned "
              f"phantom subjects; {cpu['model']} ({', '.join(cpu['key_flags'])}), load average "
              f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}.")
    write_text(Path(args.out + ".json"), json.dumps({"runs": runs, "summary": summary, "machine": machine_info("cpu"),
                                                     "load_average_before": load_before,
                                                     "load_average_after": os.getloadavg(), "args": vars(args)},
                                                    indent=1))
    write_text(Path(args.out + ".md"), header + "\n\n" + "\n".join(table) + "\n")
    print("\n" + header + "\n\n" + "\n".join(table))


if __name__ == "__main__":
    main()
