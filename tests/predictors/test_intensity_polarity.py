"""The intensity baseline and polarity-aware maps: what each polarity keeps, what the baseline learns,
and that it finds a planted lesion with no network at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaseg.models import create_model
from anomaseg.predictors import create_predictor, list_predictors
from anomaseg.predictors.polarity import channel_polarities, default_polarity, signed

SIZE = 32


def brain_slices(n=8, channels=1, seed=0, lesion=0.0):
    """Disc-shaped 'brains' of two tissues with noise, zero outside; `lesion` adds that much to a
    small square in every channel (negative: a dark lesion). Returns (x, lesion mask)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    disc = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 13 ** 2
    inner = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 6 ** 2
    base = torch.where(inner, 0.8, 0.5) * disc
    x = (base + 0.03 * torch.randn(n, channels, SIZE, SIZE, generator=g)) * disc
    spot = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    spot[8:12, 18:22] = True
    x = x + lesion * spot
    return x.clamp(min=0) * disc, spot & disc


def test_registered_and_needs_no_model():
    assert "intensity" in list_predictors()
    pred = create_predictor("intensity")
    assert pred.requires == ()
    for name in ("spatial_ae", "dense_vae"):
        assert pred.supports(create_model(name, tiny=True, image_size=SIZE))
    healthy, _ = brain_slices(seed=1)
    pred.fit(None, [healthy])  # the model is ignored: None works
    assert pred.anomaly_map(None, healthy).shape == (8, 1, SIZE, SIZE)


def test_fit_learns_median_and_mad_of_the_foreground():
    healthy, _ = brain_slices(n=6, channels=2, seed=3)
    pred = create_predictor("intensity").fit(None, [healthy[:3], healthy[3:]])
    for c in range(2):
        v = healthy[:, c][healthy.amax(1) > 0].numpy()
        med = np.median(v)
        assert pred.centre_[c] == pytest.approx(med, rel=1e-6)
        assert pred.spread_[c] == pytest.approx(1.4826 * np.median(np.abs(v - med)), rel=1e-5)


@pytest.mark.parametrize("lesion, polarity, found", [(0.6, "bright", True), (0.6, "dark", False), (0.6, "both", True),
                                                     (-0.45, "bright", False), (-0.45, "dark", True),
                                                     (-0.45, "both", True)])
def test_baseline_finds_the_lesion_of_its_polarity_only(lesion, polarity, found):
    healthy, _ = brain_slices(seed=1)
    test, spot = brain_slices(seed=2, lesion=lesion)
    pred = create_predictor("intensity", polarity=polarity).fit(None, [healthy])
    maps = pred.anomaly_map(None, test)[:, 0]
    inside = test.amax(1) > 0
    lesion_score, healthy_max = maps[:, spot].mean(), maps[inside & ~spot].amax()
    assert (lesion_score > healthy_max) == found


def test_auto_polarity_follows_the_modalities():
    assert [default_polarity(m) for m in ("FLAIR", "t2f", "t2", "t1", "t1ce", "gray", None)] == \
        ["bright", "bright", "bright", "both", "both", "both", "both"]
    assert channel_polarities("auto", ["flair", "t1"], 2) == ("bright", "both")
    assert channel_polarities("auto", None, 2) == ("both", "both")  # channels of unknown modality
    assert channel_polarities("dark", None, 3) == ("dark",) * 3
    with pytest.raises(ValueError):
        channel_polarities(("bright",), None, 2)
    with pytest.raises(ValueError):
        create_predictor("residual", polarity="up")
    # a dark lesion on a FLAIR channel: auto (bright) ignores it, the same image called T1 (both) finds it
    healthy, _ = brain_slices(seed=1)
    test, spot = brain_slices(seed=2, lesion=-0.45)
    for modality, found in (("flair", False), ("t1", True)):
        pred = create_predictor("intensity").set_modalities([modality]).fit(None, [healthy])
        maps = pred.anomaly_map(None, test)[:, 0]
        assert (maps[:, spot].mean() > maps[(test.amax(1) > 0) & ~spot].amax()) == found


