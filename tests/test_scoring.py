import json

import pytest

from anomaseg import calibration
from anomaseg.cli import main
from anomaseg.run import RunPaths, load_checkpoint, save_checkpoint
from anomaseg.scorer import Scorer
from conftest import tiny_train_args


def test_calibration_is_reused_until_the_checkpoint_changes(healthy_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(tiny_train_args(healthy_dir, run, 1)) == 0
    stored = json.loads(RunPaths(run).calibration.read_text())["residual"]
    assert stored["calibration_cases"] == json.loads(RunPaths(run).split.read_text())["val"]

    def refit(*a, **k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(Scorer, "fit", refit)
    scorer = calibration.calibrate(run, progress=False)  # same checkpoint: read from calibration.json
    assert scorer.post.threshold_ == stored["threshold"]
    assert stored["postprocess"]["calibration"] == "hysteresis"  # the default rule, its second threshold kept
    assert scorer.post.peak_threshold_ == stored["postprocess_fitted"]["peak_threshold_"] >= scorer.post.threshold_
    # the stamp is the weights' digest: the same weights written again keep the calibration...
    best = RunPaths(run).best
    state = load_checkpoint(best)
    save_checkpoint(best, state)
    calibration.calibrate(run, progress=False)
    # ...new weights (e.g. training resumed through the library, which does not calibrate) make it stale
    state["model"]["encoder.0.weight"] += 1e-3
    save_checkpoint(best, state)
    with pytest.raises(AssertionError, match="calibrated again"):
        calibration.calibrate(run, progress=False)
