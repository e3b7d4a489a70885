"""Speed on a machine shared with other work, with anomaseg's defaults (`anomaseg.threads`).

Default part (-> results/contention_policy.json): training, scoring and preprocessing, each in a
fresh process with the defaults only (no OMP_NUM_THREADS or ANOMASEG_THREADS set: the variables are
removed from the children's environment), in these scenarios, interleaved and repeated:

- idle;
- beside one busy pure-Python process (`while True: pass`: one CPU, no memory traffic);
- beside one memory-bound numpy process (copies 256 MB back and forth: one CPU and the memory bus);
- a neighbour that starts mid-run (training: the pure-Python loop starts half an epoch into the
  second epoch): the epoch at which the thread count changes, and each epoch's speed;
- under a cgroup CPU quota of 1 CPU (a child cgroup with cpu.max "100000 100000", v2, or
  cpu.cfs_quota_us 100000 per 100000 us, v1; needs root and a writable cgroup tree, else skipped
  with a note): training with the defaults and, for reference, with OMP_NUM_THREADS=1.

Training also runs with the thread count pinned to every CPU the process may use
(ANOMASEG_THREADS, i.e. what the defaults did before the policy): the ratio shows what the policy
buys. Throughput: training slices/s (epochs after the first), scoring and preprocessing cases/s.

    python benchmarks/bench_contention.py [--repeats 3]          # the full run
    python benchmarks/bench_contention.py --quick                # end to end in a few minutes

`--sweep` runs the earlier fixed-thread experiment instead (-> results/contention.json): the spatial
VAE's training step, fp32 and bf16 autocast, torch threads = all CPUs or one fewer, idle or one CPU
busy. Why that matters: torch's OpenMP threads (one per CPU) meet at a barrier after every
parallel operator, so one thread sharing its CPU with another process stalls them all for a
scheduler time slice; bf16 autocast adds cast operators (more barriers per step) and suffers most.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SRC = ROOT.parent / "src"
NEIGHBOURS = {
    "busy_python": "while True: pass",
    "memory_numpy": ("import numpy as np\na = np.ones(2**25); b = np.empty_like(a)\n"
                     "while True:\n    np.copyto(b, a); np.copyto(a, b)"),
}
TRAIN_CHILD = """
import json, sys
sys.path.insert(0, {src!r})
from anomaseg import config as cfg
from anomaseg.training import Trainer
config = cfg.resolve(overrides={{"data": {{"image_size": {size}, "val_fraction": 0.1}},
                                "train": {{"epochs": {epochs}, "max_steps_per_epoch": {steps}}}}})
