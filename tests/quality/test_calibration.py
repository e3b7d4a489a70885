"""Recalibration of the predicted Dice: removes a planted bias, monotone, stored and reloaded exactly, applied by predict."""

import json

import numpy as np
import pytest
import torch

from anomaseg.data.layout import find_cases
from anomaseg.data.slices import SliceSpec, prepare_case
from anomaseg.errors import InputError
from anomaseg.quality.assessor import QualityAssessor, QualityConfig
from anomaseg.quality.calibration import DiceCalibration, load_calibrations, save_calibrations
from anomaseg.quality.networks import create_network
from conftest import write_dataset


def _biased(n=200, seed=0):
    """True Dice uniform on [0, 1]; predictions biased low and squashed, with noise (as REG-Net's)."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0, 1, n)
    predicted = np.clip(0.15 + 0.6 * true ** 1.3 + rng.normal(0, 0.03, n), 0, 1)
    return predicted, true


@pytest.mark.parametrize("method", ["isotonic", "linear"])
def test_recalibration_removes_a_planted_bias(method):
    predicted, true = _biased(seed=0)
    cal = DiceCalibration.fit(predicted, true, method)
    new_pred, new_true = _biased(seed=1)  # fresh draws: the map generalises, it does not memorise
    before = np.abs(new_pred - new_true).mean()
    after = np.abs(cal(new_pred) - new_true).mean()
    assert before > 0.1 and after < 0.5 * before
    assert abs(np.mean(cal(new_pred) - new_true)) < 0.03  # the bias is gone
    grid = np.linspace(-0.2, 1.2, 301)
    assert np.all(np.diff(cal(grid)) >= 0) and cal(grid).min() >= 0 and cal(grid).max() <= 1
    if method == "isotonic":  # strictly rising between knots: ranks kept, not tied in steps
        from scipy.stats import spearmanr
        assert spearmanr(cal(new_pred), new_pred)[0] > 0.99


def test_too_few_points_or_none_give_the_identity():
    x = np.array([0.1, 0.5, 0.9])
    assert DiceCalibration.fit(x[:2], [0.2, 0.3]).method == "none"
    np.testing.assert_array_equal(DiceCalibration.fit(*_biased(), method="none")(x), x)
    with pytest.raises(ValueError, match="calibration must be one of"):
        DiceCalibration.fit(x, x, "platt")


def test_saved_and_reloaded_identically(tmp_path):
    cal = DiceCalibration.fit(*_biased())
    save_calibrations(tmp_path, {"difference": cal}, {"split": "val"})
    back = load_calibrations(tmp_path)["difference"]
    assert back == cal
    x = np.random.default_rng(3).uniform(0, 1, 50)
    np.testing.assert_array_equal(back(x), cal(x))
    assert load_calibrations(tmp_path / "elsewhere") == {}
    (tmp_path / "calibration.json").write_text(json.dumps({"variants": {"difference": {"slope": 1}}}))
    with pytest.raises(InputError, match="calibration.json"):
        load_calibrations(tmp_path)


def test_predict_applies_the_recalibration(tmp_path):
    data = write_dataset(tmp_path / "d", 1, lesioned=True, seed=2)
    case = find_cases(data, ["flair"], require_seg=True)[0]
    prepared = prepare_case(case, SliceSpec(("flair",), 32))
    torch.manual_seed(0)
    rec = create_network("rec_net", in_channels=1, image_size=32, base_channels=4, depth=2).eval()
    reg = create_network("reg_net", in_channels=1, image_size=32, base_channels=4, depth=2).eval()
    shift = DiceCalibration("linear", [0.0, 1.0], [0.3, 1.0], 10)  # a planted map: 0.3 + 0.7 p
    qa = QualityAssessor(QualityConfig(image_size=32), rec, {"difference": reg}, calibrations={"difference": shift})
    raw = qa.predict(prepared, prepared.truth, calibrated=False)
    assert qa.predict(prepared, prepared.truth) == pytest.approx(0.3 + 0.7 * raw)
    plain = QualityAssessor(QualityConfig(image_size=32), rec, {"difference": reg})
    assert plain.predict(prepared, prepared.truth) == raw  # no recalibration stored: raw predictions
