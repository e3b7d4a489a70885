"""`anomaseg merge`: the evaluations of an array job's shards (`evaluate --shard`) merged into the one
that `evaluate` over all cases writes, byte for byte (see `shards` for what a shard leaves behind).
"""

from __future__ import annotations

from pathlib import Path

from anomaseg.dataset_job import OutputFolder
from anomaseg.errors import InputError
from anomaseg.evaluation import merge_shards, write_evaluation
from anomaseg.shards import check_complete, read_state


def merge_evaluations(folders: list[str | Path], out_dir: str | Path) -> dict:
    """metrics.json and report.html (or one folder per predictor and summaries) of the shards'
    cases, as one `evaluate` over all of them writes them. Returns what `evaluate_dataset` returns."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise InputError(None, "merge: no shard folders given")
    output = OutputFolder(out_dir)
    states = [read_state(f) for f in folders]
    metas = [s[0] for s in states]
    check_complete(folders, metas)
    order = sorted(range(len(folders)), key=lambda k: metas[k]["shard"][0])
    tallies, side_by_side = merge_shards([(states[k][1], states[k][2]) for k in order])
    ref = metas[0]
    with output.writing() as tmp:
        results = write_evaluation(tmp, tallies, side_by_side, ref["reported"], ref["baseline"], ref["run"],
                                   ref["data"], ref["qa"])
    return results[next(iter(results))] if len(results) == 1 else results
