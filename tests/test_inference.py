import numpy as np
import pytest
import torch

from anomaseg.inference import count_batchnorm, fold_batchnorm, inference_batch_size, inference_copy
from anomaseg.models import create_model, list_models
from anomaseg.models.base import recalibrate_batchnorm
from anomaseg.postprocess import PostProcessor
from anomaseg.predictors import create_predictor
from anomaseg.scorer import Scorer

SIZE = 32


def trained_like(name: str) -> torch.nn.Module:
    """A tiny model whose BatchNorm layers hold non-trivial statistics and affine parameters."""
    torch.manual_seed(0)
    model = create_model(name, tiny=True, image_size=SIZE, in_channels=2)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    recalibrate_batchnorm(model, [torch.rand(8, 2, SIZE, SIZE) * 1.5 for _ in range(3)])
    return model.eval()


MODELS_WITH_BN = [n for n in list_models() if count_batchnorm(create_model(n, tiny=True, image_size=SIZE))]


def test_every_model_with_batchnorm_is_covered():
    assert {"spatial_vae", "dense_ae", "skip_ganomaly"} <= set(MODELS_WITH_BN)


@pytest.mark.parametrize("name", MODELS_WITH_BN)
def test_folded_model_equals_the_trained_one_on_the_eval_path(name):
    model = trained_like(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = inference_copy(model)
    assert count_batchnorm(net) < count_batchnorm(model)  # something was folded
    x = torch.rand(5, 2, SIZE, SIZE) * 1.5
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():
        got = net(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(want, got):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    if hasattr(model, "discriminator_features"):
        with torch.no_grad():
            torch.testing.assert_close(net.discriminator_features(x), model.discriminator_features(x), rtol=0, atol=1e-5)
    for k, v in model.state_dict().items():  # the trained model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert model.training is False and any(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in net.parameters())


def test_fold_keeps_bn_that_follows_no_convolution():
    model = trained_like("spatial_ae")
    folded = fold_batchnorm(model)
    assert isinstance(folded.decoder[0], torch.nn.BatchNorm2d)  # follows the bottleneck conv of another module
    assert count_batchnorm(folded) == 1


@pytest.mark.parametrize("predictor", ["residual", "grad_elbo", "projection"])
def test_fast_scorer_gives_the_maps_of_the_plain_one(predictor):
    """Folded net + inference_mode + channels_last == the trained model as is (fp32), for a predictor
    without gradients and for two that differentiate w.r.t. the input (autograd still works)."""
    from anomaseg.data.slices import PreparedCase, SliceGeometry

    model = trained_like("spatial_vae")
    rng = np.random.default_rng(0)
    z = 7
    images = (rng.random((z, 2, SIZE, SIZE)) * 1.5).astype(np.float16)
    case = PreparedCase("c", images, np.ones((z, SIZE, SIZE), bool), None, np.ones(z, bool),
                        SliceGeometry((SIZE, SIZE, z), SIZE, (0, 0), SIZE), np.ones((SIZE, SIZE, z), bool), None,
                        None)
    params = {"projection": {"steps": 3}}.get(predictor, {})
    maps = {}
    for optimize in (False, True):
        scorer = Scorer(model, create_predictor(predictor, **params), PostProcessor(), batch_size=4, device="cpu",
                        precision="32", optimize=optimize)
        maps[optimize] = scorer.predict_slices(case)
    # residual: within 1e-5 absolute; gradient maps (values up to ~5) within 1e-5 relative
    rtol = 0 if predictor == "residual" else 1e-5
    np.testing.assert_allclose(maps[True][0], maps[False][0], rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(maps[True][1], maps[False][1], rtol=rtol, atol=1e-5)
    assert maps[True][0].max() > 0


def test_batch_size_follows_the_memory_budget():
    net = inference_copy(trained_like("spatial_ae"))
    assert inference_batch_size(net, (2, SIZE, SIZE), "cpu", budget=1) == 1
    small = inference_batch_size(net, (2, SIZE, SIZE), "cpu", budget=4 << 20)
    large = inference_batch_size(net, (2, SIZE, SIZE), "cpu", budget=64 << 20)
    assert 1 <= small < large <= 512 and small & (small - 1) == 0
