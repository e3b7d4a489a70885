"""Training at scale on this machine: 1 vs 2 processes, slices in memory vs on disk, and a training
set three times larger than the memory the process is allowed.

Every configuration runs `anomaseg train` as a user would (a subprocess, the CLI), on the phantom's
healthy subjects (2 mm, FLAIR), Baur et al.'s spatial VAE, fp32, batch 32. A sampler reads
/proc every 0.2 s for the whole process tree (training processes and DataLoader workers):

- slices/s: the history's `slices_per_second` of the last epoch (the first warms up);
- peak RSS: the largest resident set of one process (the main training process in practice);
- peak private memory: the largest sum over the tree of the processes' proportional anonymous
  memory (Pss_Anon: what they allocated, pages shared copy-on-write with forked workers counted
  once, without the shared libraries and the file cache they map).

Parts (all by default; JSON to benchmarks/results/training_scale.json):

    python benchmarks/bench_training_scale.py --part processes   # --devices 1 vs 2, interleaved
    python benchmarks/bench_training_scale.py --part storage     # data.slice_store memory vs disk (0 / 2 workers)
    python benchmarks/bench_training_scale.py --part large       # a set 3x larger than the allowed memory

The large part caps each process's private writable memory (RLIMIT_DATA, `ulimit -d`: heap,
anonymous maps, thread stacks; not the shared libraries or the page cache) at --cap-mib, builds a
training set of slices taking 3x that (the phantom's subjects repeated under new case ids, their
case-cache entries hard-linked, so no preprocessing is repeated), and trains from it from disk;
the in-memory path is tried under the same cap and fails. Its reads are measured cold (the store's
pages evicted from the OS cache before the run, posix_fadvise DONTNEED) and warm.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.runtime import cpu_info  # noqa: E402

WORK = ROOT / "results" / "work_scale"
MODEL = "spatial_vae"


# ------------------------------------------------------------------------------------- measuring
def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _status(pid: int) -> dict[str, int]:
    out = {}
    for name, keys in ((f"/proc/{pid}/status", ("VmRSS", "VmHWM")), (f"/proc/{pid}/smaps_rollup", ("Pss_Anon",))):
        try:
            with open(name) as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in keys:
                        out[k] = int(v.split()[0]) * 1024
        except (OSError, ValueError):
            pass
    return out


class TreeSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.peak_rss = self.peak_private = 0

    def run(self):
        while not self.stop.is_set():
            stats = [_status(p) for p in _tree(self.pid)]
            self.peak_rss = max([self.peak_rss] + [s.get("VmHWM", s.get("VmRSS", 0)) for s in stats])
            self.peak_private = max(self.peak_private, sum(s.get("Pss_Anon", 0) for s in stats))
            time.sleep(self.every)


def run_train(data: Path, out: Path, overrides: dict, cache: Path, data_cap: int | None = None,
              timeout: float = 3600) -> dict:
    """Train (no calibration) in a subprocess: exit code, wall seconds, peak memory, last epoch."""
    env = {**os.environ, "ANOMASEG_CACHE": str(cache)}

    def limit():
        if data_cap:
            resource.setrlimit(resource.RLIMIT_DATA, (data_cap, data_cap))

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--train-only", str(data), str(out), json.dumps(overrides)],
                            env=env, preexec_fn=limit, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out_text, err = proc.communicate(timeout=timeout)
    sampler.stop.set()
    sampler.join()
    result = {"exit_code": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
              "peak_rss_mib": round(sampler.peak_rss / 2**20), "peak_private_mib": round(sampler.peak_private / 2**20)}
    history = out / "history.json"
    if proc.returncode == 0 and history.exists():
        last = json.loads(history.read_text())[-1]
        result["slices_per_second"] = round(last["slices_per_second"], 1)
        result["train_loss"] = round(last["train_loss"], 3)
    else:
        result["error"] = (err.strip().splitlines() or [""])[-1][:300]
    return result


def train_only(data: str, out: str, overrides: str) -> None:
    """What `anomaseg train` does, without the calibration that follows it (its memory and time are
    not training's). Fabric's launcher runs this same command line again for the other processes."""
    from anomaseg import config as cfg
    from anomaseg.training import train

    config = cfg.resolve(overrides=json.loads(overrides))
    config.train_dir = str(Path(data).resolve())
    train(config, out, progress=False)


def settings(size: int, epochs: int, steps: int, **more) -> dict:
    """The benchmark's run: spatial VAE, FLAIR, batch 32, fp32, no torch.compile, `steps` per epoch;
    `more`: section__key=value."""
    o = {"model": {"name": MODEL}, "data": {"image_size": size, "modalities": ["flair"]},
         "train": {"epochs": epochs, "batch_size": 32, "precision": "32", "compile": "off",
                   "max_steps_per_epoch": steps}}
    for dotted, value in more.items():
        section, key = dotted.split("__")
        o.setdefault(section, {})[key] = value
    return o


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def phantom(n: int) -> Path:
    from anomaseg.data.phantom import make_phantom

    data = WORK / f"phantom{n}"
    if not (data / "train").exists():
        make_phantom(data, n, 0, seed=0, resolution=2, modalities=("flair",))
    return data / "train"


# ------------------------------------------------------------------------------------- parts
def part_processes(a) -> dict:
    data, cache = phantom(a.subjects), WORK / "cache"
    rows = {1: [], 2: []}
    for rep in range(a.repeats):
        for devices in (1, 2):
            r = run_train(data, WORK / f"proc{devices}", settings(a.size, 2, a.steps, train__devices=devices), cache)
            r["load_average"] = load_average()
            rows[devices].append(r)
            print(f"devices {devices} repeat {rep}: {r}", flush=True)
    summary = {str(d): {"slices_per_second_median": statistics.median(r["slices_per_second"] for r in rs),
                        "runs": rs} for d, rs in rows.items()}
    summary["ratio_2_over_1"] = round(summary["2"]["slices_per_second_median"] / summary["1"]["slices_per_second_median"], 3)
    return summary


def part_storage(a) -> dict:
    data, cache = phantom(a.subjects), WORK / "cache"
    configs = {"memory": {"data__slice_store": "memory"},
               "disk, 0 workers": {"data__slice_store": "disk", "train__num_workers": 0},
               "disk, 2 workers": {"data__slice_store": "disk", "train__num_workers": 2}}
    rows = {k: [] for k in configs}
    for rep in range(a.repeats):
        for name, extra in configs.items():
            r = run_train(data, WORK / "storage", settings(a.size, 2, a.steps, **extra), cache)
            r["load_average"] = load_average()
            rows[name].append(r)
            print(f"{name} repeat {rep}: {r}", flush=True)
    return {k: {"slices_per_second_median": statistics.median(r["slices_per_second"] for r in rs),
                "peak_rss_mib_max": max(r["peak_rss_mib"] for r in rs),
                "peak_private_mib_max": max(r["peak_private_mib"] for r in rs), "runs": rs} for k, rs in rows.items()}


def large_set(source: Path, cache: Path, size: int, target_bytes: int) -> tuple[Path, int]:
    """Case folders repeating the phantom's subjects under new ids (symlinked files, hard-linked
    case-cache entries) until their slices take `target_bytes`."""
    from anomaseg.data.layout import find_cases
    from anomaseg.data.slices import CaseCache, SliceSpec
    from anomaseg.data.store import survey

    spec = SliceSpec(("flair",), size)
    case_cache = CaseCache(cache)
    cases = find_cases(source, ["flair"])
    s = survey(cases, spec, case_cache, progress=False)  # caches every subject once
    per_round = s.nbytes
    rounds = -(-target_bytes // per_round)
    big = WORK / f"large{size}_{rounds}"
    if not big.exists():
        tmp = big.with_name(big.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for r in range(rounds):
            for case in cases:
                new_id = f"r{r:04d}{case.case_id}"
                folder = tmp / new_id
                folder.mkdir(parents=True)
                for f in case.source.iterdir():
                    os.symlink(f.resolve(), folder / f.name.replace(case.case_id, new_id))
        tmp.rename(big)
    by_id = {c.case_id: c for c in cases}
    for case in find_cases(big, ["flair"]):  # same files (resolved) -> same cache key; link the entry
        original = by_id[case.case_id[5:]]
        target = case_cache.entry(case, spec)
        if not target.exists():
            os.link(case_cache.entry(original, spec), target)
    return big, rounds * s.n


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def part_large(a) -> dict:
    cap = a.cap_mib * 2**20
    data, cache = phantom(a.subjects), WORK / "cache_large"
    big, n = large_set(data, cache, a.size, 3 * cap)
    set_mib = n * a.size * a.size * 2 / 2**20
    print(f"large set: {n} slices, {set_mib:.0f} MiB, cap {a.cap_mib} MiB", flush=True)
    result = {"cap_mib": a.cap_mib, "slices": n, "set_mib": round(set_mib), "image_size": a.size}
    disk = {"data__slice_store": "disk", "train__num_workers": a.workers, "data__val_fraction": 0.002}
    # the first run builds the store (timed on its own); then training reads it cold and warm
    r = run_train(big, WORK / "large_build", settings(a.size, 1, 1, **disk), cache, cap)
    result["first_run_with_store_build"] = r
    print("build:", r, flush=True)
    stores = sorted((cache / "stores").glob("*.npy"), key=lambda p: p.stat().st_size)
    for state in ("cold", "warm"):
        if state == "cold":
            for s in stores:
                evict(s)
        r = run_train(big, WORK / "large_disk", settings(a.size, 2, a.steps, **disk), cache, cap)
        r["load_average"] = load_average()
        result[f"disk_{state}"] = r
        print(f"disk {state}:", r, flush=True)
    memory = {"data__slice_store": "memory", "data__val_fraction": 0.002}
    r = run_train(big, WORK / "large_memory", settings(a.size, 1, 1, **memory), cache, cap)
    result["memory_under_cap"] = r
    print("memory under cap:", r, flush=True)
    return result


def main() -> None:
    if sys.argv[1:2] == ["--train-only"]:
        return train_only(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["processes", "storage", "large", "all"], default="all")
    p.add_argument("--subjects", type=int, default=12)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="steps per epoch (max_steps_per_epoch)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cap-mib", type=int, default=1024, help="RLIMIT_DATA of each process in the large part")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers in the large part")
    p.add_argument("--out", default=str(ROOT / "results" / "training_scale.json"))
    a = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = {k: v for k, v in cpu_info().items() if k != "flags"}
    results["settings"] = {"model": MODEL, "image_size": a.size, "batch_size": 32, "precision": "32",
                           "steps_per_epoch": a.steps, "subjects": a.subjects, "repeats": a.repeats}
    for part in (["processes", "storage", "large"] if a.part == "all" else [a.part]):
        t0 = time.perf_counter()
        results[part] = {**globals()[f"part_{part}"](a), "load_average_end": load_average(),
                         "seconds": round(time.perf_counter() - t0)}
        write_text(out, json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
