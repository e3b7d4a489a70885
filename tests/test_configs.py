"""Every YAML preset in configs/ resolves and builds its model; `anomaseg models` lists every model."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomaseg import config as cfg
from anomaseg.cli import main
from anomaseg.models import create_model, list_models
from anomaseg.predictors.base import create_predictor

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"baur2018_dense_ae", "baur2018_spatial_vae", "baur2018_anovaegan", "skipganomaly", "mvtec_png"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_resolves_and_builds_its_model(path):
    config = cfg.resolve(path)
    model = create_model(config.model.name, in_channels=len(config.data.modalities),
                         image_size=config.data.image_size, **config.model.params)
    assert model.in_channels == len(config.data.modalities)
    assert create_predictor(config.score.predictor, **config.score.predictor_params).supports(model)
    # a preset combines with command-line overrides like any config
    assert cfg.resolve(path, {"train": {"epochs": 1}}).train.epochs == 1


def test_models_command_lists_every_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert f"\n{name} " in out
    assert {"anovaegan", "skip_ganomaly", "dense_ae", "spatial_ae", "dense_vae", "spatial_vae"} <= set(list_models())
