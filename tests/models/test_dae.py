"""The denoising autoencoder: its coarse noise, its training target and its anomaly map."""

from __future__ import annotations

import contextlib

import pytest
import torch

from anomaseg.models import create_model
from anomaseg.models.dae import coarse_noise, norm_groups
from anomaseg.predictors import create_predictor
from synthetic_slices import healthy_slices, planted_blob_auroc


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_coarse_noise_is_low_frequency_with_the_requested_std():
    g = torch.Generator().manual_seed(0)
    std, res, size = 0.2, 16, 128
    n = torch.cat([coarse_noise((8, 2, size, size), res, std, g) for _ in range(8)])
    assert n.shape == (64, 2, size, size)
    # bilinear interpolation of N(0, std) nodes: pixel std ~ 2/3 std (0.664 for 8-pixel cells)
    assert 0.6 * std < float(n.std()) < 0.73 * std
    assert abs(float(n.mean())) < 0.01
    cell = size // res
    # smooth within a cell, independent two cells apart
    assert _corr(n[..., :-1], n[..., 1:]) > 0.95
    assert abs(_corr(n[..., :-2 * cell], n[..., 2 * cell:])) < 0.03
    # almost no power above the grid's frequency (white noise would put ~3/4 of it there)
    power = torch.fft.fft2(n).abs().pow(2).mean(dim=(0, 1))
    freq = torch.fft.fftfreq(size).abs() * size  # cycles per image
    high = (freq[:, None] > res) | (freq[None, :] > res)
    assert float(power[high].sum() / power.sum()) < 0.02
    # channels and samples get their own fields
    assert abs(_corr(n[:, 0], n[:, 1])) < 0.05


def test_coarse_noise_scales_with_the_image_and_follows_the_generator():
    a = coarse_noise((2, 1, 64, 64), 16, 0.2, torch.Generator().manual_seed(3))
    b = coarse_noise((2, 1, 64, 64), 16, 0.2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert coarse_noise((1, 1, 32, 48), 16, 0.2).shape == (1, 1, 32, 48)
    assert norm_groups(64) == 8 and norm_groups(128) == 16 and norm_groups(512) == 32


def test_noise_stays_inside_the_foreground():
    model = create_model("dae", tiny=True, in_channels=2, image_size=32)
    x = torch.zeros(3, 2, 32, 32)
    x[:, :, 8:24, 6:26] = 0.5
    noisy = model.add_noise(x)
    outside = x.sum(1, keepdim=True).expand_as(x) == 0
    assert torch.equal(noisy[outside], x[outside])
    assert float((noisy - x)[~outside].abs().mean()) > 0.02


def _train(model, x: torch.Tensor, steps: int, lr: float = 3e-3, batch: int = 8) -> None:
    torch.manual_seed(0)
    model.train()
    opts = model.make_optimizers(lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        model.training_step(x[idx], opts, lambda loss: loss.backward())
    model.eval()


@pytest.fixture(scope="module")
def trained_dae():
    torch.manual_seed(0)
    model = create_model("dae", in_channels=1, image_size=32, depth=3, base_channels=8)
    x = healthy_slices(64)
    _train(model, x, steps=80)
    return model


def test_training_target_is_the_clean_image(trained_dae):
    """Trained against the clean image, the model takes noise out: its output is closer to the
    clean slice than the noisy input is (a model trained towards its input would not be)."""
    x = healthy_slices(16, seed=7)
    noisy = trained_dae.add_noise(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        recon = trained_dae(noisy).recon
    brain = x > 0
    err_in = (noisy - x)[brain].pow(2).mean()
    err_out = (recon - x)[brain].pow(2).mean()
    assert err_out < 0.6 * err_in  # 0.27 measured; untrained ~ 1


def test_residual_ranks_a_planted_bright_blob_above_healthy_tissue(trained_dae):
    auroc = planted_blob_auroc(trained_dae, create_predictor("residual"))
    assert auroc > 0.88  # 0.94 measured; untrained 0.73


def test_validation_loss_is_deterministic_and_reports_the_clean_error():
    model = create_model("dae", tiny=True, in_channels=1, image_size=32)
    x = healthy_slices(4)
    a, b = model.validation_losses(x), model.validation_losses(x)
    assert a == b
    assert set(a) == {"loss", "rec", "clean"} and a["loss"] != a["clean"]


@pytest.mark.parametrize("channels,size", [(2, 128), (4, 64)])
def test_trains_under_bf16_autocast_and_channels_last(channels, size):
    model = create_model("dae", tiny=True, in_channels=channels, image_size=size).to(memory_format=torch.channels_last)
    x = torch.rand(2, channels, size, size).contiguous(memory_format=torch.channels_last)
    opts = model.make_optimizers(1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    logs = model.training_step(x, opts, lambda loss: loss.backward(),
                               lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.isfinite(torch.as_tensor(logs["loss"]))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).recon.shape == x.shape


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="divisible"):
        create_model("dae", in_channels=1, image_size=36, depth=4)
    with pytest.raises(ValueError, match="noise_std"):
        create_model("dae", tiny=True, noise_std=-1.0)
    with pytest.raises(ValueError, match="grad_clip"):
        create_model("dae", tiny=True, grad_clip=0.0)


def test_gradients_are_clipped_to_the_paper_norm():
    model = create_model("dae", tiny=True, in_channels=1, image_size=32, grad_clip=0.5)
    norms = []

    class Spy(torch.optim.Adam):
        def step(self, closure=None):
            norms.append(float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]]))))
            return super().step(closure)

    opt = Spy(model.parameters(), lr=1e-3)
    x = torch.rand(4, 1, 32, 32) * 5  # large errors, large gradients
    model.training_step(x, {"model": opt}, lambda loss: loss.backward(), contextlib.nullcontext)
    assert norms and norms[0] <= 0.5 + 1e-4
