"""Array jobs: one share of the cases per task (`--shard I/N`, `--shard slurm`), and the state an
`evaluate --shard` task leaves for the exact merge of the tasks' evaluations (`merge.py`, `anomaseg merge`).

A shard is a deterministic share of the cases, found by each task alone: the case ids sorted, every
N-th from the I-th (as `--workers` deals them). `evaluate --shard` writes its share's usual outputs
plus SHARD_META (JSON: shard, run, checkpoint, data and its case list, predictors, thresholds,
options) and SHARD_STATE: what `evaluation.PredictorTally` accumulated for every predictor, and the
report's side-by-side rows. `merge.merge_evaluations` checks that the shards belong to one evaluation and
are all there, merges the tallies in shard order with `PredictorTally.merge` (the merge `--workers`
uses: exact) and writes through `evaluation.write_evaluation`, as `evaluate` does, so metrics.json
and report.html equal those of one `evaluate` over all cases.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

from anomaseg.atomic import write_bytes, write_text
from anomaseg.errors import InputError

SHARD_META = "shard.json"
SHARD_STATE = "shard_state.pkl"
FORMAT = 1
# What shards of one evaluation must share (besides the shard count); each is named when it differs.
SAME = (("run", "its run differs"), ("checkpoint", "its checkpoint (weights) differs"), ("data", "its data differs"),
        ("cases_digest", "its case list differs"), ("predictors", "its predictors differ"),
        ("thresholds", "its thresholds differ"), ("baseline", "its baseline option differs"),
        ("qa", "its QA model differs"))


def parse_shard(text: str, environ=None) -> tuple[int, int]:
    """(index, count) from `I/N` (0 <= I < N), or from SLURM's array variables with `slurm`:
    index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP, count =
    SLURM_ARRAY_TASK_COUNT (so `--array=1-8` and `--array=0-14:2` work as well as `--array=0-7`)."""
    environ = os.environ if environ is None else environ
    if text == "slurm":
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
        if any(n not in environ for n in names):
            raise InputError(None, "--shard slurm: not in a SLURM array task (SLURM_ARRAY_TASK_ID and "
                                   "SLURM_ARRAY_TASK_COUNT are not set; submit with sbatch --array)")
        try:
            task, count = int(environ[names[0]]), int(environ[names[1]])
            low, step = int(environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(environ.get("SLURM_ARRAY_TASK_STEP", 1))
        except ValueError:
            raise InputError(None, "--shard slurm: SLURM_ARRAY_TASK_* variables are not integers") from None
        if step < 1 or (task - low) % step:
            raise InputError(None, f"--shard slurm: task {task} is not on the array's grid (min {low}, step {step})")
        index = (task - low) // step
    else:
        i, sep, n = text.partition("/")
        try:
            index, count = int(i), int(n)
        except ValueError:
            index = count = -1
        if not sep:
            count = -1
    if not 0 <= index < count:
        raise InputError(None, f"--shard expects I/N with 0 <= I < N, or 'slurm'; got {text!r}"
                               + (f" (index {index} of {count})" if text == "slurm" else ""))
    return index, count


def select(cases: list, shard: tuple[int, int]) -> list:
    """The cases of shard (index, count): sorted by case id, every count-th from index."""
    index, count = shard
    ordered = sorted(cases, key=lambda c: c.case_id)
    mine = ordered[index::count]
    if not mine:
        raise InputError(None, f"shard {index}/{count} has no cases: the data has {len(ordered)}; "
                               f"use at most {len(ordered)} shards")
    return mine


def cases_digest(case_ids) -> str:
    return hashlib.sha256("\n".join(sorted(case_ids)).encode()).hexdigest()[:16]


def shard_meta(shard: tuple[int, int], run_dir, checkpoint: str, data, all_ids: list[str], shard_ids: list[str],
               tallies: dict, reported: list[str], baseline: bool, qa: str | None) -> dict:
    return {"format": FORMAT, "shard": list(shard), "run": str(run_dir), "checkpoint": checkpoint,
            "data": str(Path(data).resolve()), "cases_total": len(all_ids), "cases_digest": cases_digest(all_ids),
            "cases": sorted(shard_ids),
            "predictors": {name: t.params for name, t in tallies.items()},
            "thresholds": {name: t.threshold for name, t in tallies.items()},
            "reported": list(reported), "baseline": baseline, "qa": qa}


def write_state(folder: Path, meta: dict, tallies: dict, side_by_side: list) -> None:
    # pickle, because every field of a tally must travel, also those added later (another metric's
    # counts); `_Unpickler` below reads back only anomaseg's and numpy's classes
    write_bytes(folder / SHARD_STATE, pickle.dumps({"tallies": tallies, "side_by_side": side_by_side},
                                                   protocol=pickle.HIGHEST_PROTOCOL))
    write_text(folder / SHARD_META, json.dumps(meta, indent=1, default=str))


class _Unpickler(pickle.Unpickler):
    """Python's "restricting globals" recipe: a shard state may name anomaseg's classes and what
    numpy arrays and a few builtin containers need, nothing else (no function to call)."""

    NUMPY = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
             ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
             ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
             ("numpy._core.numeric", "_frombuffer")}
    BUILTINS = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "slice"),
                ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.NUMPY | self.BUILTINS:
            return super().find_class(module, name)
        if module == "anomaseg" or module.startswith("anomaseg.") or module.startswith("numpy.dtypes"):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a shard state")


def read_state(folder: Path) -> tuple[dict, dict, list]:
    """(meta, tallies, side-by-side rows) of one `evaluate --shard` output folder."""
    meta_path, state_path = folder / SHARD_META, folder / SHARD_STATE
    if not meta_path.is_file() or not state_path.is_file():
        raise InputError(folder, f"not the output of `evaluate --shard` ({SHARD_META} or {SHARD_STATE} is missing)")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
    except (ValueError, AttributeError) as exc:
        raise InputError(meta_path, f"not a shard description ({exc})") from None
    try:
        state = _Unpickler(io.BytesIO(state_path.read_bytes())).load()
        return meta, state["tallies"], state["side_by_side"]
    except Exception as exc:  # any damage: truncated, foreign or tampered
        raise InputError(state_path, f"unreadable shard state ({type(exc).__name__}: {exc})") from None


def check_complete(folders: list[Path], metas: list[dict]) -> None:
    """Shards of one evaluation, each of them once: refuses, naming the folders and what differs."""
    first, ref = folders[0], metas[0]
    for folder, meta in zip(folders[1:], metas[1:]):
        for key, what in SAME:
            if meta.get(key) != ref.get(key):
                detail = (f": {meta.get(key)} vs {ref.get(key)}" if key in ("run", "data", "thresholds", "qa")
                          else "")
                raise InputError(folder, f"a shard of another evaluation than {first}: {what}{detail}")
        if meta["shard"][1] != ref["shard"][1]:
            raise InputError(folder, f"is shard {meta['shard'][0]}/{meta['shard'][1]}, but {first} is one of "
                                     f"{ref['shard'][1]} shards")
    count = ref["shard"][1]
    seen: dict[int, Path] = {}
    for folder, meta in zip(folders, metas):
        index = meta["shard"][0]
        if index in seen:
            raise InputError(folder, f"shard {index}/{count} is given twice: {seen[index]} and {folder}")
        seen[index] = folder
    missing = [i for i in range(count) if i not in seen]
    if missing:
        raise InputError(None, f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{i}/{count}' for i in missing)} "
                               f"missing: {len(folders)} of {count} shards given "
                               f"({', '.join(str(f) for f in folders)})")
    ids = sorted(i for meta in metas for i in meta["cases"])
    if len(ids) != ref["cases_total"] or cases_digest(ids) != ref["cases_digest"]:
        raise InputError(None, "the shards' cases do not add up to the evaluation's case list")
