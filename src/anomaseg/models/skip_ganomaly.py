"""Skip-GANomaly (Akcay et al. 2019): a U-Net generator trained adversarially against a DCGAN
discriminator that doubles as feature extractor.

Generator: a U-Net of depth log2(image_size), so the bottleneck is 1x1. Down: 4x4 stride-2 convs,
LeakyReLU(0.2) before every conv but the first, BatchNorm after every conv but the first and the
innermost; up: ReLU, 4x4 stride-2 transposed conv, BatchNorm (not on the output), each level fed
with the concatenation of the encoder's feature map at that scale (the skip) and the level below.
Filters min(base_channels * 2^i, max_channels). No output activation: our intensities lie in
[0, clip_max], not [-1, 1], so the paper's tanh is left out. No activation runs in place, so the
skip tensors stay intact for autograd.

Discriminator: DCGAN — a 4x4 stride-2 conv + LeakyReLU, then conv-BN-LeakyReLU blocks down to a
4x4 map (these are the features f(.) of the latent loss, the discriminator's penultimate layer),
then a 4x4 valid conv to one logit.

Losses (paper defaults w_adv=1, w_con=50, w_lat=1, means over pixels/features as in the paper):
    generator      w_adv * BCE(D(x_hat), 1) + w_con * |x - x_hat|_1 + w_lat * ||f(x) - f(x_hat)||_2^2
    discriminator  BCE(D(x), 1) + BCE(D(x_hat), 0)
Adam, lr 2e-4 (the run's train.lr: set by configs/skipganomaly.yaml), betas (0.5, 0.999): the betas
are a model hyper-parameter that wins over the run's `train.betas` (`betas: null` uses the run's).

One `training_step`: generator forward; discriminator update on (x, x_hat detached); generator
update against the updated discriminator (its parameters frozen meanwhile, so the graph is built
after the discriminator's in-place update — the official code's in-place autograd error cannot
happen). Real and reconstructed images always go through the discriminator in separate batches,
and only real batches move its BatchNorm running statistics (`bn_stats_frozen` around every pass
of reconstructions): in eval mode the feature extractor f(.) then normalises as for real healthy
images. Optional `input_noise`: std of Gaussian noise, freshly drawn, added to the generator's
training input (the official code meant to add noise but added an unfilled tensor); 0 by default.

Defects of the official code avoided here: model selection on the test set (our runs select on
held-out healthy cases), no eval() at test time (scoring runs the model in eval mode), the unfilled
noise tensor, the in-place autograd error. Not implemented: re-initialising the discriminator when
its loss collapses.

`loss(x, out)` (validation, best-checkpoint selection) is w_con * the contextual L1 term; the
latent term is reported as "lat" but not included: it is measured with a discriminator that keeps
changing, so it is not comparable between epochs. Anomaly scores: the `residual` predictor gives
the pixel map |x - x_hat|; the `skip_ganomaly` predictor adds the paper's image score.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from anomaseg.models.base import AnomalyModel, ModelOutput, adam
from anomaseg.models.registry import register_model
from anomaseg.models.vaegan import frozen

SLOPE = 0.2


@contextlib.contextmanager
def bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` still normalise with batch statistics (train mode) but do not
    update their running averages inside the block (momentum 0)."""
    saved = [(m, m.momentum) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation (as in the paper's code): conv weights N(0, 0.02), BN scale N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class UNetGenerator(nn.Module):
    def __init__(self, in_channels: int, image_size: int, base_channels: int, max_channels: int):
        super().__init__()
        depth = int(math.log2(image_size))
        if 2**depth != image_size or depth < 2:
            raise ValueError(f"image_size must be a power of two >= 4, got {image_size}")
        f = [min(base_channels * 2**i, max_channels) for i in range(depth)]
        downs: list[nn.Module] = [nn.Conv2d(in_channels, f[0], 4, 2, 1, bias=False)]
        for i in range(1, depth):
            innermost = i == depth - 1
            downs.append(nn.Sequential(nn.LeakyReLU(SLOPE), nn.Conv2d(f[i - 1], f[i], 4, 2, 1, bias=innermost),
                                       nn.Identity() if innermost else nn.BatchNorm2d(f[i])))
        ups: list[nn.Module] = [nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * f[0], in_channels, 4, 2, 1))]
        for i in range(1, depth):
            c_in = f[i] if i == depth - 1 else 2 * f[i]  # the innermost level has no skip to concatenate
            ups.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, f[i - 1], 4, 2, 1, bias=False),
                                     nn.BatchNorm2d(f[i - 1])))
        self.downs, self.ups = nn.ModuleList(downs), nn.ModuleList(ups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        y = self.ups[-1](skips[-1])
        for i in range(len(self.ups) - 2, -1, -1):
            y = self.ups[i](torch.cat([skips[i], y], dim=1))
        return y


class DCGANDiscriminator(nn.Module):
    def __init__(self, in_channels: int, image_size: int, base_channels: int, max_channels: int):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1, bias=False), nn.LeakyReLU(SLOPE)]
        size, c = image_size // 2, base_channels
        while size > 4:
            out = min(2 * c, max_channels)
            layers += [nn.Conv2d(c, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(SLOPE)]
            size, c = size // 2, out
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c, 1, 4, 1, 0, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate feature map f(x), (B, C, 4, 4)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B,), features f(x))."""
        feats = self.body(x)
        return self.classifier(feats).flatten(), feats


@register_model("skip_ganomaly", description="Skip-GANomaly (Akcay et al. 2019): U-Net generator + DCGAN "
                                             "discriminator, adversarial + 50*L1 + latent feature loss",
                tiny=dict(base_channels=4, max_channels=16))
class SkipGANomaly(AnomalyModel):
    # NHWC buys its convolutions nothing on a CPU (oneDNN reorders to the same blocked layouts) and
    # makes BatchNorm's backward ~5x slower at the U-Net's small maps: 1.18x vs 1.20x the official
    # step in fp32, 1.89x vs 1.91x in bf16 (benchmarks/bench_skipganomaly.py, idle 2-core CPU)
    prefers_channels_last = False

    def __init__(self, in_channels: int = 1, image_size: int = 128, base_channels: int = 64,
                 max_channels: int = 512, w_adv: float = 1.0, w_con: float = 50.0, w_lat: float = 1.0,
                 input_noise: float = 0.0, betas: tuple[float, float] | list[float] | None = (0.5, 0.999)):
        super().__init__()
        if min(w_adv, w_con, w_lat, input_noise) < 0:
            raise ValueError("loss weights and input_noise must be >= 0")
        self.in_channels = in_channels
        self.w_adv, self.w_con, self.w_lat = float(w_adv), float(w_con), float(w_lat)
        self.input_noise = float(input_noise)
        self.betas = None if betas is None else tuple(float(b) for b in betas)
        self.generator = UNetGenerator(in_channels, image_size, base_channels, max_channels)
        self.discriminator = DCGANDiscriminator(in_channels, image_size, base_channels, max_channels)
        _dcgan_init(self)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(self.generator(x))

    def discriminator_features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the discriminator's penultimate feature map (for the latent loss and score)."""
        return self.discriminator.features(x)

    def compile_targets(self) -> list[nn.Module]:
        """None: convolutions take 90% of a step at 64 px, 64/512 channels (BatchNorm and
        activations ~10%: little for inductor to fuse), and the discriminator runs in four
        autograd/BatchNorm contexts per step, each a compilation of its own."""
        return []

    def make_optimizers(self, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, torch.optim.Optimizer]:
        """Adam for generator and discriminator; the model's `betas` win over the run's."""
        betas = self.betas or tuple(betas)
        return {"generator": adam(self.generator.parameters(), lr, betas),
                "discriminator": adam(self.discriminator.parameters(), lr, betas)}

    def loss(self, x: torch.Tensor, out: ModelOutput) -> dict[str, torch.Tensor]:
        con = (out.recon.float() - x.float()).abs().mean()
        with bn_stats_frozen(self.discriminator):
            lat = (self.discriminator_features(x).float() - self.discriminator_features(out.recon).float()).pow(2).mean()
        return {"loss": self.w_con * con, "con": con, "lat": lat}

    def training_step(self, x: torch.Tensor, optimizers: dict, backward: Callable[[torch.Tensor], None],
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        opt_g, opt_d = optimizers["generator"], optimizers["discriminator"]
        d = self.discriminator
        x_in = x + self.input_noise * torch.randn_like(x) if self.input_noise > 0 else x
        with autocast():
            recon = self.generator(x_in)
            # discriminator update: real and fake in separate batches; only real batches move BN statistics
            real_logit, _ = d(x)
            with bn_stats_frozen(d):
                fake_logit, _ = d(recon.detach())
            real_logit, fake_logit = real_logit.float(), fake_logit.float()
            d_loss = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                      + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))
        opt_d.zero_grad(set_to_none=True)
        backward(d_loss)
        opt_d.step()

        with frozen(d), bn_stats_frozen(d), autocast():
            with torch.no_grad():
                real_feat = d.features(x)
            fake_logit, fake_feat = d(recon)
            fake_logit = fake_logit.float()
            adv = F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
            con = (recon.float() - x.float()).abs().mean()
            lat = (real_feat.float() - fake_feat.float()).pow(2).mean()
            g_loss = self.w_adv * adv + self.w_con * con + self.w_lat * lat
        opt_g.zero_grad(set_to_none=True)
        backward(g_loss)
        opt_g.step()
        con, lat, adv = con.detach(), lat.detach(), adv.detach()
        return {"loss": self.w_con * con, "con": con, "lat": lat, "adv": adv, "g_total": g_loss.detach(),
                "d_loss": d_loss.detach()}
