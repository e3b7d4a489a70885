"""What the phantom's realism features do to the FLAIR intensity threshold, and what they cost.

The same lesioned subjects (seed, indices 0..N-1, 2 mm) are made four ways: the default phantom,
with the normal variants only (caps, choroid plexus, septum, flow artefacts, partial-volume rims;
same lesions as the default), with the realistic lesions only (T1 black holes, chronic infarcts,
isointense masses) and with every feature. On each, the trivial baseline of Meissen et al. (2021):
FLAIR normalised by its 1st/99th brain percentiles, 5x5x5 median filter, the value as the anomaly
score; pixel AUROC, AUPRC and best Dice over all brain voxels of all subjects (VoxelMetrics), the
fraction of each normal variant's voxels above the best-Dice threshold (false positives it causes)
and the fraction of each lesion label's voxels above it (recall). Generation time per subject,
default vs every feature, is measured interleaved on healthy and lesioned subjects.

    python benchmarks/bench_phantom_realism.py            # 12 lesioned subjects, ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.data.phantom import LABELS, NORMAL_VARIANTS, REALISM, REALISTIC_LESIONS, make_subject  # noqa: E402
from anomaseg.metrics import VoxelMetrics  # noqa: E402
from anomaseg.postprocess import median_filter_3d  # noqa: E402

CONFIGS = {"default": (), "normal_variants": NORMAL_VARIANTS, "realistic_lesions": REALISTIC_LESIONS, "all": REALISM}


def machine() -> dict:
    """CPU model, the flags that decide the speed of our kernels, cores and load."""
    info = {"platform": platform.platform(), "cores": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        flags = set(fields.get("Flags", "").split())
        info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor() or platform.machine()
    return info


def baseline_map(flair: np.ndarray, brain: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(flair[brain], [1.0, 99.0])
    return median_filter_3d(((flair - lo) / max(hi - lo, 1e-6)).astype(np.float32), 5)


def evaluate(config: tuple[str, ...], n: int, seed: int, resolution: int) -> dict:
    metrics = VoxelMetrics()
    kept, per_subject = [], []
    families: dict[str, int] = {}
    for i in range(n):
        s = make_subject(i, True, seed=seed, resolution=resolution, modalities=("flair",), realism=config)
        for f in s.info["families"]:
            families[f] = families.get(f, 0) + 1
        brain = s.mask > 0
        scores = baseline_map(s.images["flair"], brain)
        metrics.update(scores, s.seg > 0, brain)
        one = VoxelMetrics()
        one.update(scores, s.seg > 0, brain)
        per_subject.append(one.compute())
        kept.append((scores, s.seg, brain, s.variants))
    result = metrics.compute()
    threshold = result["dice_best_threshold"]
    recall, false_pos = {}, {}
    for label, name in LABELS.items():
        hits = [(sc[seg == label] > threshold) for sc, seg, _, _ in kept]
        total = sum(h.size for h in hits)
        if total:
            recall[name] = round(sum(int(h.sum()) for h in hits) / total, 3)
    for name in NORMAL_VARIANTS:
        hits = [(sc[v[name] & brain & (seg == 0)] > threshold) for sc, seg, brain, v in kept if name in v]
        total = sum(h.size for h in hits)
        if total:
            false_pos[name] = round(sum(int(h.sum()) for h in hits) / total, 3)
    return {"features": list(config), "families": families,
            **{k: result[k] for k in ("pixel_auroc", "pixel_auprc", "dice_best", "dice_best_threshold", "n_positive")},
            "per_subject_mean": {k: round(statistics.mean(r[k] for r in per_subject), 4)
                                 for k in ("pixel_auroc", "pixel_auprc", "dice_best")},
            "recall_at_best_dice_by_label": recall, "variant_voxels_above_best_dice_threshold": false_pos}


def generation_seconds(n: int, seed: int, resolution: int, repeats: int) -> dict:
    """Median seconds per subject (all modalities), default vs every feature, interleaved."""
    make_subject(0, False, seed=seed, resolution=resolution, realism=True)  # template and ventricles cached
    times: dict[str, list[float]] = {"default": [], "all": []}
    for _ in range(repeats):
        for i in range(n):
            for lesioned in (False, True):
                for name, config in (("default", ()), ("all", REALISM)):
                    t = time.perf_counter()
                    make_subject(i, lesioned, seed=seed, resolution=resolution, realism=config)
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_seconds": {k: round(v, 3) for k, v in med.items()},
            "realism_extra_seconds": round(med["all"] - med["default"], 3),
            "n_subjects_timed_each": len(times["default"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lesioned", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resolution", type=int, default=2)
    ap.add_argument("--timing-subjects", type=int, default=3)
    ap.add_argument("--timing-repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "phantom_realism.json"))
    args = ap.parse_args()
    start = machine()
    t0 = time.perf_counter()
    rows = {}
    for name, config in CONFIGS.items():
        rows[name] = evaluate(config, args.lesioned, args.seed, args.resolution)
        r = rows[name]
        print(f"{name:18s} AUROC {r['pixel_auroc']:.3f}  AUPRC {r['pixel_auprc']:.3f}  best Dice {r['dice_best']:.3f}  "
              f"per subject {r['per_subject_mean']}  families {r['families']}", flush=True)
    timing = generation_seconds(args.timing_subjects, args.seed, args.resolution, args.timing_repeats)
    result = {"setup": {"lesioned": args.lesioned, "seed": args.seed, "resolution_mm": args.resolution,
                        "baseline": "FLAIR, 1st/99th brain percentiles -> [0, 1], 5x5x5 median; metrics over brain voxels",
                        "machine_at_start": start, "load_average_at_end": machine()["load_average"],
                        "seconds": round(time.perf_counter() - t0, 1),
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
              "baseline": rows, "generation": timing}
    write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    print("\n| phantom | AUROC | AUPRC | best Dice | per-subject AUPRC | per-subject best Dice |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        m = r["per_subject_mean"]
        print(f"| {name} | {r['pixel_auroc']:.3f} | {r['pixel_auprc']:.3f} | {r['dice_best']:.3f} | "
              f"{m['pixel_auprc']:.3f} | {m['dice_best']:.3f} |")
    print(f"\ngeneration per 2 mm subject: {timing['median_seconds']} -> realism costs "
          f"{timing['realism_extra_seconds']} s; results in {args.out}")


if __name__ == "__main__":
    main()
