"""How many threads this process computes with: one policy for torch, numba and SimpleITK.

The CPUs the process may use are its affinity set, capped by the cgroup CPU quota (containers:
`--cpus`, Kubernetes limits; cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), by SLURM's
`SLURM_CPUS_PER_TASK` and by the user's `OMP_NUM_THREADS` (`cpu_limits`). Of those, the threads
get the CPUs other work leaves free (`busy_cpus`): a torch or numba thread that shares its CPU with
another process holds every other thread at each operator's barrier for a scheduler time slice,
which made bf16 training 4.6x slower beside one busy process on a 2-CPU machine, where one thread
fewer than the CPUs lost nothing (benchmarks/bench_contention.py --sweep). Processes that never
wait for one another (preprocess's cases) need no CPU of their own (`process_count`).

`--threads N` (any command; `train.threads: N` in a run's config, so `--resume` keeps it) or
`ANOMASEG_THREADS=N` pins the count: exactly N, never adapted. Otherwise (`auto`) a
`ThreadGovernor` re-checks the busy CPUs when a step takes more than twice the running median, and
every `CHECK_EVERY_S` seconds, and moves the thread count when a neighbour comes or goes (one log
line per change; this process's own threads are not counted as busy, its child processes, e.g.
DataLoader workers of `train.num_workers`, are). The count changes floating-point results (reductions split differently), so
runs are bit for bit repeatable only with a pinned count.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

THREADS_ENV = "ANOMASEG_THREADS"
CHECK_EVERY_S = 30.0  # periodic busy-CPU check while adapting
MEASURE_S = 0.1  # a check at start sleeps this long
SAMPLE_S = 0.25  # a check while the loop runs spans its steps for this long (costs no sleep)
SLOW_FACTOR = 2.0  # a step this much slower than the running median triggers a check
WINDOW = 20  # steps in the running median
MIN_STEPS = 5  # steps at the current count before a slow step can trigger a check
SLOW_CHECK_GAP_S = 5.0  # at most one slow-step check this often (a slow step may have other causes)


# --------------------------------------------------------------------------- what the process may use
def affinity_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity set; all CPUs where the OS has none)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_limit(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")  # "max 100000" (none) or "QUOTA PERIOD" in microseconds
    if not text:
        return None
    quota, _, period = text.partition(" ")
    try:
        return None if quota == "max" else int(quota) / int(period or 100000)
    except (ValueError, ZeroDivisionError):
        return None


def _v1_limit(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        return int(quota) / int(period) if quota and period and int(quota) > 0 else None  # -1: none
    except (ValueError, ZeroDivisionError):
        return None


def cgroup_cpu_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
                     ) -> float | None:
    """CPUs the cgroup quota allows this process (1.5 = 150 ms per 100 ms period); None: no quota.

    The process's cgroup comes from /proc/self/cgroup ("0::/path" for v2, "N:cpu,cpuacct:/path" for
    v1); every folder from it up to the mount point counts (a parent's quota caps its children),
    the smallest limit wins. Inside a container the path may name the host's hierarchy, absent
    here: then the mount point's own files count."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    limits = []
    for line in text.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2 (unified); hybrid systems mount it at root/unified
            mounts, reader = [root, root / "unified"], _v2_limit
        elif "cpu" in controllers.split(","):
            mounts, reader = [root / controllers, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"], _v1_limit
        else:
            continue
        for mount in dict.fromkeys(mounts):
            if not mount.is_dir():
                continue
            folder = mount / path.lstrip("/")
            folder = folder if folder.is_dir() else mount
            while True:
                limit = reader(folder)
                if limit is not None:
                    limits.append(limit)
                if folder == mount:
                    break
                folder = folder.parent
    return min(limits) if limits else None


def _positive_int(value: str | None) -> int | None:
    try:
        n = int(str(value).split(",")[0])  # OMP_NUM_THREADS may list nested levels: "4,2"
    except ValueError:
        return None
    return n if n >= 1 else None


@dataclass(frozen=True)
class CpuLimits:
    """What caps this process's threads, each None where it does not apply."""

    affinity: int
    quota: float | None = None  # cgroup CPUs (may be fractional)
    slurm: int | None = None  # SLURM_CPUS_PER_TASK
    omp: int | None = None  # OMP_NUM_THREADS

    @property
    def cap(self) -> int:
        """The most threads worth running: the smallest limit. A fractional quota rounds up: the
        cgroup throttles all threads at once, so no thread waits for another that is descheduled."""
        caps = [self.affinity, self.slurm, self.omp, None if self.quota is None else math.ceil(self.quota - 1e-9)]
        return max(1, min(c for c in caps if c is not None))


def cpu_limits(env: dict | None = None, proc_cgroup: Path = Path("/proc/self/cgroup"),
               cgroup_root: Path = Path("/sys/fs/cgroup")) -> CpuLimits:
    env = os.environ if env is None else env
    return CpuLimits(affinity=len(affinity_cpus()), quota=cgroup_cpu_limit(proc_cgroup, cgroup_root),
                     slurm=_positive_int(env.get("SLURM_CPUS_PER_TASK")), omp=_positive_int(env.get("OMP_NUM_THREADS")))


# --------------------------------------------------------------------------- what other work uses
def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over `cpus`, from /proc/stat's per-CPU lines."""
    busy = total = 0
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                continue
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


class BusySample:
    """A measurement of the CPUs other work keeps busy, over an interval this process may spend
    working: the busy time of the affinity set's CPUs (/proc/stat) less this process's own CPU
    time, in CPUs. Only the CPUs of the affinity set count, so a container pinned to a few CPUs of
    a large host sees its own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.cpus, self.clock = affinity_cpus(), clock
        self.start, self.before, self.own_before = clock(), _cpu_times(self.cpus), time.process_time()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def busy(self, seconds: float | None = None) -> int | None:
        """Busy CPUs from the start until now (`seconds` long: default, as the clock says), rounded;
        None where /proc/stat is unavailable (not Linux)."""
        after, own = _cpu_times(self.cpus), time.process_time() - self.own_before
        seconds = self.elapsed() if seconds is None else seconds
        if self.before is None or after is None or after[1] <= self.before[1] or seconds <= 0:
            return None
        share = (after[0] - self.before[0]) / (after[1] - self.before[1])
        return max(0, int(share * len(self.cpus) - own / seconds + 0.5))


def busy_cpus(interval: float = MEASURE_S) -> int | None:
    """How many of the CPUs this process may run on other work keeps busy, measured over `interval`
    seconds while this thread sleeps (`BusySample`)."""
    sample = BusySample()
    time.sleep(interval)
    return sample.busy(interval)


def free_threads(cap: int, cpus: int, busy: int | None) -> int:
    """Threads for `cap` allowed CPUs when other work keeps `busy` of the `cpus` it may run on busy."""
    return max(1, min(cap, cpus - (busy or 0)))


# --------------------------------------------------------------------------- applying a count
_INTEROP_SET = False


def apply(threads: int) -> None:
    """Run torch, numba (if loaded) and SimpleITK (if loaded) on `threads` threads."""
    global _INTEROP_SET
    import torch

    if "numba" in sys.modules:  # first: launching numba's OpenMP layer sets libgomp's count (shared with
        numba = sys.modules["numba"]  # torch) to every CPU, which would undo torch's setting below
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
    if not _INTEROP_SET:  # settable once, before any inter-op work; torch's own default is every CPU
        _INTEROP_SET = True
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
    if "SimpleITK" in sys.modules:
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def current() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------- the setting
_PINNED: int | None = None  # the running command's --threads (set by `pinned`)


def parse_setting(value) -> int | str:
    """`auto` or a thread count >= 1 (config values, --threads, ANOMASEG_THREADS)."""
    if value is None or value == "auto":
        return "auto"
    n = _positive_int(value) if not isinstance(value, bool) else None
    if n is None or str(n) != str(value).strip():
        raise ValueError(f"threads must be 'auto' or a whole number >= 1, got {value!r}")
    return n


def pinned_count(setting="auto") -> int | None:
    """The pinned thread count, if any: the setting itself (a number), else the running command's
    --threads, else ANOMASEG_THREADS; None = auto."""
    setting = parse_setting(setting)
    if setting != "auto":
        return setting
    if _PINNED is not None:
        return _PINNED
    env = os.environ.get(THREADS_ENV, "").strip()
    return None if env in ("", "auto") else parse_setting(env)


@contextlib.contextmanager
def pinned(threads: int | None):
    """The command's --threads for the commands it calls (None: auto), reset afterwards."""
    global _PINNED
    old, _PINNED = _PINNED, None if threads is None else parse_setting(threads)
    try:
        yield
    finally:
        _PINNED = old


# --------------------------------------------------------------------------- adapting
class ThreadGovernor:
    """The thread count of a long loop. `step(seconds)` after each step (or case): when the step
    took more than SLOW_FACTOR x the running median, or CHECK_EVERY_S have passed, it measures the
    busy CPUs over the next steps (a `BusySample` of at least SAMPLE_S, less this process's own CPU
    time: the loop never waits for it; a `measure` given, e.g. by tests, measures at once) and moves
    the thread count to the free CPUs, within the cap; each change is logged once and kept in
    `changes` ((step, old, new)).
    A pinned governor never changes anything."""

    def __init__(self, threads: int, cap: int, cpus: int, pinned: bool = False, log: Callable[[str], None] = print,
                 measure: Callable[[], int | None] | None = None, clock: Callable[[], float] = time.monotonic,
                 check_every_s: float | None = None):
        self.threads, self.cap, self.cpus, self.pinned = threads, cap, cpus, pinned
        self.log, self.measure, self.clock = log, measure, clock
        self.sample: BusySample | None = None
        self.check_every_s = CHECK_EVERY_S if check_every_s is None else check_every_s
        self.times: deque[float] = deque(maxlen=WINDOW)
        self.last_check = self.last_slow_check = clock()
        self.steps = 0
        self.changes: list[tuple[int, int, int]] = []

    def step(self, seconds: float) -> int | None:
        """Account one step; returns the new thread count when it changed, else None."""
        self.steps += 1
        if self.pinned:
            return None
        now = self.clock()
        slow = (len(self.times) >= MIN_STEPS and seconds > SLOW_FACTOR * statistics.median(self.times)
                and now - self.last_slow_check >= SLOW_CHECK_GAP_S)
        self.times.append(seconds)
        if not (slow or self.sample is not None or now - self.last_check >= self.check_every_s):
            return None
        if slow:
            self.last_slow_check = now
        if self.measure is None:  # measured over the next steps, while the loop works on
            if self.sample is None:
                self.sample = BusySample(self.clock)
            if self.sample.elapsed() < SAMPLE_S:
                return None
            busy, self.sample = self.sample.busy(), None
        else:
            busy = self.measure()
        self.last_check = self.clock()
        new = free_threads(self.cap, self.cpus, busy)
        if new == self.threads:
            return None
        old, self.threads = self.threads, new
        apply(new)
        self.times.clear()  # step times at the new count differ
        self.changes.append((self.steps, old, new))
        why = f"other work keeps {busy} of the {self.cpus} CPUs busy" if busy else "the CPUs are free again"
        self.log(f"threads: {old} -> {new} ({why}; --threads N pins the count)")
        return new


def start(setting="auto", log: Callable[[str], None] | None = print, share: int = 1,
          adapt: bool = True) -> ThreadGovernor:
    """Apply the policy now and return the governor that adapts it. A pinned count (see
    `pinned_count`) is applied as it is; otherwise the free CPUs within the cap (divided by `share`,
    the processes that split the CPUs: workers), with a one-line note when other work leaves fewer
    CPUs than that. `adapt=False`: no busy-CPU measurement, and the governor never changes."""
    limits = cpu_limits()
    cap = max(1, limits.cap // max(1, share))
    pin = pinned_count(setting)
    if pin is not None:
        apply(pin)
        return ThreadGovernor(pin, pin, limits.affinity, pinned=True, log=log or (lambda s: None))
    busy = busy_cpus() if adapt else None
    threads = free_threads(cap, limits.affinity, busy)
    apply(threads)
    if log and threads < cap:
        log(f"threads: {threads} (other work keeps {busy} of the {limits.affinity} CPUs busy; adapts while "
            "it runs, --threads N pins the count)")
    return ThreadGovernor(threads, cap, limits.affinity, pinned=not adapt, log=log or (lambda s: None))


def process_count() -> int:
    """How many single-threaded processes to run at once (preprocess's cases, one ITK thread each):
    the pinned count, else the cap. Busy CPUs are not subtracted: processes that never wait for one
    another share a CPU with other work fairly; only threads that meet at barriers stall."""
    pin = pinned_count()
    return pin if pin is not None else cpu_limits().cap
