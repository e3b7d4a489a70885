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
