"""Gradient predictors of a VAE (Zimmerer et al. 2019; Zhou, Deng & Wu 2020): how strongly each input
pixel pulls on the VAE's loss.

For an image x (B, C, H, W) and a VAE with encoder (mu(x), logvar(x)), decoder g and KL weight beta:

    rec(x)  = 1/2 sum_pixels (x - g(mu(x)))^2              ("l2", default: unit-variance Gaussian likelihood)
            or sum_pixels |x - g(mu(x))|                   ("l1": the Laplace likelihood the VAEs train with)
    kl(x)   = KL(N(mu(x), exp(logvar(x))) || N(0, I))      (closed form, summed over latent units)
    elbo(x) = rec(x) + beta * kl(x)                        (the negative ELBO, beta = model.beta)

    map = mean_channels( G_sigma * |d term / dx| )         (B, 1, H, W); higher = more anomalous

where G_sigma is a Gaussian blur of `sigma` pixels (separable conv, radius ceil(3 sigma), replicate
padding; sigma = 0 switches it off). The absolute value is taken before the blur (so gradients of
opposite sign do not cancel). Choices, and why:

- the reconstruction term decodes the posterior *mean* mu(x), not a sample z ~ q(z|x): scoring must be
  deterministic, and the mean is the noise-free limit of the one-sample Monte-Carlo estimate;
- per-sample losses are *summed* over the batch before the single backward pass and BatchNorm runs
  in eval mode (set here for the duration of the call), so sample i's gradient never depends on the
  other samples of its batch and one backward pass gives every sample's map;
- gradients are taken in float32 (float64 for a float64 model) with autocast disabled, whatever
  autocast context the caller (the Scorer runs bf16 on CPUs with fast bf16) has opened: bf16's 8-bit
  mantissa is too coarse for input gradients;
- `rec_loss` default "l2", although the models train with L1: the input gradient of the L1 term,
  sign(x - g) - J^T sign(x - g), has magnitude ~1 at every pixel whatever the residual's size, so it
  says little about where the anomaly is; the L2 term's, (x - g) - J^T (x - g), is the residual
  itself plus its pull through the model. Measured on tiny spatial VAEs trained on synthetic 32 px
  images (3 seeds, planted bright disks, pixel AUROC / AUPRC inside the brain): grad_rec l1
  0.52 / 0.19, l2 0.997 / 0.93; grad_elbo l1 0.78 / 0.29, l2 0.998 / 0.96; grad_kl (no rec term)
  sigma=2 0.82 / 0.13, sigma=1 0.79 / 0.11; the residual |x - g| for comparison 0.990 / 0.76.
  On one 64 px spatial VAE of the phantom (3 lesioned cases, no post-processing) the choice did
  not matter: grad_rec 0.659 / 0.084 (l2) vs 0.654 / 0.081 (l1), grad_elbo 0.650 / 0.080 both,
  grad_kl 0.686 / 0.082 (sigma 2) vs 0.696 / 0.085 (sigma 1); residual 0.732 / 0.169.
  With "l2", `grad_elbo` is the gradient of 1/2 |x - g|^2 + beta * kl, i.e. a Gaussian-likelihood
  ELBO on the trained encoder/decoder, not the model's own L1 training objective (ask for "l1" for that).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from anomaseg.predictors.base import Predictor, register_predictor
from anomaseg.predictors.polarity import check_polarity, signed

REC_LOSSES = ("l1", "l2")
TERMS = ("elbo", "kl", "rec")


# --------------------------------------------------------------------------- shared helpers
@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode (BatchNorm running statistics: no mixing across the batch) for the duration."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


@contextlib.contextmanager
def full_precision(x: torch.Tensor):
    """Autocast off and autograd on, whatever context the caller opened (no_grad, inference_mode)."""
    with torch.inference_mode(False), torch.autocast(device_type=x.device.type, enabled=False), torch.enable_grad():
        yield


def work_dtype(model: torch.nn.Module) -> torch.dtype:
    """float64 for a float64 model (finite-difference tests), float32 otherwise."""
    p = next(model.parameters(), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Per-sample reconstruction loss, summed over pixels and channels: (B,)."""
    r = x - recon
    if kind == "l1":
        return r.abs().flatten(1).sum(1)
    if kind == "l2":
        return 0.5 * r.pow(2).flatten(1).sum(1)
    raise ValueError(f"rec_loss must be one of {REC_LOSSES}, got {kind!r}")


