"""What every model offers the training loop and the predictors."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, NamedTuple

import torch
import torch.nn as nn


class ModelOutput(NamedTuple):
    """The one return type of every model's forward, in train and eval mode alike."""

    recon: torch.Tensor  # (B, C, H, W) reconstruction
    mu: torch.Tensor | None = None  # posterior mean (VAEs)
    logvar: torch.Tensor | None = None  # posterior log-variance (VAEs)


class AnomalyModel(nn.Module):
    """A plain nn.Module that reconstructs its input.

    Subclasses implement `forward(x) -> ModelOutput` and `loss(x, out) -> dict` (named terms, the
    total under "loss"). Models trained by more than one optimiser (GANs) override
    `make_optimizers` and `training_step`; the training loop itself stays generic.
    """

    in_channels: int
    hparams: dict
    # whether NHWC (channels_last) tensors make training faster on a CPU (measured per model family:
    # benchmarks/README.md); `train.channels_last: auto` follows it (GPUs always use NHWC)
    prefers_channels_last: bool = True
    reconstructs = True  # forward returns a reconstruction (False for a regressor: no sample images)

    @classmethod
    def default_predictor(cls, params: dict) -> tuple[str, dict]:
        """(name, parameters) of the predictor a run of this model uses when its config names none:
        the residual, signed by modality (FLAIR/T2 bright, T1 both), which beat the unsigned one
        for every model and modality setting of benchmarks/study_defaults.py."""
        return "residual", {"polarity": "auto"}

    def loss(self, x: torch.Tensor, out: ModelOutput) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def make_optimizers(self, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, torch.optim.Optimizer]:
        return {"model": adam(self.parameters(), lr, betas)}

    def training_step(self, x: torch.Tensor, optimizers: dict, backward: Callable[[torch.Tensor], None],
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch; returns the loss terms for logging as detached 0-dim
        tensors (floats work too): the training loop sums them on the device and reads them once
        per epoch, so a step never waits for the device to finish.

        `backward` runs the backward pass (the training loop passes Fabric's) and `autocast` opens the
        mixed-precision context for forward computations.
        """
        opt = optimizers["model"]
        with autocast():
            out = self(x)
            losses = self.loss(x, out)
        opt.zero_grad(set_to_none=True)
        backward(losses["loss"])
        opt.step()
        return {k: v.detach() for k, v in losses.items()}

    def compile_targets(self) -> list[nn.Module]:
        """Modules whose forward `torch.compile` may compile for training steps (see compilation.py):
        those `training_step` calls. Default: the model's own forward."""
        return [self]

    @torch.no_grad()
    def validation_losses(self, x: torch.Tensor) -> dict[str, float]:
        out = self(x)
        return {k: float(v) for k, v in self.loss(x, out).items()}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).recon

    @contextlib.contextmanager
    def deterministic(self):
        """Within this block a train-mode forward takes the eval-mode path (no latent sampling), so
        BatchNorm statistics can be re-estimated on the activations scoring will see."""
        yield


def _fused_if_possible(optimizer: type, params, **kwargs) -> torch.optim.Optimizer:
    params = list(params)
    try:
        return optimizer(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        return optimizer(params, **kwargs)


def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Adam with torch's fused kernel (one pass over each parameter tensor instead of about ten
    element-wise operations; CPU and CUDA) where this torch and the parameters' device have it."""
    return _fused_if_possible(torch.optim.Adam, params, lr=lr, betas=betas)


def adamw(params, lr: float, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 1e-2) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, Loshchilov & Hutter), fused where available like `adam`."""
    return _fused_if_possible(torch.optim.AdamW, params, lr=lr, betas=betas, weight_decay=weight_decay)


def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Re-estimate the running statistics of the BatchNorm layers a forward pass uses ("precise BN").

    Running averages gathered during training describe train-mode activations: those of sampled
    latent codes (VAEs) and of weights that kept moving. Scoring runs in eval mode on the posterior
    mean, so the statistics are recomputed on exactly that path: train-mode BatchNorm with a
    cumulative average (momentum None) over `batches`, the model's `deterministic()` path, no
    gradients. Layers the forward pass does not reach (a discriminator's) keep their statistics.
    Returns the number of layers recalibrated.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    used: set[int] = set()

    def first_use(module, _inputs):
        if id(module) not in used:
            used.add(id(module))
            module.reset_running_stats()
            module.momentum = None

    momenta = {id(m): m.momentum for m in layers}
    hooks = [m.register_forward_pre_hook(first_use) for m in layers]
    was_training = model.training
    model.train()
    try:
        with torch.no_grad(), model.deterministic():
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
        for m in layers:
            m.momentum = momenta[id(m)]
        model.train(was_training)
    return len(used)
