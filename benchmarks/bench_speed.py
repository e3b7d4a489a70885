"""Training throughput (slices/s) of Baur et al.'s spatial VAE: anomaseg against a plain PyTorch loop,
with and without bf16, on the machine it runs on.

Rows, all at the same batch size and image size, all on the same slices:
- plain_fp32: the reference, what one writes by hand: model(x), loss, backward, torch.optim.Adam
  step; fp32, contiguous (NCHW) tensors, eager. Every ratio is against this row of the same run.
- plain_fp32_fused_adam: the same loop with anomaseg's optimiser (fused Adam): the reference for
  the framework overhead (anomaseg at equal settings).
- anomaseg_fp32: anomaseg's Trainer (Lightning Fabric loop) at the plain loop's settings: fp32,
  contiguous tensors, no torch.compile. 1 - anomaseg_fp32 / plain_fp32_fused_adam = overhead.
- anomaseg_fp32_cl: + channels_last. anomaseg_fp32_cl_compiled: + torch.compile (train.compile on).
- anomaseg_bf16_cl[_compiled]: the same under bf16 autocast; measured only where the CPU (or GPU)
  has bf16 units (emulated bf16 is not a configuration anyone should run).
"default" is what `--precision auto` picks on this machine, with channels_last and torch.compile
(which `train.compile: auto` turns on for runs long enough to repay it); "default without bf16"
is what auto picks on a CPU without bf16 units, computed with ANOMASEG_NO_BF16=1: the fp32 path.
Configurations are interleaved and repeated; medians are reported, so ratios come from the same
minutes of the same (shared, noisy) machine. Trainer rows time their second epoch; the first one
warms up (and compiles: its duration is reported as compile seconds, cold on the first repeat
when the inductor cache is empty, cached afterwards). The JSON records the CPU model and flags,
torch's bf16 probe, threads and the load average before and after.

    python benchmarks/bench_speed.py [--sizes 64 128] [--repeats 5] [--steps 12] [--batch-size 32]
    ANOMASEG_NO_BF16=1 python benchmarks/bench_speed.py ...   # as on a CPU without bf16 (fp32 rows only)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `anomaseg` command does (bench_threads.py); before torch loads
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from anomaseg import config as cfg  # noqa: E402
from anomaseg import runtime  # noqa: E402
from anomaseg import threads as threads_policy  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.data.phantom import make_phantom  # noqa: E402
from anomaseg.models import create_model  # noqa: E402
from anomaseg.models.base import adam  # noqa: E402
from anomaseg.training import Trainer  # noqa: E402


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_step(x_all: torch.Tensor, size: int, batch: int, device: str, fused: bool = False):
    """The reference, what one would write by hand (fp32, contiguous tensors, eager), as a function
    `step(i=0)` training on the i-th batch of `x_all`; `fused`: anomaseg's optimiser (fused Adam)."""
    torch.manual_seed(0)
    model = create_model("spatial_vae", in_channels=1, image_size=size).to(device).train()
    opt = adam(model.parameters(), 5e-4) if fused else torch.optim.Adam(model.parameters(), lr=5e-4)

    def step(i: int = 0):
        x = x_all[(i * batch) % (len(x_all) - batch):][:batch].to(device).float()
        loss = model.loss(x, model(x))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def plain_loop(x_all: torch.Tensor, size: int, batch: int, steps: int, device: str, fused: bool) -> float:
    """Slices/s of the plain loop (`plain_step`) after two warm-up steps."""
    step = plain_step(x_all, size, batch, device, fused)
    for i in range(2):
        step(i)
    synchronize(device)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    synchronize(device)
    return steps * batch / (time.perf_counter() - t)


def convolution_share(step, device: str, steps: int = 3) -> float:
    """Fraction of a training step's operator time spent in convolutions (forward and backward,
    torch.profiler self times), `step()` run once to warm up, then `steps` times: an upper bound
    for what fusing or removing everything else can buy is 1 / this share."""
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    conv = sum(getattr(e, attr) for e in events if "conv" in e.key)
    return conv / total if total else float("nan")


def trainer_run(data: Path, size: int, batch: int, steps: int, precision: str, channels_last: bool,
                compile_: bool, device: str) -> tuple[float, float]:
    """anomaseg's Trainer: (second epoch's slices/s, first epoch's seconds)."""
    config = cfg.resolve(overrides={
        "data": {"image_size": size, "val_fraction": 0.0},
        "train": {"epochs": 2, "batch_size": batch, "precision": precision, "channels_last": channels_last,
                  "compile": "on" if compile_ else "off", "max_steps_per_epoch": steps, "lr": 5e-4,
                  "accelerator": device}})
    config.train_dir = str(data)
    with tempfile.TemporaryDirectory() as run:
        history = Trainer(config, Path(run) / "run", progress=False).fit()["history"]
    first = steps * batch / history[0]["slices_per_second"]
    return history[-1]["slices_per_second"], first


def set_threads(threads: int | None) -> int:
    """torch threads for a benchmark: --threads pins them, else anomaseg's thread policy
    (`anomaseg.threads`: the CPUs this process may use, capped by OMP_NUM_THREADS, a cgroup quota and
    SLURM, less those other work keeps busy; a line says so when it leaves CPUs out). (The runs of
    issue 13 labelled "one thread" had OMP_NUM_THREADS=1 overridden here and ran two threads on a
    machine whose other core was busy.)"""
    threads_policy.start(threads or "auto", log=print)
    return torch.get_num_threads()


