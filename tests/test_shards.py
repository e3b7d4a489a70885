"""Array jobs: `evaluate --shard i/N` in separate processes, then `anomaseg merge`, equal one `evaluate`
over all cases byte for byte; incomplete or foreign shards are refused by name."""

import json
import os
import shutil

import pytest

from anomaseg.cli import main
from anomaseg.errors import InputError
from anomaseg.shards import parse_shard, select
from processes import run_cli
from test_parallel import trained  # noqa: F401  (the module's tiny trained run and 5 lesioned cases)

pytestmark = pytest.mark.slow


def test_shard_parsing_and_split():
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)
    # sbatch --array=1-4: task 3 is the third of four; --array=0-6:2: task 4 is the third
    assert parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
                                 "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    assert parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0",
                                 "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    with pytest.raises(InputError, match="not in a SLURM array task"):
        parse_shard("slurm", {})

    class Case:
        def __init__(self, case_id):
            self.case_id = case_id

    cases = [Case(i) for i in ("e", "a", "d", "b", "c")]
    parts = [[c.case_id for c in select(cases, (i, 3))] for i in range(3)]
    assert parts == [["a", "d"], ["b", "e"], ["c"]]  # sorted ids dealt round-robin, whatever the input order
    with pytest.raises(InputError, match="shard 5/6 has no cases"):
        select(cases, (5, 6))


def test_shard_state_keeps_every_field_and_runs_no_code(tmp_path):
    """The state travels whole (also fields a tally gains later), and a state that would call a
    function when read is refused, naming the file."""
    import os
    import pickle

    import numpy as np

    from anomaseg.evaluation import PredictorTally
    from anomaseg.shards import SHARD_STATE, read_state, write_state

    tally = PredictorTally("residual", 0.5, {"polarity": "bright"})
    tally.voxels.update(np.linspace(0, 1, 50, dtype=np.float32), np.arange(50) % 7 == 0)
    tally.future_counts = np.arange(5, dtype=np.int64)  # a field added after this module was written
    write_state(tmp_path, {"format": 1}, {"residual": tally}, [])
    _, tallies, _ = read_state(tmp_path)
    back = tallies["residual"]
    assert back.params == {"polarity": "bright"} and np.array_equal(back.future_counts, np.arange(5))
    assert back.voxels.compute() == tally.voxels.compute()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / SHARD_STATE).write_bytes(pickle.dumps({"tallies": Payload(), "side_by_side": []}))
    with pytest.raises(InputError, match="system is not allowed") as err:
        read_state(tmp_path)
    assert str(tmp_path / SHARD_STATE) in str(err.value)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_three_shards_merged_equal_one_evaluation(trained, tmp_path, monkeypatch, capsys):  # noqa: F811
    run, lesioned = trained
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1765000000")  # both reports say the same time
    whole = tmp_path / "whole"
    assert main(["evaluate", "--run", str(run), "--data", str(lesioned), "--out", str(whole)]) == 0

    shards = [tmp_path / f"shard{i}" for i in range(3)]
    for i, out in enumerate(shards):  # three processes, as the tasks of an array job
        args = ["evaluate", "--run", str(run), "--data", str(lesioned), "--out", str(out), "--shard", f"{i}/3"]
        assert run_cli(args, os.environ["ANOMASEG_CACHE"]) == 0
    sizes = [len(json.loads((s / "metrics.json").read_text())["per_case"]) for s in shards]
    assert sizes == [2, 2, 1]

    merged = tmp_path / "merged"
    assert main(["merge", *map(str, reversed(shards)), "--out", str(merged)]) == 0  # any order
    one, both = (json.loads((d / "metrics.json").read_text()) for d in (whole, merged))
    assert [r["case_id"] for r in both["per_case"]] == [f"les{i:02d}" for i in range(5)]
    assert both["per_case"] == one["per_case"] and both == one  # every metric, row and baseline figure
    assert (merged / "metrics.json").read_bytes() == (whole / "metrics.json").read_bytes()
    assert (merged / "report.html").read_bytes() == (whole / "report.html").read_bytes()

    capsys.readouterr()
    out = str(tmp_path / "refused")
    assert main(["merge", str(shards[0]), str(shards[2]), "--out", out]) == 2
    line = _one_error_line(capsys)
    assert "shard 1/3 missing" in line
    assert main(["merge", str(shards[0]), str(shards[1]), str(shards[1]), str(shards[2]), "--out", out]) == 2
    line = _one_error_line(capsys)
    assert "shard 1/3 is given twice" in line and str(shards[1]) in line

    foreign = tmp_path / "foreign"  # a shard evaluated with another threshold (e.g. another calibration)
    shutil.copytree(shards[1], foreign)
    meta = json.loads((foreign / "shard.json").read_text())
    meta["thresholds"]["residual"] += 0.5
    (foreign / "shard.json").write_text(json.dumps(meta))
    assert main(["merge", str(shards[0]), str(foreign), str(shards[2]), "--out", out]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"anomaseg: error: {foreign}:") and "thresholds differ" in line
    assert main(["merge", str(shards[0]), str(whole), "--out", out]) == 2
    assert "not the output of `evaluate --shard`" in _one_error_line(capsys)
    assert not os.path.exists(out)


def test_score_shard_writes_its_share(trained, tmp_path, monkeypatch):  # noqa: F811
    run, lesioned = trained
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")  # sbatch --array=1-3: the second task
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    out = tmp_path / "maps"
    assert main(["score", "--run", str(run), "--data", str(lesioned), "--out", str(out), "--shard", "slurm"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["shard"] == [1, 3] and [r["case_id"] for r in scores["cases"]] == ["les01", "les04"]
    assert sorted(p.name for p in out.glob("*_anomaly_map.nii.gz")) == ["les01_anomaly_map.nii.gz",
                                                                        "les04_anomaly_map.nii.gz"]
