"""Dense and spatial autoencoders and VAEs of Baur et al. (2018), as in their comparative study.

All four share the 5x5 stride-2 encoder/decoder of `blocks.py` and differ only in the bottleneck:

- spatial: a 1x1 conv maps the (size/2^depth)^2 x C feature map to `latent_channels` maps (the
  reference code uses C // 8 = 16) and another 1x1 conv maps back: the latent code keeps its
  spatial layout;
- dense: the same 1x1 conv, then the map is flattened and a linear layer gives a `latent_dim`
  vector (128 in the comparative study); a linear layer and a 1x1 conv map back.

VAEs put a diagonal Gaussian on the code (mu and log-variance from two heads) and add the KL
divergence to N(0, I), weighted by `beta` (beta-VAE; beta = 1 is the plain VAE). Reconstruction
loss: L1 summed over pixels, averaged over the batch; the KL term is summed over latent units. In
eval mode a VAE decodes the posterior mean, so scoring is deterministic.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from anomaseg.models.base import AnomalyModel, ModelOutput
from anomaseg.models.blocks import conv_decoder, conv_encoder, encoder_channels
from anomaseg.models.registry import register_model

_TINY = dict(base_channels=8, max_channels=16, depth=3, latent_channels=4, latent_dim=16)


def l1_reconstruction(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    return (recon.float() - x.float()).abs().flatten(1).sum(1).mean()


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, summed over latent units: shape (B,)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class _Autoencoder(AnomalyModel):
    variational = False

    def __init__(self, in_channels: int = 1, image_size: int = 128, depth: int = 4, base_channels: int = 32,
                 max_channels: int = 128, latent_channels: int = 16, latent_dim: int = 128, dense: bool = False):
        super().__init__()
        if image_size % 2**depth:
            raise ValueError(f"image_size {image_size} is not divisible by 2**depth = {2**depth}")
        self.in_channels = in_channels
        top = encoder_channels(depth, base_channels, max_channels)[-1]
        self.latent_shape = (latent_channels, image_size // 2**depth, image_size // 2**depth)
        heads = 2 if self.variational else 1
        self.encoder = conv_encoder(in_channels, depth, base_channels, max_channels)
        self.decoder = conv_decoder(in_channels, depth, base_channels, max_channels)
        if dense:
            flat = math.prod(self.latent_shape)
            self.to_code = nn.Sequential(nn.Conv2d(top, latent_channels, 1), nn.Flatten(),
                                         nn.Linear(flat, heads * latent_dim))
            self.from_code = nn.Sequential(nn.Linear(latent_dim, flat), nn.Unflatten(1, self.latent_shape),
                                           nn.Conv2d(latent_channels, top, 1))
        else:
            self.to_code = nn.Conv2d(top, heads * latent_channels, 1)
            self.from_code = nn.Conv2d(latent_channels, top, 1)

    def encode(self, x: torch.Tensor):
        """Code of `x`; for VAEs the pair (mu, logvar)."""
        h = self.to_code(self.encoder(x))
        return h.chunk(2, dim=1) if self.variational else h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.from_code(z))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(self.decode(self.encode(x)))

    def loss(self, x: torch.Tensor, out: ModelOutput) -> dict[str, torch.Tensor]:
        rec = l1_reconstruction(x, out.recon)
        return {"loss": rec, "rec": rec}


class _VAE(_Autoencoder):
    variational = True
    # beta 0.05 (not the plain VAE's 1): the gradient maps of a loosely regularised VAE localise best
    # (benchmarks/README.md, "Defaults"); Baur et al.'s presets in configs/ keep beta 1
    DEFAULT_BETA = 0.05

    def __init__(self, beta: float = DEFAULT_BETA, **kwargs):
        super().__init__(**kwargs)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        mu, logvar = self.encode(x)
        z = self.sample(mu, logvar) if self.training and self._sampling else mu
        return ModelOutput(self.decode(z), mu, logvar)

    _sampling = True

    @contextlib.contextmanager
    def deterministic(self):
        self._sampling = False
        try:
            yield
        finally:
            del self._sampling  # back to the class default

    @classmethod
    def default_predictor(cls, params: dict) -> tuple[str, dict]:
        """grad_elbo signed by modality for small beta (<= 0.5), where it beat the residual; the
        residual above, where the KL term blurs the gradient maps (benchmarks/README.md, "Defaults")."""
        if float(params.get("beta", cls.DEFAULT_BETA)) <= 0.5:
            return "grad_elbo", {"polarity": "auto"}
        return super().default_predictor(params)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def loss(self, x: torch.Tensor, out: ModelOutput) -> dict[str, torch.Tensor]:
        rec = l1_reconstruction(x, out.recon)
        kl = kl_divergence(out.mu, out.logvar).mean()
        return {"loss": rec + self.beta * kl, "rec": rec, "kl": kl}


@register_model("dense_ae", description="Dense autoencoder (Baur et al. 2018): conv encoder, flat latent vector",
                tiny=_TINY)
class DenseAE(_Autoencoder):
    def __init__(self, **kwargs):
        super().__init__(dense=True, **kwargs)


@register_model("spatial_ae", description="Spatial autoencoder (Baur et al. 2018): fully convolutional bottleneck",
                tiny=_TINY)
class SpatialAE(_Autoencoder):
    def __init__(self, **kwargs):
        super().__init__(dense=False, **kwargs)


@register_model("dense_vae", description="Dense VAE / beta-VAE: conv encoder, Gaussian latent vector, L1 + beta*KL",
                tiny=_TINY)
class DenseVAE(_VAE):
    def __init__(self, **kwargs):
        super().__init__(dense=True, **kwargs)


@register_model("spatial_vae", description="Spatial VAE / beta-VAE (Baur et al. 2018): Gaussian latent maps, L1 + beta*KL",
                tiny=_TINY)
class SpatialVAE(_VAE):
    def __init__(self, **kwargs):
        super().__init__(dense=False, **kwargs)
