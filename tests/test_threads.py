"""The thread policy (`anomaseg.threads`): what caps the count (affinity, cgroup v1/v2 quota, SLURM,
OMP_NUM_THREADS), who pins it (--threads > ANOMASEG_THREADS > auto), how it adapts to a neighbour,
and that a pinned count survives a kill and `--resume` bit for bit."""

from __future__ import annotations

import json
import signal
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from anomaseg import threads
from anomaseg.cli import main
from anomaseg.run import RunPaths
from conftest import tiny_train_args, write_dataset
from processes import run_cli


@pytest.fixture
def auto(monkeypatch):
    """The adaptive policy (the suite pins two threads), torch's count restored afterwards."""
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cgroup_tree(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /proc/self/cgroup and /sys/fs/cgroup: `files` maps paths under the root to contents."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line + "\n")
    return proc, root


@pytest.mark.parametrize("cpu_max,limit", [("150000 100000", 1.5), ("100000 100000", 1.0), ("max 100000", None),
                                           ("50000 100000", 0.5)])
def test_cgroup_v2_quota(tmp_path, cpu_max, limit):
    proc, root = cgroup_tree(tmp_path, "0::/user.slice/job", {"user.slice/job/cpu.max": cpu_max})
    assert threads.cgroup_cpu_limit(proc, root) == limit


def test_cgroup_v2_a_parents_quota_caps_its_children(tmp_path):
    proc, root = cgroup_tree(tmp_path, "0::/kubepods/pod/ctr", {"kubepods/cpu.max": "200000 100000",
                                                               "kubepods/pod/cpu.max": "max 100000",
                                                               "kubepods/pod/ctr/cpu.max": "300000 100000"})
    assert threads.cgroup_cpu_limit(proc, root) == 2.0


def test_cgroup_v2_on_a_hybrid_system_and_inside_a_container(tmp_path):
    # the host path of /proc/self/cgroup is not mounted inside the container: the mount's own files count
    proc, root = cgroup_tree(tmp_path, "0::/system.slice/docker-abc.scope", {"unified/cpu.max": "250000 100000"})
    assert threads.cgroup_cpu_limit(proc, root) == 2.5


@pytest.mark.parametrize("quota,period,limit", [("200000", "100000", 2.0), ("-1", "100000", None),
                                                ("150000", "100000", 1.5)])
def test_cgroup_v1_quota(tmp_path, quota, period, limit):
    proc, root = cgroup_tree(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc",
                             {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": quota,
                              "cpu,cpuacct/docker/abc/cpu.cfs_period_us": period})
    assert threads.cgroup_cpu_limit(proc, root) == limit


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert threads.cgroup_cpu_limit(tmp_path / "missing", tmp_path) is None
    proc, root = cgroup_tree(tmp_path, "0::/", {"cgroup.controllers": "memory"})  # cpu controller not enabled
    assert threads.cgroup_cpu_limit(proc, root) is None


@pytest.mark.parametrize("limits,cap", [
    (dict(affinity=8), 8),
    (dict(affinity=8, quota=1.5), 2),       # a fractional quota rounds up (the cgroup throttles all threads at once)
    (dict(affinity=8, quota=1.0), 1),
    (dict(affinity=8, quota=0.5), 1),
    (dict(affinity=2, quota=4.0), 2),       # the quota never raises the count above the affinity set
    (dict(affinity=64, slurm=4), 4),
    (dict(affinity=64, slurm=4, omp=2), 2),
    (dict(affinity=4, slurm=16, omp=8), 4),
])
def test_the_cap_is_the_smallest_limit(limits, cap):
    assert threads.CpuLimits(**limits).cap == cap


def test_cpu_limits_read_slurm_omp_and_the_affinity_set(monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: set(range(16)))
    proc, root = cgroup_tree(tmp_path, "0::/job", {"job/cpu.max": "600000 100000"})
    env = {"SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "12,2"}
    limits = threads.cpu_limits(env, proc, root)
    assert limits == threads.CpuLimits(affinity=16, quota=6.0, slurm=8, omp=12) and limits.cap == 6
    garbage = threads.cpu_limits({"SLURM_CPUS_PER_TASK": "many", "OMP_NUM_THREADS": "0"}, proc, root)
    assert (garbage.slurm, garbage.omp, garbage.cap) == (None, None, 6)


@pytest.mark.parametrize("cap,cpus,busy,expected", [(2, 2, 0, 2), (2, 2, 1, 1), (2, 2, 5, 1), (8, 8, 3, 5),
                                                    (4, 64, 10, 4), (1, 2, 1, 1), (2, 2, None, 2)])
def test_free_threads(cap, cpus, busy, expected):
    assert threads.free_threads(cap, cpus, busy) == expected


def test_pinning_precedence(auto, monkeypatch):
    assert threads.pinned_count() is None
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert threads.pinned_count() == 3
    with threads.pinned(2):  # the command's --threads
        assert threads.pinned_count() == 2
        assert threads.pinned_count(5) == 5  # a run's own train.threads wins (kept on resume)
    assert threads.pinned_count() == 3
    monkeypatch.setenv(threads.THREADS_ENV, "auto")
    assert threads.pinned_count() is None
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="threads must be"):
            threads.parse_setting(bad)


def test_start_applies_the_free_cpus_unless_pinned(auto, monkeypatch):
    monkeypatch.setattr(threads, "cpu_limits", lambda: threads.CpuLimits(affinity=4, omp=3))
    monkeypatch.setattr(threads, "busy_cpus", lambda: 2)
    lines = []
    g = threads.start(log=lines.append)
    assert (g.threads, g.cap, g.pinned, torch.get_num_threads()) == (2, 3, False, 2)
    assert lines == ["threads: 2 (other work keeps 2 of the 4 CPUs busy; adapts while it runs, --threads N "
                     "pins the count)"]
    g = threads.start(4, log=lines.append)  # pinned: exactly N, even beyond the free CPUs, and no note
    assert (g.threads, g.pinned, torch.get_num_threads(), len(lines)) == (4, True, 4, 1)
    monkeypatch.setattr(threads, "busy_cpus", lambda: 0)
    g = threads.start(log=lines.append, share=2)  # two workers split the cap
    assert (g.threads, torch.get_num_threads(), len(lines)) == (1, 1, 1)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_governor_lowers_on_a_slow_step_and_raises_when_the_neighbour_leaves(auto):
    clock, busy, lines, checks = FakeClock(), [0], [], []

    def measure():
        checks.append(clock.now)
        return busy[0]

    torch.set_num_threads(2)
    g = threads.ThreadGovernor(2, cap=2, cpus=2, log=lines.append, measure=measure, clock=clock, check_every_s=30)
    for _ in range(10):  # steady 1 s steps: no check (a check sleeps 0.1 s)
        clock.now += 1
        assert g.step(1.0) is None
    assert checks == []
    busy[0] = 1  # a neighbour starts: the next step is 4x slower
    clock.now += 4
    assert g.step(4.0) == 1 and torch.get_num_threads() == 1 and len(checks) == 1
    for _ in range(20):  # at one thread: 1.1 s steps; only the periodic check, every 30 s
        clock.now += 1.1
        assert g.step(1.1) is None
    assert len(checks) == 1
    busy[0] = 0  # the neighbour left: the periodic check raises the count again
    while g.step(1.1) is None:
        clock.now += 1.1
    assert g.threads == 2 and torch.get_num_threads() == 2 and len(checks) == 2
    assert lines == ["threads: 2 -> 1 (other work keeps 1 of the 2 CPUs busy; --threads N pins the count)",
                     "threads: 1 -> 2 (the CPUs are free again; --threads N pins the count)"]
    assert [c[1:] for c in g.changes] == [(2, 1), (1, 2)]


def test_a_slow_step_without_a_neighbour_costs_one_check_not_one_per_step(auto):
    clock, checks = FakeClock(), []
    g = threads.ThreadGovernor(2, cap=2, cpus=2, measure=lambda: checks.append(clock.now) or 0, clock=clock,
                               log=lambda s: None)
    for _ in range(10):
        clock.now += 1
        g.step(1.0)
    for _ in range(4):  # slow steps in a row for another reason (checkpoints): a check per 5 s at most
        clock.now += 2.5
        g.step(2.5)
    assert checks == [12.5, 17.5] and g.threads == 2 and g.changes == []


def test_a_pinned_governor_never_measures(auto):
    g = threads.ThreadGovernor(2, 2, 2, pinned=True, measure=lambda: pytest.fail("measured"), clock=FakeClock())
    assert all(g.step(s) is None for s in [1.0] * 10 + [50.0])


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
@pytest.mark.skipif(len(threads.affinity_cpus()) < 2, reason="needs 2 usable CPUs")
def test_a_real_busy_neighbour_lowers_the_count(auto):
    cap = threads.cpu_limits().cap
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        assert threads.busy_cpus() >= 1
        g = threads.start(log=None)
        assert g.threads <= len(threads.affinity_cpus()) - 1 and g.threads < max(cap, 2)
        assert torch.get_num_threads() == g.threads
    finally:
        hog.kill()
        hog.wait()


def test_busy_cpus_leaves_out_this_process_own_threads(monkeypatch):
    # over the interval both CPUs were busy, one of them with this process's own (finishing) threads
    monkeypatch.setattr(threads, "affinity_cpus", lambda: {0, 1})
    samples = iter([(100, 200), (120, 220)])  # (busy, total) jiffies of CPUs 0 and 1
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(threads.time, "process_time", iter([5.0, 5.1]).__next__)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.busy_cpus(0.1) == 1


# --------------------------------------------------------------------------- training
def test_training_records_its_thread_count_and_pins_it(healthy_dir, tmp_path, auto, monkeypatch, capsys):
    monkeypatch.setattr(threads, "busy_cpus", lambda interval=0.1: 64)  # every CPU busy with other work
    assert main(tiny_train_args(healthy_dir, tmp_path / "busy", 1)) == 0
    out = capsys.readouterr().out
    assert "threads: 1 (other work keeps 64 of" in out
    history = json.loads(RunPaths(tmp_path / "busy").history.read_text())
    assert [h["threads"] for h in history] == [1]
    assert yaml.safe_load(RunPaths(tmp_path / "busy").config.read_text())["train"]["threads"] == "auto"
    assert main(tiny_train_args(healthy_dir, tmp_path / "pinned", 1, "--threads", "2")) == 0
    assert "threads:" not in capsys.readouterr().out  # pinned: no note, no change
    assert [h["threads"] for h in json.loads(RunPaths(tmp_path / "pinned").history.read_text())] == [2]
    assert yaml.safe_load(RunPaths(tmp_path / "pinned").config.read_text())["train"]["threads"] == 2


def test_bad_thread_counts_are_one_line_errors(healthy_dir, tmp_path, capsys):
    assert main(tiny_train_args(healthy_dir, tmp_path / "r", 1, "--threads", "0")) == 2
    assert capsys.readouterr().err.strip() == "anomaseg: error: --threads must be >= 1, got 0"
    assert main(tiny_train_args(healthy_dir, tmp_path / "s", 1, "--set", "train.threads=many")) == 2
    assert "threads must be 'auto' or a whole number >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_a_pinned_count_survives_a_kill_and_resume_bit_for_bit(tmp_path):
    """--threads 1 at the start; the resumed process is told nothing (its environment pins 2, see
    conftest): the run's config keeps 1, and the result equals the uninterrupted run's bit for bit
    (two threads would give other weights: the count changes reductions)."""
    from test_resume import assert_same_run

    data = write_dataset(tmp_path / "healthy", 6, lesioned=False, seed=1)
    args = ("--precision", "32", "--seed", "3", "--threads", "1", "--set", "train.checkpoint_every_steps=2")
    cache = tmp_path / "cache"
    assert run_cli(tiny_train_args(data, tmp_path / "ref", 2, *args), cache) == 0
    run = tmp_path / "run"
    assert run_cli(tiny_train_args(data, run, 2, *args), cache, kill_at="train_step:epoch=2,step=3") == -signal.SIGKILL
    assert run_cli(["train", "--out", str(run), "--resume"], cache) == 0
    assert_same_run(run, tmp_path / "ref")
    assert [h["threads"] for h in json.loads(RunPaths(run).history.read_text())] == [1, 1]


def test_score_and_evaluate_run_on_the_pinned_count(shared_run, lesioned_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(threads, "busy_cpus", lambda interval=0.1: pytest.fail("pinned: nothing measured"))
    real_apply = threads.apply
    monkeypatch.setattr(threads, "apply", lambda n: seen.append(n) or real_apply(n))
    assert main(["score", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(tmp_path / "m"),
                 "--threads", "1"]) == 0
    assert seen and set(seen) == {1} and torch.get_num_threads() == 1
    seen.clear()
    assert main(["evaluate", "--run", str(shared_run), "--data", str(lesioned_dir), "--out", str(tmp_path / "e"),
                 "--threads", "3", "--no-baseline"]) == 0
    assert seen and set(seen) == {3}
    assert threads.pinned_count() == 2  # the command's pin ended with it (the suite's ANOMASEG_THREADS again)


def test_preprocess_runs_as_many_cases_at_once_as_the_cap_allows(monkeypatch):
    monkeypatch.setattr(threads, "cpu_limits", lambda: threads.CpuLimits(affinity=8, quota=3.0))
    monkeypatch.delenv(threads.THREADS_ENV)
    assert threads.process_count() == 3  # the cap: busy CPUs are not subtracted for single-threaded cases
    with threads.pinned(1):
        assert threads.process_count() == 1


def test_training_lowers_its_threads_when_a_neighbour_comes_and_logs_it_once(healthy_dir, tmp_path, auto,
                                                                             monkeypatch, capsys):
    monkeypatch.setattr(threads, "busy_cpus", lambda interval=0.1: 0)  # free at the start
    monkeypatch.setattr(threads.BusySample, "busy", lambda self: 64)  # then every CPU busy
    monkeypatch.setattr(threads, "CHECK_EVERY_S", 0.0)  # a periodic check at every step
    monkeypatch.setattr(threads, "SAMPLE_S", 0.0)  # each measured over one step
    monkeypatch.setattr(threads, "cpu_limits", lambda: threads.CpuLimits(affinity=2))
    assert main(tiny_train_args(healthy_dir, tmp_path / "run", 2)) == 0
    out = capsys.readouterr().out
    assert out.count("threads: 2 -> 1 (other work keeps 64 of the 2 CPUs busy") == 1
    history = json.loads(RunPaths(tmp_path / "run").history.read_text())
    assert [(h["threads"], h.get("threads_at_start")) for h in history] == [(1, 2), (1, None)]



def test_one_pinned_thread_stays_one_when_numba_is_loaded(healthy_dir, tmp_path):
    """numba's OpenMP layer, launched by the policy's own numba.set_num_threads, set libgomp (shared
    with torch) to every CPU after torch had been set: a process pinned to one thread that had
    loaded numba (the evaluation's kernels) trained on all CPUs (found in a study run, 5x slower)."""
    code = ("import sys, torch\nfrom pathlib import Path\nimport anomaseg.evaluation\n"
            "from anomaseg import config as cfg\nfrom anomaseg.training import train\n"
            "c = cfg.resolve(None, {'data': {'image_size': 32, 'cache_dir': None}, 'train': {'epochs': 1, "
            "'batch_size': 4, 'max_steps_per_epoch': 1, 'compile': False}})\n"
            "c.train_dir = sys.argv[1]\ntrain(c, Path(sys.argv[2]), progress=False)\nprint('THREADS', torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code, str(healthy_dir), str(tmp_path / "run")], capture_output=True,
                         text=True, env={**env, "ANOMASEG_THREADS": "1"}, timeout=300)
    assert "THREADS 1" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
