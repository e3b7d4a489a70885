"""Benchmark: streaming VoxelMetrics vs scikit-learn's exact roc_auc_score + average_precision_score.

    .venv/bin/python benchmarks/bench_metrics.py            # 1e8 voxels (needs ~10 GiB RAM for sklearn)
    .venv/bin/python benchmarks/bench_metrics.py --n 1e7    # quicker

Synthetic data: float32 scores ~ N(0, 1) + 2 * label, ~1 % anomalous voxels, generated in chunks.
VoxelMetrics is timed over update() per chunk + compute() (best of --repeats runs); scikit-learn
once, on the full arrays. If scikit-learn cannot be run on all voxels (--sklearn-n smaller than
--n, or not enough free memory), it runs on the first --sklearn-n voxels and its time is
extrapolated as n log n -- the output says so. Writes benchmarks/results/metrics.json and prints a
markdown table row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.metrics import VoxelMetrics  # noqa: E402

SKLEARN_BYTES_PER_VOXEL = 80  # measured peak of roc_auc_score + average_precision_score, with margin


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_data(n: int, chunk: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = rng.random(m, dtype=np.float32) < 0.01
        scores = rng.standard_normal(m, dtype=np.float32)
        scores += 2.0 * labels
        chunks.append((scores, labels))
    return chunks


def time_anomaseg(chunks, repeats: int) -> tuple[float, list[float], dict]:
    times = []
    result = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        vm = VoxelMetrics()
        for scores, labels in chunks:
            vm.update(scores, labels)
        result = vm.compute()
        times.append(time.perf_counter() - t0)
    return min(times), times, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=float, default=1e8, help="number of voxels (default 1e8)")
    p.add_argument("--chunk", type=float, default=1e7, help="voxels per update() call (default 1e7)")
    p.add_argument("--sklearn-n", type=float, default=None, help="voxels for scikit-learn (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="VoxelMetrics runs; the best is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "metrics.json")
    args = p.parse_args()
    n, chunk = int(args.n), int(args.chunk)

    import torch
    from sklearn import __version__ as sklearn_version
    from sklearn.metrics import average_precision_score, roc_auc_score

    from anomaseg import threads

    threads.start(log=print)  # VoxelMetrics uses numpy; torch gets anomaseg's thread policy, as the commands

    print(f"generating {n:.3g} voxels in chunks of {chunk:.3g} ...", flush=True)
    chunks = make_data(n, chunk, args.seed)

    best, times, ours = time_anomaseg(chunks, args.repeats)
    print(f"anomaseg VoxelMetrics: {best:.3f} s (runs: {', '.join(f'{t:.3f}' for t in times)})", flush=True)

    sk_n = n if args.sklearn_n is None else min(int(args.sklearn_n), n)
    avail = available_bytes()
    if avail is not None and sk_n * SKLEARN_BYTES_PER_VOXEL > 0.8 * avail:
        fallback = min(sk_n, int(2e7))
        print(f"only {avail / 2**30:.1f} GiB available: scikit-learn on {fallback:.3g} voxels instead of {sk_n:.3g}")
        sk_n = fallback
    scores = np.concatenate([s for s, _ in chunks])[:sk_n]
    labels = np.concatenate([y for _, y in chunks])[:sk_n]
    if sk_n < n:  # compare the metrics on the same voxels scikit-learn sees
        vm = VoxelMetrics()
        vm.update(scores, labels)
        ours = vm.compute()
    del chunks

    print(f"scikit-learn on {sk_n:.3g} voxels (exact, sorts everything) ...", flush=True)
    t0 = time.perf_counter()
    sk_auroc = roc_auc_score(labels, scores)
    t1 = time.perf_counter()
    sk_auprc = average_precision_score(labels, scores)
    t2 = time.perf_counter()
    sk_measured = t2 - t0
    extrapolated = sk_n < n
    sk_seconds = sk_measured * (n * math.log(n)) / (sk_n * math.log(sk_n)) if extrapolated else sk_measured
    print(f"scikit-learn: roc_auc_score {t1 - t0:.2f} s + average_precision_score {t2 - t1:.2f} s = {sk_measured:.2f} s")
    if extrapolated:
        print(f"NOTE: scikit-learn time EXTRAPOLATED (n log n) from {sk_n:.3g} to {n:.3g} voxels: {sk_seconds:.1f} s")

    result = {
        "n_voxels": n,
        "chunk": chunk,
        "anomaseg_seconds": round(best, 4),
        "anomaseg_runs_seconds": [round(t, 4) for t in times],
        "sklearn_seconds": round(sk_seconds, 3),
        "sklearn_measured_seconds": round(sk_measured, 3),
        "sklearn_n_voxels": sk_n,
        "sklearn_extrapolated": extrapolated,
        "speedup": round(sk_seconds / best, 1),
        "auroc": ours["pixel_auroc"],
        "auprc": ours["pixel_auprc"],
        "auroc_abs_diff": abs(ours["pixel_auroc"] - sk_auroc),
        "auprc_abs_diff": abs(ours["pixel_auprc"] - sk_auprc),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "sklearn": sklearn_version,
            "torch": torch.__version__,
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    print()
    print("| voxels | anomaseg (s) | scikit-learn (s) | speed-up | |dAUROC| | |dAUPRC| |")
    print("|---|---|---|---|---|---|")
    sk_cell = f"{sk_seconds:.1f}" + (" (extrapolated)" if extrapolated else "")
    print(
        f"| {n:.0e} | {best:.2f} | {sk_cell} | {result['speedup']:.0f}x | "
        f"{result['auroc_abs_diff']:.1e} | {result['auprc_abs_diff']:.1e} |"
    )


if __name__ == "__main__":
    main()
