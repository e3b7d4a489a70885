"""Training speed on a machine shared with other work: fp32 and bf16 autocast, torch threads = all
CPUs or one fewer, with the other CPUs idle or one of them kept busy by another process.

Why: on this 2-core CPU with AVX512-BF16, bf16 autocast trains ~2x faster than fp32 on an idle
machine, yet a run with another job on the other core measured bf16 at 0.69x of fp32. The cause is
oversubscription, not bf16: torch's OpenMP threads (one per CPU) meet at a barrier after every
parallel operator, so one thread sharing its CPU with another process stalls them all for a
scheduler time slice; bf16 autocast adds cast operators (more barriers per step) and shortens the
work between them, so it suffers most. One thread fewer than the CPUs removes the stall.

Each configuration runs in a fresh process (OMP_WAIT_POLICY=PASSIVE, as the `anomaseg` command
sets; spatial VAE of the default model, 64 px, batch 32, channels_last, fused Adam), interleaved
and repeated; medians. The busy process is a pure-Python loop (one CPU, no memory traffic).

    python benchmarks/bench_contention.py [--repeats 3] [--steps 12]
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
import sys, time, torch
sys.path.insert(0, {src!r})
from anomaseg.models import create_model
from anomaseg.models.base import adam
torch.set_num_threads({threads})
torch.manual_seed(0)
model = create_model("spatial_vae", in_channels=1, image_size=64).train().to(memory_format=torch.channels_last)
opt = adam(model.parameters(), 5e-4)
x = torch.rand(32, 1, 64, 64).contiguous(memory_format=torch.channels_last)
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled={bf16}):
        loss = model.loss(x, model(x))["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
step(); step()
t = time.perf_counter()
for _ in range({steps}):
    step()
print(32 * {steps} / (time.perf_counter() - t))
"""
BUSY = "while True: pass"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "results" / "contention.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT.parent / "src"))
    sys.path.insert(0, str(ROOT))
    from anomaseg import runtime
    from anomaseg.atomic import write_text
    from bench_speed import machine_info

    cpus = len(runtime.usable_cpus())
    precisions = ["fp32"] + (["bf16"] if runtime.cpu_bf16_units() else [])
    thread_counts = sorted({cpus, max(1, cpus - 1)}, reverse=True)
    configs = [(busy, p, t) for busy in (False, True) for p in precisions for t in thread_counts]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    samples: dict[str, list[float]] = {}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for busy, precision, threads in configs:
            name = f"{'one_cpu_busy' if busy else 'idle'}_{precision}_{threads}_threads"
            hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
            try:
                code = CHILD.format(src=str(ROOT.parent / "src"), threads=threads, bf16=precision == "bf16",
                                    steps=args.steps)
                out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            samples.setdefault(name, []).append(float(out.stdout.split()[-1]))
            print(f"repeat {r + 1}: {name} {samples[name][-1]:.1f} slices/s", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    report = {"slices_per_second": med, "samples": samples, "cpus": cpus, "steps": args.steps,
              "repeats": args.repeats, "machine": machine_info("cpu"), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    write_text(Path(args.out), json.dumps(report, indent=1))
    cpu = report["machine"]["cpu"]
    print(f"\n{cpu['model']} ({', '.join(cpu['key_flags'])}); {cpus} CPUs; slices/s, median of {args.repeats}")
    for busy in ("idle", "one_cpu_busy"):
        row = {k[len(busy) + 1:]: v for k, v in med.items() if k.startswith(busy + "_")}
        print(f"{busy}: " + "; ".join(f"{k} {v:.1f}" for k, v in row.items()))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
