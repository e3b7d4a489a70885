"""What `anomaseg train` uses when the user names nothing (chosen by benchmarks/study_defaults.py)."""

import pytest

from anomaseg import config as cfg
from anomaseg.models import create_model
from anomaseg.predictors import create_predictor


def test_the_default_run_is_a_small_beta_spatial_vae_at_64_px_scored_by_signed_gradients():
    c = cfg.resolve()
    assert (c.model.name, c.data.image_size) == ("spatial_vae", 64)
    assert create_model(c.model.name, image_size=64, **c.model.params).beta == 0.05
    assert (c.score.predictor, c.score.predictor_params) == ("grad_elbo", {"polarity": "auto"})
    assert (cfg.RunConfig().score.predictor, cfg.RunConfig().score.predictor_params) == ("grad_elbo", {"polarity": "auto"})


@pytest.mark.parametrize("model,params,predictor", [
    ("spatial_vae", {"beta": 0.5}, "grad_elbo"),
    ("spatial_vae", {"beta": 1.0}, "residual"),  # the KL term blurs the gradient maps
    ("dense_vae", {}, "grad_elbo"),
    ("dense_ae", {}, "residual"),
    ("dae", {}, "residual"),
    ("anovaegan", {}, "residual"),  # keeps the paper's beta 1
    ("skip_ganomaly", {}, "residual"),
])
def test_each_model_gets_its_own_default_predictor_signed_by_modality(model, params, predictor):
    c = cfg.resolve(overrides={"model": {"name": model, "params": params}})
    assert (c.score.predictor, c.score.predictor_params) == (predictor, {"polarity": "auto"})
    built = create_model(model, tiny=True, image_size=32, **params)
    assert create_predictor(c.score.predictor, **c.score.predictor_params).supports(built)


def test_named_predictors_and_presets_are_kept_and_the_run_folder_names_the_default(tmp_path):
    assert cfg.resolve(overrides={"score": {"predictor": "residual"}}).score.predictor_params == {}
    preset = cfg.resolve("configs/baur2018_spatial_vae.yaml")  # the paper's plain VAE and its residual
    assert (preset.score.predictor, preset.score.predictor_params, preset.model.params["beta"]) == ("residual", {}, 1.0)
    extra = cfg.resolve(overrides={"score": {"predictor_params": {"sigma": 3.0}}})
    assert (extra.score.predictor, extra.score.predictor_params) == ("grad_elbo", {"polarity": "auto", "sigma": 3.0})
    cfg.save(cfg.resolve(), tmp_path / "config.yaml")
    assert "predictor: grad_elbo" in (tmp_path / "config.yaml").read_text()
