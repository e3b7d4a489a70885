"""Behaviour of the adversarial models (AnoVAEGAN, Skip-GANomaly) beyond the shared contract."""

from __future__ import annotations

import copy

import pytest
import torch

from anomaseg.models import create_model
from anomaseg.models.skip_ganomaly import bn_stats_frozen


def _batch(n=4, c=1, s=32, seed=0):
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def _step(model, x, autocast=None, lr=1e-3):
    model.train()
    opts = model.make_optimizers(lr, (0.9, 0.999))
    kwargs = {} if autocast is None else {"autocast": autocast}
    return model.training_step(x, opts, lambda loss: loss.backward(), **kwargs)


def test_gradient_penalty_is_per_sample_over_all_pixels_and_float32():
    torch.manual_seed(0)
    model = create_model("anovaegan", tiny=True, image_size=32, adversarial="wgan_gp", in_channels=2)
    x, fake = _batch(c=2), _batch(c=2, seed=1)
    torch.manual_seed(5)
    gp = model.gradient_penalty(x, fake)
    torch.manual_seed(5)
    alpha = torch.rand(len(x), 1, 1, 1)
    expected = []
    for i in range(len(x)):  # one sample at a time: no coupling across the batch possible
        mix = (x[i:i + 1] + alpha[i] * (fake[i:i + 1] - x[i:i + 1])).requires_grad_(True)
        (g,) = torch.autograd.grad(model.discriminator(mix).sum(), mix)
        expected.append((g.flatten().norm() - 1) ** 2)
    assert torch.allclose(gp, torch.stack(expected).mean(), rtol=1e-5, atol=1e-7)
    # under bf16 autocast the penalty is still computed in float32 (same value, not a bf16 rounding)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gp_autocast = model.gradient_penalty(x, fake)
    assert gp_autocast.dtype == torch.float32
    assert torch.allclose(gp_autocast, gp, rtol=1e-5, atol=1e-7)
    gp.backward()  # differentiable w.r.t. the critic (double backward); the output bias has no say in dD/dx
    assert [n for n, p in model.discriminator.named_parameters() if p.grad is None] == ["head.bias"]


@pytest.mark.parametrize("adversarial", ["gan", "wgan_gp"])
def test_anovaegan_steps_under_bf16_autocast(adversarial):
    torch.manual_seed(0)
    model = create_model("anovaegan", tiny=True, image_size=32, adversarial=adversarial)
    logs = _step(model, _batch(), autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert {"loss", "rec", "kl", "adv", "d_loss"} <= set(logs)
    assert ("gp" in logs) == (adversarial == "wgan_gp")
    assert all(v == v and abs(v) < float("inf") for v in logs.values())
    assert model.d_steps == (1 if adversarial == "gan" else 5)


def test_anovaegan_discriminator_steps_and_weights():
    model = create_model("anovaegan", tiny=True, image_size=32, adversarial="wgan_gp", d_steps=3)
    calls = {"n": 0}
    original = model.discriminator_loss

    def counting(*a):
        calls["n"] += 1
        return original(*a)

    model.discriminator_loss = counting
    _step(model, _batch())
    assert calls["n"] == 3
    with pytest.raises(ValueError):
        create_model("anovaegan", tiny=True, image_size=32, adversarial="hinge")
    # beta is a parameter of every VAE, AnoVAEGAN included
    assert create_model("anovaegan", tiny=True, image_size=32, beta=4).beta == 4.0


def test_optimiser_defaults_follow_the_papers():
    for name, betas in [("anovaegan", (0.5, 0.9)), ("skip_ganomaly", (0.5, 0.999))]:
        opts = create_model(name, tiny=True, image_size=32).make_optimizers(1e-4, (0.9, 0.999))
        assert set(opts) == {"generator", "discriminator"}
        assert all(o.param_groups[0]["betas"] == betas for o in opts.values())
        # betas: null -> the run's train.betas
        opts = create_model(name, tiny=True, image_size=32, betas=None).make_optimizers(1e-4, (0.8, 0.99))
        assert all(o.param_groups[0]["betas"] == (0.8, 0.99) for o in opts.values())
    # the two optimisers split the parameters: nothing shared, nothing left out
    model = create_model("anovaegan", tiny=True, image_size=32)
    opts = model.make_optimizers(1e-4)
    ids = [id(p) for o in opts.values() for g in o.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_skip_ganomaly_architecture():
    model = create_model("skip_ganomaly", tiny=True, image_size=64)
    assert len(model.generator.downs) == 6  # depth log2(64): down to 1x1
    x = _batch(2, s=64)
    h = x
    for down in model.generator.downs:
        h = down(h)
    assert h.shape[-2:] == (1, 1)
    assert model.discriminator_features(x).shape[-2:] == (4, 4)
    logits, feats = model.discriminator(x)
    assert logits.shape == (2,) and feats.shape[-2:] == (4, 4)


def test_skip_ganomaly_bn_statistics_come_from_real_batches_only():
    torch.manual_seed(0)
    model = create_model("skip_ganomaly", tiny=True, image_size=32)
    x = _batch()
    reference = copy.deepcopy(model.discriminator).train()
    with torch.no_grad():
        reference(x)  # one real batch through the discriminator as it was before the step
    _step(model, x)
    for (name, a), b in zip(model.discriminator.named_buffers(), reference.buffers()):
        if "running" in name:
            assert torch.allclose(a, b), name


def test_bn_stats_frozen_keeps_running_statistics():
    bn = torch.nn.BatchNorm2d(3).train()
    before = bn.running_mean.clone()
    with bn_stats_frozen(bn):
        bn(torch.randn(4, 3, 5, 5) + 3)
    assert torch.equal(bn.running_mean, before) and bn.momentum == 0.1
    bn(torch.randn(4, 3, 5, 5) + 3)
    assert not torch.equal(bn.running_mean, before)


def test_skip_ganomaly_input_noise_is_drawn_fresh():
    model = create_model("skip_ganomaly", tiny=True, image_size=32, input_noise=0.1)
    seen = []
    forward = model.generator.forward
    model.generator.forward = lambda inp: (seen.append(inp.detach().clone()), forward(inp))[1]
    x = _batch()
    _step(model, x)
    _step(model, x)
    noise = [s - x for s in seen]
    assert all(0.05 < n.std() < 0.2 for n in noise) and not torch.equal(noise[0], noise[1])


def test_adversarial_models_train_on_the_fabric_loop_and_resume(healthy_dir, tmp_path):
    from anomaseg import config as cfg
    from anomaseg.run import RunPaths, load_checkpoint, load_model
    from anomaseg.training import train

    config = cfg.resolve(None, {"data": {"image_size": 32}, "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 2},
                                "model": {"name": "skip_ganomaly", "params": {"base_channels": 4, "max_channels": 8}}})
    config.train_dir = str(healthy_dir)
    run = tmp_path / "run"
    train(config, run, progress=False)
    state = load_checkpoint(RunPaths(run).last)
    assert set(state["optimizers"]) == {"generator", "discriminator"}
    train(config, run, resume=True, progress=False, epochs=2)
    history = load_checkpoint(RunPaths(run).last)["history"]
    assert [h["epoch"] for h in history] == [1, 2] and "train_d_loss" in history[-1] and "val_lat" in history[-1]
    model, _ = load_model(run)
    assert not model.training
