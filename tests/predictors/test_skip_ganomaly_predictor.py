"""The Skip-GANomaly predictor: residual map, healthy-scaled 0.9 * reconstruction + 0.1 * latent score."""

from __future__ import annotations

import pytest
import torch

from anomaseg.models import create_model
from anomaseg.predictors.base import create_predictor, list_predictors


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("skip_ganomaly", tiny=True, image_size=32)
    m.train()
    opts = m.make_optimizers(1e-3)
    m.training_step(torch.rand(4, 1, 32, 32), opts, lambda loss: loss.backward())  # non-trivial BN statistics
    return m.eval()


def _images(n, seed):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registered_and_needs_a_discriminator(model):
    assert "skip_ganomaly" in list_predictors()
    pred = create_predictor("skip_ganomaly")
    assert pred.supports(model) and pred.supports(create_model("anovaegan", tiny=True, image_size=32))
    assert not pred.supports(create_model("spatial_vae", tiny=True, image_size=32))
    with pytest.raises(ValueError):
        create_predictor("skip_ganomaly", weight=1.5)


def test_map_is_the_residual(model):
    x = _images(3, 1)
    with torch.no_grad():
        expected = (x - model(x).recon).abs().mean(1, keepdim=True)
    assert torch.allclose(create_predictor("skip_ganomaly").anomaly_map(model, x), expected)


def test_score_is_scaled_on_healthy_data_only(model):
    healthy = [_images(4, 2), _images(3, 3)]
    pred = create_predictor("skip_ganomaly")
    with pytest.raises(RuntimeError):
        pred.score(model, healthy[0])
    pred.fit(model, iter(healthy))
    assert pred.n_fit_images_ == 7 and set(pred.fitted_state()) >= {"rec_min_", "rec_max_", "lat_min_", "lat_max_"}

    x = torch.cat([_images(2, 4), _images(1, 5) * 3])  # the last image far from anything healthy
    with torch.no_grad():
        recon = model(x).recon
        rec = (x - recon).abs().flatten(1).mean(1)
        lat = (model.discriminator_features(x) - model.discriminator_features(recon)).pow(2).flatten(1).mean(1)
    scaled = lambda v, lo, hi: (v - lo) / (hi - lo)  # noqa: E731
    expected = 0.9 * scaled(rec, pred.rec_min_, pred.rec_max_) + 0.1 * scaled(lat, pred.lat_min_, pred.lat_max_)
    scores = pred.score(model, x)
    assert scores.shape == (3,) and torch.allclose(scores, expected, atol=1e-5)
    assert scores[-1] > 1  # beyond the healthy range
    # the healthy images themselves score within [0, 1]; scaling is fitted state, not test statistics
    healthy_scores = torch.cat([pred.score(model, h) for h in healthy])
    assert healthy_scores.min() >= -1e-6 and healthy_scores.max() <= 1 + 1e-6
    again = create_predictor("skip_ganomaly").load_fitted_state(pred.fitted_state())
    assert torch.allclose(again.score(model, x), scores)
