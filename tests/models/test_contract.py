"""The model contract, checked for every registered model in its `tiny` configuration."""

from __future__ import annotations

import io
import math

import pytest
import torch

from anomaseg.models import ModelOutput, create_model, list_models
from anomaseg.run import model_from_checkpoint

MODELS = list_models()


def _tiny(name: str, channels: int = 1, size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, tiny=True, in_channels=channels, image_size=size)


def _batch(channels: int = 1, size: int = 32, n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g)


def _is_adversarial(model) -> bool:
    return len(model.make_optimizers(1e-3)) > 1


def _train_step(model, x, lr=1e-3):
    model.train()
    optimizers = model.make_optimizers(lr, (0.9, 0.999))
    return model.training_step(x, optimizers, lambda loss: loss.backward())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels,size", [(1, 32), (3, 32), (1, 64), (3, 64)])
def test_output_shapes(name, channels, size):
    model = _tiny(name, channels, size)
    x = _batch(channels, size, n=2)
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            out = model(x)
        assert isinstance(out, ModelOutput)  # one return type in train and eval mode alike
        assert out.recon.shape == x.shape
        assert (out.mu is None) == (out.logvar is None)
        if out.mu is not None:
            assert out.mu.shape == out.logvar.shape and out.mu.shape[0] == len(x)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_finite_gradient_or_update(name):
    model, x = _tiny(name), _batch()
    if not _is_adversarial(model):
        model.train()
        losses = model.loss(x, model(x))
        assert {"loss"} <= set(losses) and losses["loss"].ndim == 0
        losses["loss"].backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None, f"{pname} gets no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        return
    # adversarial: one training_step updates every parameter of every network (each has its optimiser)
    model.train()
    optimizers = model.make_optimizers(1e-3, (0.9, 0.999))
    before = {id(p): p.detach().clone() for p in model.parameters()}
    logs = model.training_step(x, optimizers, lambda loss: loss.backward())
    assert "loss" in logs and all(math.isfinite(float(v)) for v in logs.values())
    assert all(not torch.is_tensor(v) or (v.dim() == 0 and not v.requires_grad) for v in logs.values())
    names = {id(p): n for n, p in model.named_parameters()}
    for opt_name, opt in optimizers.items():
        params = [p for group in opt.param_groups for p in group["params"]]
        unchanged = [names[id(p)] for p in params if torch.equal(p.detach(), before[id(p)])]
        assert params and not unchanged, f"{opt_name}: not updated by one training_step: {unchanged}"
    covered = {id(p) for opt in optimizers.values() for g in opt.param_groups for p in g["params"]}
    assert covered == set(before), "every parameter belongs to one of the optimisers"


@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_is_deterministic(name):
    model, x = _tiny(name), _batch()
    _train_step(model, x)  # non-trivial BatchNorm statistics
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    for u, v in zip(a, b):
        assert (u is None and v is None) or torch.equal(u, v)
    if getattr(model, "variational", False):  # a VAE decodes its posterior mean in eval mode
        with torch.no_grad():
            assert torch.allclose(a.recon, model.decode(a.mu), atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(name):
    model, x = _tiny(name, channels=3), _batch(channels=3)
    _train_step(model, x)
    buffer = io.BytesIO()
    torch.save({"hparams": model.hparams, "model": model.state_dict()}, buffer)
    buffer.seek(0)
    restored = model_from_checkpoint(torch.load(buffer, weights_only=False)).eval()
    model.eval()
    with torch.no_grad():
        a, b = model(x), restored(x)
    for u, v in zip(a, b):
        assert (u is None and v is None) or torch.equal(u, v)
    assert type(restored) is type(model) and restored.hparams == model.hparams


@pytest.mark.parametrize("name", MODELS)
def test_training_step_reduces_loss_on_a_fixed_batch(name):
    """Behaviour, not just shapes: a few steps on one batch lower the model's own loss."""
    model, x = _tiny(name), _batch()
    model.eval()
    with torch.no_grad():
        first = model.validation_losses(x)["loss"]
    model.train()
    optimizers = model.make_optimizers(3e-3, (0.9, 0.999))
    for _ in range(8):
        model.training_step(x, optimizers, lambda loss: loss.backward())
    model.eval()
    with torch.no_grad():
        last = model.validation_losses(x)["loss"]
    assert last < first


def test_registry_refuses_duplicates_and_names_unknown_entries():
    from anomaseg.models.registry import MODELS, register_model

    with pytest.raises(ValueError, match="model 'spatial_vae' is already registered"):
        register_model("spatial_vae", description="again")(object)
    with pytest.raises(KeyError, match="unknown model 'nope'; registered: anovaegan"):
        MODELS.entry("nope")