def posterior_mean_reconstruction(model, x: torch.Tensor) -> torch.Tensor:
    """g(mu(x)) for a VAE, the plain reconstruction for any other model (eval mode assumed)."""
    if getattr(model, "variational", False):
        return model.decode(model.encode(x)[0])
    return model.reconstruct(x)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent units, (B,): the models' kl_divergence
    without its cast to float32 (the gradient checks run in float64)."""
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar = mu.to(dtype), logvar.to(dtype)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def vae_loss_terms(model, x: torch.Tensor, rec_loss: str = "l2") -> dict[str, torch.Tensor]:
    """Per-sample "rec", "kl" and "elbo" (negative ELBO with the model's beta) of a VAE: each (B,)."""
    mu, logvar = model.encode(x)
    rec = reconstruction_loss(x, model.decode(mu), rec_loss)
    kl = kl_per_sample(mu, logvar).to(rec.dtype)
    return {"rec": rec, "kl": kl, "elbo": rec + float(getattr(model, "beta", 1.0)) * kl}


def input_gradient(model, x: torch.Tensor, term: str = "elbo", rec_loss: str = "l2") -> torch.Tensor:
    """d term / dx per sample, (B, C, H, W), in float32 (float64 for a float64 model), no blur."""
    if term not in TERMS:
        raise ValueError(f"term must be one of {TERMS}, got {term!r}")
    with full_precision(x), eval_mode(model):
        xi = x.detach().to(work_dtype(model)).clone().requires_grad_(True)  # clone: a normal tensor
        if term == "kl":  # the encoder only: no decoder pass to pay for
            loss = kl_per_sample(*model.encode(xi)).sum()
        else:
            loss = vae_loss_terms(model, xi, rec_loss)[term].sum()  # sum: one backward, no mixing
        (grad,) = torch.autograd.grad(loss, xi)
    return grad


def gaussian_kernel1d(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each channel of (B, C, H, W); replicate padding; sigma <= 0: identity.
    Runs in x's dtype: autocast is off here (a bf16 blur would cost ~1% of the map's precision)."""
    if sigma <= 0:
        return x
    k = gaussian_kernel1d(sigma, x.dtype, x.device)
    r, c = k.numel() // 2, x.shape[1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def gradient_map(model, x: torch.Tensor, term: str, rec_loss: str = "l2", sigma: float = 2.0,
                 polarities: tuple[str, ...] | None = None) -> torch.Tensor:
    """mean_channels(G_sigma * r_c(d term/dx)): (B, 1, H, W), float32; r_c = |.| unless `polarities`
    gives a channel "bright" (max(., 0)) or "dark" (max(-., 0)), see polarity.py."""
    g = input_gradient(model, x, term, rec_loss)
    g = g.abs() if polarities is None else signed(g, polarities)
    return gaussian_smooth(g, sigma).mean(dim=1, keepdim=True).float()


# --------------------------------------------------------------------------- predictors
class _GradientPredictor(Predictor):
    requires = ("vae",)
    term = "kl"

    def __init__(self, sigma: float = 2.0, rec_loss: str = "l2"):
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if rec_loss not in REC_LOSSES:
            raise ValueError(f"rec_loss must be one of {REC_LOSSES}, got {rec_loss!r}")
        self.sigma = float(sigma)
        self.rec_loss = rec_loss

    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        return gradient_map(model, x, self.term, self.rec_loss, self.sigma)


class _SignedGradientPredictor(_GradientPredictor):
    """Gradients of terms holding the residual x - g(mu(x)): their sign says brighter or darker."""

    def __init__(self, sigma: float = 2.0, rec_loss: str = "l2", polarity="both"):
        super().__init__(sigma, rec_loss)
        self.polarity = check_polarity(polarity)

    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        return gradient_map(model, x, self.term, self.rec_loss, self.sigma, self.channel_polarities(x.shape[1]))


@register_predictor("grad_elbo", description="|d(-ELBO)/dx| = |d(rec + beta*KL)/dx|, Gaussian-smoothed (VAEs)")
class GradELBOPredictor(_SignedGradientPredictor):
    """map = mean_c G_sigma * r_c(d(rec(x) + beta * kl(x))/dx) (module docstring). Defaults: sigma = 2 px,
    rec_loss = "l2" (1/2 squared error), beta = the model's own `beta`, polarity = "both" (r_c = |.|).
    The rec term's gradient is the residual x - g(mu(x)) plus its pull through the model, so its sign
    says brighter (+) or darker (-) than the reconstruction: polarity "bright"/"dark"/"auto" keeps one
    direction per channel, as for the residual."""

    term = "elbo"


@register_predictor("grad_kl", description="|dKL(q(z|x) || p(z))/dx|, Gaussian-smoothed (VAEs)")
class GradKLPredictor(_GradientPredictor):
    """map = mean_c G_sigma * |d kl(x)/dx| (module docstring): how much each pixel pushes the posterior
    away from the prior. Defaults: sigma = 2 px (`rec_loss` is accepted but unused). The sign of this
    gradient says nothing about brightness, so it takes no polarity."""

    term = "kl"


@register_predictor("grad_rec", description="|d rec(x, g(mu(x)))/dx|, Gaussian-smoothed (VAEs)")
class GradRecPredictor(_SignedGradientPredictor):
    """map = mean_c G_sigma * r_c(d rec(x)/dx) with rec decoding the posterior mean (module docstring).
    Defaults: sigma = 2 px, rec_loss = "l2", polarity = "both" (see grad_elbo)."""

    term = "rec"
