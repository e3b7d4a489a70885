"""The training fast paths (channels_last, fused Adam) give the plain path's numbers."""

import copy

import pytest
import torch

from anomaseg.models import create_model
from anomaseg.models.base import adam


def _steps(model, x, optimizer, n=3):
    losses = []
    for _ in range(n):
        loss = model.loss(x, model(x))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["spatial_ae", "dense_ae"])
def test_fused_adam_and_channels_last_match_the_plain_loop(name):
    torch.manual_seed(0)
    plain = create_model(name, tiny=True, image_size=32, in_channels=2).train()
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x = torch.rand(8, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    opt_fast = adam(fast.parameters(), 1e-3)
    assert opt_fast.defaults.get("fused"), "this torch has a fused CPU Adam: it should be used"
    want = _steps(plain, x, torch.optim.Adam(plain.parameters(), lr=1e-3))
    got = _steps(fast, x.contiguous(memory_format=torch.channels_last), opt_fast)
    assert got == pytest.approx(want, rel=1e-4)
    # compare what the trained models compute, not each weight: a bias in front of BatchNorm has a
    # zero gradient up to rounding, which Adam's normalisation turns into steps of +-lr either way
    with torch.no_grad():
        a, b = plain(x).recon, fast(x.contiguous(memory_format=torch.channels_last)).recon
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_channels_last_auto_follows_the_model_on_the_cpu_and_is_always_on_on_a_gpu():
    from anomaseg import config as cfg
    from anomaseg.errors import InputError
    from anomaseg.training import training_memory_format

    vae, gan = create_model("spatial_vae", tiny=True, image_size=32), create_model("skip_ganomaly", tiny=True, image_size=32)
    assert cfg.RunConfig().train.channels_last == "auto"
    assert training_memory_format(vae, "auto", "cpu") == torch.channels_last
    assert training_memory_format(gan, "auto", "cpu") == torch.contiguous_format  # measured slower in NHWC
    assert training_memory_format(gan, "auto", "cuda") == torch.channels_last
    assert training_memory_format(vae, False, "cuda") == torch.contiguous_format
    assert training_memory_format(gan, True, "cpu") == torch.channels_last
    with pytest.raises(InputError, match="channels_last must be true, false or auto"):
        cfg.resolve(overrides={"train": {"channels_last": "sometimes"}})
