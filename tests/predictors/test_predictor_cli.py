"""End to end: `anomaseg evaluate --predictor all|a,b --predictor-params ...` with the VAE predictors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from anomaseg.cli import main
from conftest import write_dataset

TINY = "model.params={base_channels: 8, max_channels: 16, depth: 3, latent_channels: 4}"
VAE_PREDICTORS = {"residual", "projection", "grad_elbo", "grad_kl", "grad_rec", "combi", "ensemble"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    old, pinned = torch.get_num_threads(), os.environ.get("ANOMASEG_THREADS")
    os.environ["ANOMASEG_THREADS"] = "1"  # tiny models: one thread is faster than two busy ones (anomaseg.threads)
    root = tmp_path_factory.mktemp("cli")
    healthy = write_dataset(root / "healthy", 5, lesioned=False, seed=1)
    lesioned = write_dataset(root / "lesioned", 2, lesioned=True, seed=2)
    out = root / "run"
    assert main(["train", "--data", str(healthy), "--out", str(out), "--epochs", "2", "--image-size", "32",
                 "--batch-size", "16", "--set", TINY, "--set", "data.cache_dir=null"]) == 0
    yield out, lesioned
    if pinned is None:
        os.environ.pop("ANOMASEG_THREADS")
    else:
        os.environ["ANOMASEG_THREADS"] = pinned
    torch.set_num_threads(old)


def test_evaluate_all_predictors_of_a_vae(run, tmp_path):
    out, lesioned = run
    assert main(["evaluate", "--run", str(out), "--data", str(lesioned), "--out", str(tmp_path / "e"),
                 "--predictor", "all"]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert VAE_PREDICTORS <= set(summary)  # skip_ganomaly & co. need a discriminator: left out
    for name in VAE_PREDICTORS:
        assert (tmp_path / "e" / name / "metrics.json").exists()
        assert 0 <= summary[name]["pixel_auroc"] <= 1
        assert 0 <= summary[name]["froc_score"] <= 1 and "froc_curve" not in summary[name]  # lesion-level too
    assert "froc_score" in (tmp_path / "e" / "summary.md").read_text()
    report = (tmp_path / "e" / "report.html").read_text()  # the comparison: a table and maps side by side
    for name in VAE_PREDICTORS:
        assert f'href="{name}/report.html"' in report
    assert report.count("<img") == 2  # one row of maps per lesioned case (2 here)
    calibration = json.loads((out / "calibration.json").read_text())
    state = calibration["ensemble"]["predictor_state"]
    assert len(state["mean_"]) == 2 and len(state["member_states_"]) == 2
    assert {"grad_kl_mean_", "residual_std_"} <= set(calibration["combi"]["predictor_state"])


def test_predictor_params_from_the_command_line(run, tmp_path):
    out, lesioned = run
    params = "{projection: {steps: 3, output: difference}, ensemble: {members: [residual, projection], combine: max}}"
    assert main(["evaluate", "--run", str(out), "--data", str(lesioned), "--out", str(tmp_path / "e"),
                 "--predictor", "projection,ensemble", "--predictor-params", params]) == 0
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["projection(output=difference,steps=3)"]["params"] == {"steps": 3, "output": "difference"}
    ens = [v for k, v in calibration.items() if k.startswith("ensemble(")]
    assert len(ens) == 1 and ens[0]["params"]["combine"] == "max" and len(ens[0]["predictor_state"]["mean_"]) == 2
    # the intensity baseline joins every comparison, as its first row
    assert list(json.loads((tmp_path / "e" / "summary.json").read_text())) == ["intensity", "projection", "ensemble"]
    assert "intensity (baseline)" in (tmp_path / "e" / "summary.md").read_text()
    metrics = json.loads((tmp_path / "e" / "projection" / "metrics.json").read_text())
    assert metrics["baseline"]["predictor"] == "intensity"


@pytest.mark.parametrize("params", ["[1, 2]", "{projection: {stepz: 3}}", "{nope: {}}", "{grad_kl: {sigma: -1}}"])
def test_bad_predictor_params_are_input_errors(run, tmp_path, params, capsys):
    out, lesioned = run
    assert main(["evaluate", "--run", str(out), "--data", str(lesioned), "--out", str(tmp_path / "e"),
                 "--predictor", "projection", "--predictor-params", params]) == 2
    assert "--predictor-params" in capsys.readouterr().err
