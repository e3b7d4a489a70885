"""Scoring and evaluation split over worker processes give what one process gives, and fail cleanly."""

import json
import os
import re
import signal

import nibabel as nib
import numpy as np
import pytest

from anomaseg import scoring
from anomaseg.cli import main
from anomaseg.parallel import WorkerError, run_sharded, shards
from conftest import tiny_train_args, write_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMASEG_CACHE", str(root / "cache"))
        healthy = write_dataset(root / "healthy", 6, lesioned=False, seed=1)
        lesioned = write_dataset(root / "lesioned", 5, lesioned=True, seed=2)
        assert main(tiny_train_args(healthy, root / "run", 1, "--precision", "32")) == 0
    return root / "run", lesioned


def test_evaluate_with_two_workers_equals_one_bit_for_bit(trained, tmp_path):
    run, lesioned = trained
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"eval{workers}"
        assert main(["evaluate", "--run", str(run), "--data", str(lesioned), "--out", str(out),
                     "--save-maps", "--workers", str(workers)]) == 0  # residual + the intensity baseline
        outs[workers] = out
    one, two = (json.loads((outs[w] / "metrics.json").read_text()) for w in (1, 2))
    # every metric, per-case row and count of the residual map and of the baseline identical
    # (JSON floats round-trip exactly)
    assert one == two and one["baseline"]["n_voxels"] == one["n_voxels"] > 0
    assert [r["case_id"] for r in one["per_case"]] == sorted(r["case_id"] for r in one["per_case"])
    undated = [re.sub(r"generated [0-9-]+ [0-9:]+ UTC", "", (outs[w] / "report.html").read_text()) for w in (1, 2)]
    assert undated[0] == undated[1]  # curves, tables and the overlays of the same best and worst cases
    maps = sorted(p.relative_to(outs[1]) for p in (outs[1] / "maps").rglob("*.nii.gz"))
    assert len(maps) == 5 * 2
    for rel in maps:
        np.testing.assert_array_equal(nib.load(outs[1] / rel).get_fdata(), nib.load(outs[2] / rel).get_fdata())


def test_score_with_two_workers_equals_one(trained, tmp_path):
    run, lesioned = trained
    for workers in (1, 2):
        assert main(["score", "--run", str(run), "--data", str(lesioned), "--out", str(tmp_path / f"s{workers}"),
                     "--workers", str(workers)]) == 0
    one, two = (json.loads((tmp_path / f"s{w}" / "scores.json").read_text()) for w in (1, 2))
    assert one == two and len(one["cases"]) == 5
    for f in sorted((tmp_path / "s1").glob("*.nii.gz")):
        np.testing.assert_array_equal(nib.load(f).get_fdata(), nib.load(tmp_path / "s2" / f.name).get_fdata())


def crashing_score_shard(rank, cases, report, *args):
    """The real worker task, which fails on case les03 after writing other cases' outputs."""
    for case in cases:
        if case.case_id == "les03":
            report(case.case_id)
            raise RuntimeError("simulated crash")
        scoring.score_shard(rank, [case], report, *args)
    return []


def test_a_crashing_worker_fails_the_command_and_writes_nothing(trained, tmp_path, monkeypatch, capsys):
    run, lesioned = trained
    monkeypatch.setattr(scoring, "score_shard", crashing_score_shard)
    out = tmp_path / "outputs" / "maps"
    out.parent.mkdir()
    assert main(["score", "--run", str(run), "--data", str(lesioned), "--out", str(out), "--workers", "2"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["anomaseg: error: worker 2 of 2 failed on case les03: RuntimeError: simulated crash; "
                      "nothing was written"]
    assert list(out.parent.iterdir()) == []  # no output folder, no temporary leftovers


def test_bad_input_in_a_worker_reads_as_with_one_process(trained, tmp_path, capsys):
    run, lesioned = trained
    data = tmp_path / "data"
    data.mkdir()
    for case in ("les00", "les01"):
        os.symlink(lesioned / case, data / case)
    broken = data / "les02"
    broken.mkdir()
    for f in (lesioned / "les02").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "les02_flair.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--out", str(out), "--workers", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "les02_flair.nii.gz" in errors[0] and not out.exists()


def dies(rank, items, report):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return items


def test_a_killed_worker_is_reported():
    with pytest.raises(WorkerError, match=r"worker 2 of 2 died \(killed by signal 9"):
        run_sharded(dies, list(range(4)), 2, progress=False)
    assert run_sharded(dies, list(range(4)), 1, progress=False) == [[0, 1, 2, 3]]


def test_shards_deal_cases_round_robin():
    assert shards(list("abcde"), 2) == [["a", "c", "e"], ["b", "d"]]