def machine_info(device: str) -> dict:
    info = {"cpu": runtime.cpu_info(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "device": device,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "thread_limits": dataclasses.asdict(threads_policy.cpu_limits())}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def auto_precision(device: str, assume_no_bf16: bool = False) -> str:
    """What `--precision auto` picks here (or, with assume_no_bf16, on a CPU without bf16 units)."""
    saved = os.environ.get(runtime.NO_BF16_ENV)
    if assume_no_bf16:
        os.environ[runtime.NO_BF16_ENV] = "1"
    try:
        return {"bf16-mixed": "bf16", "32-true": "32", "16-mixed": "16"}[runtime.fabric_precision("auto", device)]
    finally:
        if assume_no_bf16:
            if saved is None:
                del os.environ[runtime.NO_BF16_ENV]
            else:
                os.environ[runtime.NO_BF16_ENV] = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12, help="timed training steps per measurement")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 on a CPU, 128 on a GPU")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS, else all CPUs)")
    ap.add_argument("--out", default=None, help="default: results/speed_<device>[_nobf16].json")
    args = ap.parse_args()
    device = runtime.default_device() if args.device == "auto" else args.device
    batch = args.batch_size or (32 if device == "cpu" else 128)
    set_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "anomaseg" / "inductor"))
    here = auto_precision(device)
    without_bf16 = auto_precision(device, assume_no_bf16=True)
    suffix = "_nobf16" if os.environ.get(runtime.NO_BF16_ENV, "") not in ("", "0") else ""
    out = Path(args.out) if args.out else ROOT / "results" / f"speed_{device}{suffix}.json"
    load_before = os.getloadavg()
    print(f"device {device}; --precision auto picks {here} here ({without_bf16} without bf16 units); "
          f"batch {batch}; {torch.get_num_threads()} threads; load average {load_before[0]:.1f}", flush=True)

    from anomaseg.data.layout import find_cases
    from anomaseg.data.slices import CaseCache, prepare_cases, training_slices

    precisions = ["32"] + (["bf16"] if here == "bf16" else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ANOMASEG_CACHE"] = str(Path(tmp) / "cache")
        data = Path(tmp) / "phantom"
        make_phantom(data, 6, 0, seed=0, resolution=2)
        for size in args.sizes:
            spec = cfg.DataConfig(image_size=size).slice_spec()
            cases = prepare_cases(find_cases(data / "train", ["flair"]), spec, CaseCache(None), progress=False)
            x_all = training_slices(cases)
            runs = {
                "plain_fp32": lambda: (plain_loop(x_all, size, batch, args.steps, device, False), None),
                "plain_fp32_fused_adam": lambda: (plain_loop(x_all, size, batch, args.steps, device, True), None),
                "anomaseg_fp32": lambda: trainer_run(data / "train", size, batch, args.steps, "32", False, False, device),
            }
            for p in precisions:
                name = "fp32" if p == "32" else p
                runs[f"anomaseg_{name}_cl"] = (
                    lambda p=p: trainer_run(data / "train", size, batch, args.steps, p, True, False, device))
                if not args.no_compile:
                    runs[f"anomaseg_{name}_cl_compiled"] = (
                        lambda p=p: trainer_run(data / "train", size, batch, args.steps, p, True, True, device))
            samples = {k: [] for k in runs}
            first_epoch = {k: [] for k in runs}
            for r in range(args.repeats):  # interleaved, so every configuration sees the same machine
                for name, fn in runs.items():
                    speed, first = fn()
                    samples[name].append(speed)
                    if first is not None:
                        first_epoch[name].append(first)
                    print(f"{size}px repeat {r + 1}: {name} {speed:.1f} slices/s (load {os.getloadavg()[0]:.1f})",
                          flush=True)
            med = {k: statistics.median(v) for k, v in samples.items()}
            ref = med["plain_fp32"]
            conv_share = convolution_share(plain_step(x_all, size, batch, device), device)

            def default_row(precision: str) -> str:
                name = "fp32" if precision == "32" else precision
                return f"anomaseg_{name}_cl" + ("" if args.no_compile else "_compiled")

            results[str(size)] = {
                "slices_per_second": med, "samples": samples,
                "ratio_vs_plain_fp32": {k: v / ref for k, v in med.items()},
                "framework_overhead": 1 - med["anomaseg_fp32"] / med["plain_fp32_fused_adam"],
                "plain_loop_convolution_share": conv_share,
                "default_row": default_row(here), "default_speedup": med[default_row(here)] / ref,
                "default_without_bf16_row": default_row(without_bf16),
                "default_without_bf16_speedup": med[default_row(without_bf16)] / ref,
                "first_epoch_seconds": first_epoch,
                "compile_seconds_estimate": {
                    k: [f - statistics.median(first_epoch[k.replace("_compiled", "")]) for f in v]
                    for k, v in first_epoch.items() if k.endswith("_compiled")},
            }
    report = {"batch_size": batch, "steps": args.steps, "repeats": args.repeats,
              "auto_precision_here": here, "auto_precision_without_bf16": without_bf16,
              "machine": machine_info(device), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"), "results": results}
    write_text(out, json.dumps(report, indent=1))
    flags = ", ".join(report["machine"]["cpu"]["key_flags"])
    print(f"\n{report['machine']['cpu']['model']} ({flags}); load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; "
          f"batch {batch}; median of {args.repeats}; x = vs plain fp32 loop")
    for size, r in results.items():
        print(f"\n{size} px: " + "; ".join(f"{k} {v:.1f} ({r['ratio_vs_plain_fp32'][k]:.2f}x)"
                                         for k, v in r["slices_per_second"].items()))
        print(f"  convolutions: {r['plain_loop_convolution_share']:.0%} of the plain loop's operator time; "
              f"framework overhead at equal settings {r['framework_overhead']:+.1%}; default here "
              f"({r['default_row']}) {r['default_speedup']:.2f}x; default without bf16 "
              f"({r['default_without_bf16_row']}) {r['default_without_bf16_speedup']:.2f}x")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