def test_channels_combine_by_max_or_mean():
    healthy, _ = brain_slices(n=4, channels=2, seed=1)
    test = healthy.clone()
    test[:, 1, 8:12, 18:22] += 0.6  # lesion in the second channel only
    by_max = create_predictor("intensity", polarity="bright").fit(None, [healthy]).anomaly_map(None, test)
    by_mean = create_predictor("intensity", polarity="bright", combine="mean").fit(None, [healthy]).anomaly_map(None, test)
    assert torch.all(by_max >= by_mean - 1e-6)
    assert by_max[:, 0, 8:12, 18:22].mean() > 1.5 * by_mean[:, 0, 8:12, 18:22].mean()


def test_signed_parts_add_up_to_the_absolute_value():
    d = torch.randn(3, 2, 8, 8)
    np.testing.assert_allclose(signed(d, ("bright", "bright")) + signed(d, ("dark", "dark")), d.abs(), atol=0)
    mixed = signed(d, ("bright", "dark"))
    assert torch.equal(mixed[:, 0], d[:, 0].clamp(min=0)) and torch.equal(mixed[:, 1], (-d[:, 1]).clamp(min=0))


class _Shift(torch.nn.Module):
    """A 'model' whose reconstruction is the input with a known signed error per channel."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def reconstruct(self, x):
        return x - self.error


def test_residual_polarity_per_channel():
    x = torch.zeros(1, 2, 4, 4)
    error = torch.zeros(1, 2, 4, 4)
    error[0, 0, 0, 0], error[0, 0, 1, 1] = 0.5, -0.5  # channel 0: one brighter, one darker pixel
    error[0, 1, 2, 2] = -0.4  # channel 1: one darker pixel
    model = _Shift(error)
    both = create_predictor("residual").anomaly_map(model, x)[0, 0]
    assert both[0, 0] == both[1, 1] == 0.25 and both[2, 2] == pytest.approx(0.2)
    auto = create_predictor("residual", polarity="auto").set_modalities(["flair", "t1"]).anomaly_map(model, x)[0, 0]
    assert auto[0, 0] == 0.25 and auto[1, 1] == 0 and auto[2, 2] == pytest.approx(0.2)  # flair bright, t1 both
    per_channel = create_predictor("residual", polarity=["dark", "dark"], combine="max").anomaly_map(model, x)[0, 0]
    assert per_channel[0, 0] == 0 and per_channel[1, 1] == 0.5 and per_channel[2, 2] == pytest.approx(0.4)


@pytest.mark.parametrize("name", ["grad_elbo", "grad_rec"])
def test_gradient_maps_split_by_polarity(name):
    """The blur is linear, so the bright and dark maps add up to the unsigned one; grad_kl takes none."""
    torch.manual_seed(0)
    model = create_model("spatial_vae", tiny=True, image_size=SIZE).eval()
    x, _ = brain_slices(n=2, seed=4, lesion=0.5)
    x = 4 * x - 1  # far above and below any reconstruction of the untrained model: both signs occur
    maps = {p: create_predictor(name, polarity=p).anomaly_map(model, x) for p in ("both", "bright", "dark")}
    torch.testing.assert_close(maps["bright"] + maps["dark"], maps["both"], rtol=1e-5, atol=1e-6)
    assert maps["bright"].sum() > 0 and maps["dark"].sum() > 0
    with pytest.raises(TypeError):
        create_predictor("grad_kl", polarity="bright")


def test_baseline_joins_an_ensemble_and_round_trips():
    healthy, _ = brain_slices(seed=1)
    test, spot = brain_slices(seed=2, lesion=0.6)
    model = create_model("spatial_ae", tiny=True, image_size=SIZE).eval()
    ens = create_predictor("ensemble", members=["residual", "intensity"], combine="max")
    ens.set_modalities(["flair"]).fit(model, [healthy])
    state = ens.fitted_state()
    assert state["member_states_"][1]["modalities_"] == ["flair"]
    again = create_predictor("ensemble", members=["residual", "intensity"], combine="max").load_fitted_state(state)
    torch.testing.assert_close(again.anomaly_map(model, test), ens.anomaly_map(model, test))
    maps = ens.anomaly_map(model, test)[:, 0]
    assert maps[:, spot].mean() > maps[(test.amax(1) > 0) & ~spot].quantile(0.99)