config.train_dir = {data!r}
history = Trainer(config, {run!r}, progress=False).fit()["history"]
print("RESULT " + json.dumps(history), flush=True)
"""
TIMED_COMMAND_CHILD = """
import json, sys, time
sys.path.insert(0, {src!r})
from anomaseg.cli import main
t = time.perf_counter()
code = main({argv!r})
print("RESULT " + json.dumps({{"code": code, "seconds": time.perf_counter() - t}}), flush=True)
"""


# --------------------------------------------------------------------------- processes
def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ANOMASEG_THREADS")}
    return env | (extra or {})


def start_neighbour(kind: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", NEIGHBOURS[kind]], env=child_env())


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait()


class CpuQuota:
    """A child cgroup limited to `cpus` CPUs (v2 cpu.max, else v1 cfs quota); `.procs` is the file a
    process writes its pid to, to enter it. `.error` says why none could be made."""

    def __init__(self, cpus: float = 1.0):
        self.folder = self.procs = None
        self.version = self.error = None
        name = f"anomaseg-bench-{os.getpid()}"
        root = Path("/sys/fs/cgroup")
        tries = []
        if (root / "cgroup.controllers").exists():
            tries.append(("v2", root, {"cpu.max": f"{int(cpus * 100000)} 100000"}))
        if (root / "unified" / "cgroup.controllers").exists():
            tries.append(("v2", root / "unified", {"cpu.max": f"{int(cpus * 100000)} 100000"}))
        for v1 in ("cpu", "cpu,cpuacct"):
            if (root / v1 / "cpu.cfs_quota_us").exists():
                tries.append(("v1", root / v1, {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(int(cpus * 100000))}))
                break
        errors = []
        for version, parent, files in tries:
            folder = parent / name
            try:
                if version == "v2" and "cpu" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+cpu")
                folder.mkdir()
                for f, text in files.items():
                    (folder / f).write_text(text)
            except OSError as exc:
                errors.append(f"{version} at {parent}: {exc.strerror or exc}")
                if folder.exists():
                    folder.rmdir()
                continue
            self.folder, self.procs, self.version = folder, folder / "cgroup.procs", version
            return
        self.error = "; ".join(errors) or "no cgroup cpu controller found under /sys/fs/cgroup"

    def enter(self) -> None:  # preexec_fn: the child joins before it execs Python
        Path(self.procs).write_text(str(os.getpid()))

    def remove(self) -> None:
        if self.folder is not None and self.folder.exists():
            for _ in range(50):
                try:
                    self.folder.rmdir()
                    return
                except OSError:  # processes still leaving
                    time.sleep(0.1)


def run_child(code: str, env: dict, quota: CpuQuota | None = None, on_line=None, timeout: float = 3600) -> tuple:
    """Run a child Python; returns (its RESULT json, its stdout lines). `on_line(line, t)` sees each
    line as it comes (the mid-run neighbour starts from there)."""
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=quota.enter if quota else None)
    lines, errors = [], []
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            lines.append(line.rstrip())
            if on_line is not None:
                on_line(line, time.monotonic())
            if time.monotonic() > deadline:
                raise TimeoutError("child ran too long")
        proc.wait()
    finally:
        stop(proc)
        reader.join(timeout=5)
    result = next((json.loads(line[7:]) for line in reversed(lines) if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"child failed (exit {proc.returncode}): {''.join(errors)[-2000:]}")
    return result, lines


# --------------------------------------------------------------------------- workloads
def train_once(args, data: Path, work: Path, env: dict, quota=None, neighbour_mid_run: str | None = None) -> dict:
    run = Path(tempfile.mkdtemp(dir=work)) / "run"
    code = TRAIN_CHILD.format(src=str(SRC), size=args.size, epochs=args.epochs, steps=args.steps,
                              data=str(data), run=str(run))
    state = {"hog": None, "started": None, "epoch1": None, "begun": None}

    def on_line(line, t):
        if line.startswith("training "):
            state["begun"] = t
        elif line.startswith("epoch 1/") and neighbour_mid_run and state["hog"] is None:
            # half an epoch into epoch 2 (epoch 1 took t - begun, with its validation)
            delay = 0.5 * (t - (state["begun"] or t))
            state["timer"] = threading.Timer(delay, lambda: state.update(hog=start_neighbour(neighbour_mid_run),
                                                                         started=time.monotonic()))
            state["timer"].start()

    try:
        history, lines = run_child(code, env, quota, on_line)
    finally:
        if state.get("timer"):
            state["timer"].cancel()
            state["timer"].join()
        stop(state["hog"])
    later = [h["slices_per_second"] for h in history[1:]] or [history[0]["slices_per_second"]]
    changed = next((h["epoch"] for h in history if h.get("threads_at_start", h["threads"]) != h["threads"]
                    or h["threads"] != history[0]["threads"]), None)
    return {"slices_per_second": statistics.median(later), "per_epoch": [h["slices_per_second"] for h in history],
            "threads": [h["threads"] for h in history], "threads_at_start": history[0].get("threads_at_start", history[0]["threads"]),
            "threads_changed_in_epoch": changed, "log": [ln for ln in lines if ln.startswith("threads:")]}


def timed_command(argv: list[str], env: dict, cases: int, quota=None) -> dict:
    code = TIMED_COMMAND_CHILD.format(src=str(SRC), argv=argv)
    result, lines = run_child(code, env, quota)
    if result["code"] != 0:
        raise RuntimeError(f"anomaseg {' '.join(argv)} exited {result['code']}")
    return {"cases_per_second": cases / result["seconds"], "seconds": result["seconds"]}


def policy_benchmark(args) -> None:
    sys.path.insert(0, str(SRC))
    sys.path.insert(0, str(ROOT))
    from anomaseg import threads
    from anomaseg.atomic import write_text
    from anomaseg.cli import main as anomaseg
    from bench_speed import machine_info

    limits = threads.cpu_limits(child_env())
    work = Path(tempfile.mkdtemp(prefix="bench_contention_"))
    quota = CpuQuota(1.0) if not args.no_quota and "quota_1_cpu" in args.scenarios else None
    samples: dict[str, list[dict]] = {}
    load_before = os.getloadavg()
    try:
        phantom = work / "phantom"
        assert anomaseg(["phantom", "--out", str(phantom), "--healthy", str(args.healthy), "--lesioned",
                         str(args.cases), "--resolution", "2"]) == 0
        run = work / "scored_run"  # the model scoring uses (trained once, not timed)
        assert anomaseg(["train", "--data", str(phantom / "train"), "--out", str(run), "--epochs", "1",
                         "--image-size", str(args.size), "--set", f"train.max_steps_per_epoch={args.steps}"]) == 0
        scenarios = [s for s in args.scenarios.split(",") if s != "quota_1_cpu" or (quota and quota.folder)]
        for r in range(args.repeats):
            for scenario in scenarios:
                jobs = workloads(args, scenario, phantom, run, work, limits.cap, quota)
                jobs = jobs if r % 2 == 0 else jobs[::-1]  # alternate the order: no configuration always runs first
                for name, job in jobs:
                    hog = start_neighbour(scenario) if scenario in NEIGHBOURS else None
                    try:
                        if hog:
                            time.sleep(0.5)  # spinning before the workload starts
                        result = job()
                    finally:
                        stop(hog)
                    samples.setdefault(f"{scenario}/{name}", []).append(result)
                    print(f"repeat {r + 1}: {scenario}/{name}: " + ", ".join(
                        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                        if k not in ("per_epoch", "log")), flush=True)
    finally:
        if quota is not None:
            quota.remove()
        shutil.rmtree(work, ignore_errors=True)
    report = summarise(samples)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    out = {"throughput_median": report["median"], "ratios_to_idle": report["ratios"],
           "neighbour_mid_run": report["mid_run"], "samples": samples,
           "settings": {"image_size": args.size, "epochs": args.epochs, "max_steps_per_epoch": args.steps,
                        "healthy_cases": args.healthy, "scored_and_preprocessed_cases": args.cases,
                        "repeats": args.repeats, "quick": args.quick},
           "thread_limits": limits.__dict__, "cap": limits.cap,
           "quota": None if quota is None else {"version": quota.version, "skipped": quota.error},
           "machine": machine_info("cpu"), "lscpu_model": next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                                                              if ln.startswith("Model name")), None),
           "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    write_text(Path(args.out), json.dumps(out, indent=1))
    cpu = out["machine"]["cpu"]
    print(f"\n{cpu['model']} ({', '.join(cpu['key_flags'])}); cap {limits.cap} threads; load "
          f"{load_before[0]:.1f} -> {out['load_average_after'][0]:.1f}; medians of {args.repeats}")
    for key, value in report["median"].items():
        ratio = report["ratios"].get(key)
        print(f"  {key}: {value:.3g}" + (f" ({ratio:.2f}x idle)" if ratio is not None else ""))
    for key in [k for k in report["ratios"] if " vs " in k]:
        print(f"  {key}: {report['ratios'][key]:.2f}x")
    for key, value in report["mid_run"].items():
        print(f"  {key}: {value}")
    if quota is not None and quota.error:
        print(f"  quota_1_cpu skipped: {quota.error}")
    print(f"-> {args.out}")


def workloads(args, scenario: str, phantom: Path, run: Path, work: Path, cap: int, quota) -> list:
    q = quota if scenario == "quota_1_cpu" else None
    env = child_env()
    jobs = [("train_default", lambda: train_once(args, phantom / "train", work, env, q,
                                                 "busy_python" if scenario == "neighbour_mid_run" else None))]
    if scenario == "neighbour_mid_run":
        return jobs
    jobs.append(("train_pinned_all_cpus", lambda: train_once(args, phantom / "train", work,
                                                             child_env({"ANOMASEG_THREADS": str(cap)}), q)))
    if scenario == "quota_1_cpu":
        jobs.append(("train_omp_1", lambda: train_once(args, phantom / "train", work,
                                                       child_env({"OMP_NUM_THREADS": "1"}), q)))
        return jobs

    def score():
        out = Path(tempfile.mkdtemp(dir=work)) / "maps"
        return timed_command(["score", "--run", str(run), "--data", str(phantom / "test"), "--out", str(out)],
                             env, args.cases)

    def preprocess():
        out = Path(tempfile.mkdtemp(dir=work)) / "pre"
        argv = ["preprocess", "--data", str(phantom / "test"), "--out", str(out), "--spacing", "2"]
        if args.quick:
            argv += ["--iterations", "10", "--no-n4"]
        return timed_command(argv, env, args.cases)

    return jobs + [("score_default", score), ("preprocess_default", preprocess)]


def summarise(samples: dict[str, list[dict]]) -> dict:
    median, mid_run = {}, {}
    for key, results in samples.items():
        metric = "slices_per_second" if "slices_per_second" in results[0] else "cases_per_second"
        median[f"{key} ({metric})"] = statistics.median(r[metric] for r in results)
        if key.startswith("neighbour_mid_run"):  # per repeat: the neighbour starts half-way through epoch 2
            mid_run["threads_changed_in_epoch"] = [r["threads_changed_in_epoch"] for r in results]
            mid_run["threads_per_epoch"] = [r["threads"] for r in results]
            mid_run["slices_per_second_per_epoch"] = [[round(v, 1) for v in r["per_epoch"]] for r in results]
    ratios = {}
    for key, value in median.items():
        scenario, rest = key.split("/", 1)
        idle = median.get(f"idle/{rest}")
        if scenario != "idle" and idle:
            ratios[key] = value / idle
    omp_1 = median.get("quota_1_cpu/train_omp_1 (slices_per_second)")
    if omp_1:  # the target under a 1-CPU quota: the defaults against OMP_NUM_THREADS=1 set by hand
        ratios["quota_1_cpu/train_default vs train_omp_1"] = median["quota_1_cpu/train_default (slices_per_second)"] / omp_1
    return {"median": median, "ratios": ratios, "mid_run": mid_run}


# --------------------------------------------------------------------------- the earlier sweep
SWEEP_CHILD = """
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


