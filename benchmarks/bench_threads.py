"""Thread settings: the plain fp32 training loop of `bench_speed.py` (spatial VAE, 64 px, batch 32)
under OpenMP's wait policies and thread counts, each in its own process (the policy is read when
torch loads), interleaved and repeated; medians, with the load average of each sample.

- default: OMP_WAIT_POLICY unset, torch's thread count (all cores): what a plain script gets;
- passive: OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning), all cores:
  what the `anomaseg` command sets unless OMP_WAIT_POLICY is already set;
- one_thread: torch.set_num_threads(1).

    python benchmarks/bench_threads.py [--repeats 5] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CHILD = """
import os, sys, time, torch
sys.path.insert(0, {src!r})
from anomaseg.models import create_model
if {threads}:
    torch.set_num_threads({threads})
torch.manual_seed(0)
model = create_model("spatial_vae", in_channels=1, image_size=64).train()
opt = torch.optim.Adam(model.parameters(), lr=5e-4)
x = torch.rand(32, 1, 64, 64)
def step():
    out = model(x)
    loss = model.loss(x, out)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
step(); step()
t = time.perf_counter()
for _ in range({steps}):
    step()
print(32 * {steps} / (time.perf_counter() - t), torch.get_num_threads())
"""

CONFIGS = {"default": ({}, 0), "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0), "one_thread": ({}, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "results" / "threads.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT.parent / "src"))
    sys.path.insert(0, str(ROOT))
    from anomaseg.atomic import write_text
    from bench_speed import machine_info

    samples = {k: [] for k in CONFIGS}
    loads = {k: [] for k in CONFIGS}
    threads = {}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for name, (env, n_threads) in CONFIGS.items():
            child_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
            code = CHILD.format(src=str(ROOT.parent / "src"), threads=n_threads, steps=args.steps)
            out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, check=True)
            speed, threads[name] = out.stdout.split()
            samples[name].append(float(speed))
            loads[name].append(os.getloadavg()[0])
            print(f"repeat {r + 1}: {name} {float(speed):.1f} slices/s (load {loads[name][-1]:.1f})", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    report = {"slices_per_second": med, "ratio_vs_default": {k: v / med["default"] for k, v in med.items()},
              "samples": samples, "load_after_each_sample": loads, "torch_threads": threads,
              "steps": args.steps, "repeats": args.repeats, "machine": machine_info("cpu"),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    write_text(Path(args.out), json.dumps(report, indent=1))
    for k, v in med.items():
        print(f"{k}: {v:.1f} slices/s ({v / med['default']:.2f}x default); threads {threads[k]}; "
              f"load {statistics.median(loads[k]):.1f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
