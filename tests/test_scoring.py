import json
import os

import pytest

from anomaseg import scoring
from anomaseg.cli import main
from anomaseg.run import RunPaths
from conftest import tiny_train_args


def test_calibration_is_reused_until_the_checkpoint_changes(healthy_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(tiny_train_args(healthy_dir, run, 1)) == 0
    stored = json.loads(RunPaths(run).calibration.read_text())["residual"]
    assert stored["calibration_cases"] == json.loads(RunPaths(run).split.read_text())["val"]

    def refit(*a, **k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(scoring.Scorer, "fit", refit)
    scorer = scoring.calibrate(run, progress=False)  # same checkpoint: read from calibration.json
    assert scorer.post.threshold_ == stored["threshold"]
    # a new scoring checkpoint (e.g. training resumed through the library, which does not
    # calibrate) makes the stored calibration stale
    best = RunPaths(run).best
    os.utime(best, ns=(best.stat().st_atime_ns, best.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="calibrated again"):
        scoring.calibrate(run, progress=False)
