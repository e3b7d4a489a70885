"""AnoVAEGAN (Baur et al. 2018): a spatial VAE whose reconstructions are also judged by a discriminator.

Generator: the spatial VAE of `autoencoders.py`, unchanged (same encoder/decoder blocks, Gaussian
latent maps, eval mode decodes the posterior mean). Discriminator: the same 5x5 stride-2 encoder
family followed by a dense layer giving one logit/score per image, with per-sample LayerNorm
(GroupNorm with one group: normalises over C, H, W of each image) instead of BatchNorm, as in the
comparative study's critic. Normalising each image on its own matters twice: the WGAN gradient
penalty is a per-sample quantity that batch statistics would couple across the batch, and the
discriminator sees only-real and only-fake batches, which BatchNorm would tell apart by their
batch statistics alone.

Generator objective: L1 reconstruction (summed over pixels) + `beta` * KL + `adv_weight` * the
adversarial term. VAE and discriminator are optimised in alternation, each with its own Adam
(`make_optimizers` returns both; `training_step` does the alternation):

1. the generator reconstructs the batch (one forward pass, train mode);
2. `d_steps` discriminator updates on (batch, detached reconstruction) — with several steps the
   same batch is reused, as in the reference code (StefanDenn3r/Unsupervised_Anomaly_Detection_Brain_MRI,
   trainers/AnoVAEGAN.py, d_iters=5);
3. one generator update against the *updated* discriminator (its parameters frozen meanwhile).

Two adversarial objectives (`adversarial`):

- "gan" (default): the standard GAN of the 2018 paper, discriminator trained with binary
  cross-entropy on real (1) and reconstructed (0) images, generator with the non-saturating
  BCE(D(x_hat), 1); one discriminator step per generator step.
- "wgan_gp": the comparative study's critic: Wasserstein loss D(x_hat) - D(x) plus
  `gp_weight` (10) * (||grad D(x_mix)||_2 - 1)^2, the gradient norm taken per sample over all
  pixels and channels at random interpolates x_mix, in float32 with autocast off;
  generator term -D(x_hat); 5 critic steps per generator step.

Why "gan" is the default: it is the objective of the paper this preset reproduces, and it costs
one discriminator update without double back-propagation per step instead of five with it — the
WGAN-GP variant trains about 5x slower per batch (CPU, 64 px). The adversarial term is a regulariser
next to the pixel-summed L1 term, so WGAN-GP's extra stability buys little here; it stays one
`--set model.params.adversarial=wgan_gp` away (preset configs/baur2020_anovaegan_wgan_gp.yaml).

Adam betas are a model hyper-parameter (`betas`, default (0.5, 0.9) as in the reference code) and
win over the run's `train.betas`; pass `betas: null` to use the run's. The learning rate is the
run's `train.lr` (the presets set the reference code's 1e-4).

`loss(x, out)` (validation, best-checkpoint selection, gradient predictors) is the VAE's own
objective, rec + beta * KL: the adversarial terms are measured against a discriminator that keeps
changing, so they are not comparable between epochs. Training logs report them separately
("adv", "d_loss", "gp").
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from anomaseg.models.autoencoders import SpatialVAE
from anomaseg.models.base import adam
from anomaseg.models.blocks import conv_encoder, encoder_channels
from anomaseg.models.registry import register_model

ADVERSARIAL = ("gan", "wgan_gp")
_DEFAULT_D_STEPS = {"gan": 1, "wgan_gp": 5}


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of `module` need no gradient inside the block (the other network's update)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Discriminator(nn.Module):
    """The encoder family of Baur et al. with per-sample LayerNorm, then a dense output: one
    logit per image. `features(x)` is the last feature map (before the dense layer)."""

    def __init__(self, in_channels: int, image_size: int, depth: int, base_channels: int, max_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for m in conv_encoder(in_channels, depth, base_channels, max_channels, norm=False):
            layers.append(m)
            if isinstance(m, nn.Conv2d):  # conv -> LayerNorm -> LeakyReLU
                layers.append(nn.GroupNorm(1, m.out_channels))
        self.body = nn.Sequential(*layers)
        top = encoder_channels(depth, base_channels, max_channels)[-1]
        side = image_size // 2**depth
        self.head = nn.Linear(top * side * side, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).squeeze(1)


@register_model("anovaegan", description="AnoVAEGAN (Baur et al. 2018): spatial VAE + discriminator, "
                                         "L1 + beta*KL + adversarial, alternating updates (GAN or WGAN-GP)",
                tiny=dict(base_channels=8, max_channels=16, depth=3, latent_channels=4))
class AnoVAEGAN(SpatialVAE):
    DEFAULT_BETA = 1.0  # the paper's; the study of the defaults did not cover the GANs

    def __init__(self, in_channels: int = 1, image_size: int = 128, depth: int = 4, base_channels: int = 32,
                 max_channels: int = 128, adversarial: str = "gan", adv_weight: float = 1.0,
                 d_steps: int | None = None, gp_weight: float = 10.0,
                 betas: tuple[float, float] | list[float] | None = (0.5, 0.9), **vae_params):
        vae_params.setdefault("beta", self.DEFAULT_BETA)
        super().__init__(in_channels=in_channels, image_size=image_size, depth=depth,
                         base_channels=base_channels, max_channels=max_channels, **vae_params)
        if adversarial not in ADVERSARIAL:
            raise ValueError(f"adversarial must be one of {ADVERSARIAL}, got {adversarial!r}")
        if adv_weight < 0 or gp_weight < 0:
            raise ValueError("adv_weight and gp_weight must be >= 0")
        self.adversarial = adversarial
        self.adv_weight = float(adv_weight)
        self.d_steps = int(_DEFAULT_D_STEPS[adversarial] if d_steps is None else d_steps)
        if self.d_steps < 1:
            raise ValueError(f"d_steps must be >= 1, got {d_steps}")
        self.gp_weight = float(gp_weight)
        self.betas = None if betas is None else tuple(float(b) for b in betas)
        self.discriminator = Discriminator(in_channels, image_size, depth, base_channels, max_channels)

    # ----------------------------------------------------------------------------- parts
    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("discriminator.")]

    def discriminator_features(self, x: torch.Tensor) -> torch.Tensor:
        """Discriminator feature map of `x` (for the latent/feature predictors)."""
        return self.discriminator.features(x)

    def make_optimizers(self, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, torch.optim.Optimizer]:
        """Adam for the VAE and for the discriminator; the model's `betas` win over the run's."""
        betas = self.betas or tuple(betas)
        return {"generator": adam(self.generator_parameters(), lr, betas),
                "discriminator": adam(self.discriminator.parameters(), lr, betas)}

    # ----------------------------------------------------------------------------- losses
    def gradient_penalty(self, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """WGAN-GP: mean over the batch of (||d D(x_mix) / d x_mix||_2 - 1)^2, the norm of each
        sample's gradient over all its channels and pixels; always float32, autocast off."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, fake = x.float(), fake.float()
            alpha = torch.rand(x.shape[0], 1, 1, 1, device=x.device)
            mix = (x + alpha * (fake - x)).requires_grad_(True)
            # per-sample normalisation only: sample i's score depends on sample i alone, so the
            # gradient of the summed scores w.r.t. mix[i] is the gradient of D(mix[i])
            (grad,) = torch.autograd.grad(self.discriminator(mix).sum(), mix, create_graph=True)
            return (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()

    def discriminator_loss(self, x: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        real_score, fake_score = self.discriminator(x).float(), self.discriminator(fake).float()
        if self.adversarial == "gan":
            loss = (F.binary_cross_entropy_with_logits(real_score, torch.ones_like(real_score))
                    + F.binary_cross_entropy_with_logits(fake_score, torch.zeros_like(fake_score)))
            return {"d_loss": loss}
        gp = self.gradient_penalty(x, fake)
        return {"d_loss": fake_score.mean() - real_score.mean() + self.gp_weight * gp, "gp": gp}

    def adversarial_loss(self, recon: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial term for its reconstructions."""
        score = self.discriminator(recon).float()
        if self.adversarial == "gan":
            return F.binary_cross_entropy_with_logits(score, torch.ones_like(score))  # non-saturating
        return -score.mean()

    # ----------------------------------------------------------------------------- training
    def training_step(self, x: torch.Tensor, optimizers: dict, backward: Callable[[torch.Tensor], None],
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        opt_g, opt_d = optimizers["generator"], optimizers["discriminator"]
        with autocast():
            out = self(x)
        fake = out.recon.detach()
        d_sums: dict[str, torch.Tensor] = {}
        for _ in range(self.d_steps):
            with autocast():
                d_terms = self.discriminator_loss(x, fake)
            opt_d.zero_grad(set_to_none=True)
            backward(d_terms["d_loss"])
            opt_d.step()
            for k, v in d_terms.items():
                d_sums[k] = d_sums.get(k, 0.0) + v.detach()
        with frozen(self.discriminator), autocast():
            terms = self.loss(x, out)
            adv = self.adversarial_loss(out.recon)
            total = terms["loss"] + self.adv_weight * adv
        opt_g.zero_grad(set_to_none=True)
        backward(total)
        opt_g.step()
        logs = {k: v.detach() for k, v in terms.items()}
        logs.update(adv=adv.detach(), g_total=total.detach(),
                    **{k: v / self.d_steps for k, v in d_sums.items()})
        return logs