def sweep(args) -> None:
    sys.path.insert(0, str(SRC))
    sys.path.insert(0, str(ROOT))
    from anomaseg import runtime, threads
    from anomaseg.atomic import write_text
    from bench_speed import machine_info

    cpus = len(threads.affinity_cpus())
    precisions = ["fp32"] + (["bf16"] if runtime.cpu_bf16_units() else [])
    thread_counts = sorted({cpus, max(1, cpus - 1)}, reverse=True)
    configs = [(busy, p, t) for busy in (False, True) for p in precisions for t in thread_counts]
    env = child_env({"OMP_WAIT_POLICY": "PASSIVE"})
    samples: dict[str, list[float]] = {}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for busy, precision, threads_n in configs:
            name = f"{'one_cpu_busy' if busy else 'idle'}_{precision}_{threads_n}_threads"
            hog = start_neighbour("busy_python") if busy else None
            try:
                code = SWEEP_CHILD.format(src=str(SRC), threads=threads_n, bf16=precision == "bf16", steps=args.sweep_steps)
                out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            finally:
                stop(hog)
            samples.setdefault(name, []).append(float(out.stdout.split()[-1]))
            print(f"repeat {r + 1}: {name} {samples[name][-1]:.1f} slices/s", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    report = {"slices_per_second": med, "samples": samples, "cpus": cpus, "steps": args.sweep_steps,
              "repeats": args.repeats, "machine": machine_info("cpu"), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out = args.out if args.out != DEFAULT_OUT else str(ROOT / "results" / "contention.json")
    write_text(Path(out), json.dumps(report, indent=1))
    print(f"-> {out}")


DEFAULT_OUT = str(ROOT / "results" / "contention_policy.json")
SCENARIOS = ("idle", "busy_python", "memory_numpy", "neighbour_mid_run", "quota_1_cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny settings, one repeat: checks the script end to end")
    ap.add_argument("--size", type=int, default=64, help="training image size (default 64)")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs per run (default 4)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per epoch (default 30)")
    ap.add_argument("--healthy", type=int, default=10, help="phantom training cases (default 10)")
    ap.add_argument("--cases", type=int, default=4, help="cases scored and preprocessed per run (default 4)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--no-quota", action="store_true", help="skip the cgroup quota scenario")
    ap.add_argument("--sweep", action="store_true", help="the earlier fixed-thread experiment instead")
    ap.add_argument("--sweep-steps", type=int, default=12)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.quick:
        args.repeats, args.size, args.epochs, args.steps, args.healthy, args.cases = 1, 32, 2, 4, 4, 2
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # finally blocks stop the neighbours
    (sweep if args.sweep else policy_benchmark)(args)


if __name__ == "__main__":
    main()
