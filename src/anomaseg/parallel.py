"""Cases split over worker processes (`anomaseg score / evaluate --workers N`).

Scoring is independent per case, so the cases are dealt round-robin to N processes (spawned: a
fresh interpreter each, safe with torch and numba threads); each worker runs `task(shard, report)`
on its share and returns a picklable result, which the caller merges in a fixed order (results
come back indexed by worker, never by arrival). The threads the process may use (`anomaseg.threads`:
a pinned --threads, else the free CPUs within the cgroup / SLURM / OMP_NUM_THREADS caps) are divided
between the workers, and each (one process too) re-checks the busy CPUs between cases when a case
takes more than twice the running median. On a machine with GPUs worker i gets GPU i mod count
(`worker_device`).

A worker that raises stops the whole command: the other workers are terminated before the error
reaches the caller (so nothing writes into an output folder that is being removed), an `InputError`
is raised again as itself (bad input reads the same with one process or many), anything else
becomes a `WorkerError` naming the worker, the case and the cause; a worker killed by a signal (or
out of memory) is reported with its exit code.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from anomaseg import threads as threads_policy
from anomaseg.errors import InputError

POLL_S = 0.2


class WorkerError(RuntimeError):
    """A worker process failed; the message names it, the case and the cause (one line)."""

    def __init__(self, message: str, worker_traceback: str = ""):
        super().__init__(message)
        self.worker_traceback = worker_traceback


def shards(items: Sequence, workers: int) -> list[list]:
    """Round-robin split (balanced when case sizes vary smoothly with their order)."""
    return [list(items[i::workers]) for i in range(workers)]


def default_threads(workers: int) -> int:
    """Each worker's share of the pinned thread count, or None: auto (each worker takes its share of
    the free CPUs, `threads.start(share=workers)`)."""
    pin = threads_policy.pinned_count()
    return None if pin is None else max(1, pin // max(workers, 1))


def worker_device(rank: int) -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return "cpu"


class _Report:
    """What a task calls per case: `report(case_id)` when a case starts (named in errors) and
    `report.done()` when it is finished (advances the caller's progress bar)."""

    def __init__(self, rank: int, queue, governor: threads_policy.ThreadGovernor | None = None):
        self.rank, self.queue, self.case, self.governor = rank, queue, None, governor
        self._last = time.perf_counter()

    def __call__(self, case_id: str) -> None:
        self.case = case_id

    def done(self) -> None:
        if self.governor is not None:  # between cases: adapt the thread count to the busy CPUs
            now = time.perf_counter()
            self.governor.step(now - self._last)
            self._last = now
        if self.queue is not None:
            self.queue.put(("progress", self.rank, self.case))


def _worker_main(rank: int, task: Callable, shard: list, args: tuple, queue, threads: int | None,
                 workers: int) -> None:
    report = _Report(rank, queue)
    try:
        report.governor = threads_policy.start("auto" if threads is None else threads, log=None, share=workers)
        result = task(rank, shard, report, *args)
    except BaseException as exc:  # everything goes back to the parent, which decides
        path = str(exc.path) if isinstance(exc, InputError) and exc.path is not None else None
        queue.put(("error", rank, report.case, type(exc).__name__, str(exc), traceback.format_exc(),
                   isinstance(exc, InputError), path, getattr(exc, "problem", None)))
        return
    queue.put(("done", rank, result))


def run_sharded(task: Callable, items: Sequence, workers: int, args: tuple = (), progress: bool = True,
                desc: str = "cases", threads: int | None = None) -> list[Any]:
    """Run `task(rank, shard, report, *args)` on `workers` shards of `items`; returns the results
    in worker order. `workers` <= 1 runs in this process (same code path, same merge order)."""
    from tqdm.auto import tqdm

    workers = max(1, min(int(workers), len(items))) if items else 1
    if workers == 1:
        with tqdm(total=len(items), desc=desc, unit="case", disable=not progress) as bar:
            governor = threads_policy.start("auto" if threads is None else threads, log=tqdm.write)
            report = _Report(0, None, governor)
            report.done = lambda: bar.update(1)  # type: ignore[method-assign]
            return [task(0, list(items), report, *args)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = threads or default_threads(workers)
    procs = [ctx.Process(target=_worker_main, args=(rank, task, shard, args, queue, threads, workers), daemon=True,
                         name=f"anomaseg-worker-{rank}")
             for rank, shard in enumerate(shards(items, workers))]
    results: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        with tqdm(total=len(items), desc=f"{desc} ({workers} workers)", unit="case", disable=not progress) as bar:
            while len(results) < workers:
                try:
                    msg = queue.get(timeout=POLL_S)
                except queue_module.Empty:
                    _check_alive(procs, results)
                    continue
                kind, rank = msg[0], msg[1]
                if kind == "progress":
                    bar.update(1)
                elif kind == "done":
                    results[rank] = msg[2]
                else:
                    _raise_worker_error(rank, workers, *msg[2:])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        queue.close()
    return [results[r] for r in range(workers)]


def _check_alive(procs, results) -> None:
    for rank, p in enumerate(procs):
        if rank not in results and p.exitcode not in (None, 0):
            how = f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            raise WorkerError(f"worker {rank + 1} of {len(procs)} died ({how}; out of memory?) before finishing "
                              "its cases; nothing was written")


def _raise_worker_error(rank, workers, case, exc_type, message, tb, is_input_error, path, problem) -> None:
    if is_input_error:
        raise InputError(None if path is None else Path(path), problem or message)
    where = f" on case {case}" if case else ""
    raise WorkerError(f"worker {rank + 1} of {workers} failed{where}: {exc_type}: {message}; nothing was written", tb)
