"""Denoising autoencoder (Kascenas, Pugeault & O'Neil, MIDL 2022, "Denoising autoencoders for
unsupervised anomaly detection in brain MRI").

A U-Net is trained on healthy slices to remove *coarse* noise: Gaussian noise drawn on a
low-resolution grid and upsampled, so that it looks like a smooth blob of wrong intensity, the
scale of a lesion, rather than pixel noise (which a U-Net removes with its skip connections alone
and so learns nothing about anatomy). At test time the clean image goes in and the anomaly map
is the residual |x - recon(x)| (the `residual` predictor: mean over channels), followed by the
usual post-processing (median filter, eroded brain mask).

Facts from the paper and its public code (AntanasKascenas/DenoisingAE), and what we do:

- U-Net of `depth` 4 levels with 2^wf = 64 filters doubling per level (64, 128, 256, 512); each
  level two 3x3 convs with reflection padding, weight standardisation, Swish (SiLU), then
  GroupNorm (activation before the norm, as in their code; groups: the middle divisor of the
  channel count, e.g. 8 for 64 channels); 2x2 average pooling down, 2x2 stride-2 transposed conv
  up, skip connections by concatenation, a 1x1 conv to `in_channels` outputs, no output activation.
- Noise: N(0, 0.2) on a 16 x 16 grid per sample and channel, bilinearly upsampled to the image
  (128 px in the paper), randomly translated, and multiplied by the foreground mask (channel
  sum > 0.01), so the background stays clean. `noise_std` is the std at the grid's nodes: after
  bilinear upsampling the pixel std is about 2/3 of it. `noise_res` counts grid cells across the
  image whatever `image_size` (at 64 px a cell is 4 px): the noise keeps its size relative to the
  brain, which our slices crop to.
  Translation: the paper rolls the upsampled field circularly (a seam where it wraps); we upsample
  a grid one cell larger on each side and crop at a random sub-cell offset (no seam).
- Loss: squared error to the *clean* image, inside the foreground, averaged over all pixels.
- Optimiser: Adam with amsgrad, weight decay 1e-5, lr 1e-4, batch 16, gradient norm clipped at
  0.5; the paper's learning rate follows a cosine of period 100 epochs of 32 batches, restarted,
  over 2100 such epochs; our loop decays once over the run (configs/kascenas2022_dae.yaml).
- Input: the paper's slices are BraTS 2021 (FLAIR, T1, T1ce, T2) at 128 px, each modality divided
  by its 99th brain percentile. Ours scale the 1st/99th percentiles to 0/1: the same range, so the
  noise std keeps its meaning.

Validation (`validation_losses`): the denoising loss with noise from a fixed seed (the same
fields for every validation batch and epoch), so the best checkpoint is chosen on the training
objective measured on held-out cases, and the number is reproducible. The reconstruction error of
the clean input (what the anomaly map is made of) is reported beside it as "clean", but not used
for selection: a network that copies its input minimises it and detects nothing.

Gradient clipping runs inside `training_step` on unscaled gradients; under fp16 autocast with a
loss scaler (`--precision 16`, GPU only) the gradients are scaled, so clipping is skipped there.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from anomaseg.models.base import AnomalyModel, ModelOutput
from anomaseg.models.registry import register_model

VALIDATION_SEED = 1234


def norm_groups(channels: int) -> int:
    """GroupNorm groups as in the paper's code: the middle divisor of `channels` (64 -> 8, 128 -> 16)."""
    divisors = sorted(d for d in range(1, channels + 1) if channels % d == 0)
    return divisors[len(divisors) // 2]


def coarse_noise(shape: tuple[int, int, int, int], resolution: int, std: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Smooth Gaussian noise (B, C, H, W) on the CPU: N(0, std) values on a grid of `resolution`
    cells across the image (cells of round(H / resolution) pixels), bilinearly interpolated
    between the cells' centres, shifted by a random sub-cell offset (one per call)."""
    b, c, h, w = shape
    cell = max(1, round(h / resolution))
    nodes = (math.ceil(h / cell) + 2, math.ceil(w / cell) + 2)  # one spare cell on each side
    grid = torch.randn((b, c) + nodes, generator=generator) * std
    # align_corners=False with an integer scale puts node k at the centre of pixels k*cell..(k+1)*cell
    field = F.interpolate(grid, scale_factor=cell, mode="bilinear", align_corners=False)
    dy, dx = (int(v) for v in torch.randint(0, cell, (2,), generator=generator))
    top = cell // 2 + dy  # skip the half cell of constant extrapolation at the border
    left = cell // 2 + dx
    return field[:, :, top:top + h, left:left + w]


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019): each filter's weights are centred and
    scaled to unit std before use (the paper's U-Net pairs it with GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def conv_block(c_in: int, c_out: int, standardise: bool) -> nn.Sequential:
    """Two 3x3 convs (reflection padding), each followed by Swish and GroupNorm."""
    conv = WSConv2d if standardise else nn.Conv2d
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_out), (c_out, c_out)):
        layers += [conv(a, b, 3, padding=1, padding_mode="reflect"), nn.SiLU(), nn.GroupNorm(norm_groups(b), b)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """The paper's U-Net: `depth` levels of `base_channels * 2^i` filters, average-pool down,
    transposed-conv up, skips concatenated; output has `out_channels` maps at the input size."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 4, base_channels: int = 64,
                 weight_standardization: bool = True):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        c = in_channels
        for wd in widths:
            self.down.append(conv_block(c, wd, weight_standardization))
            c = wd
        self.up, self.merge = nn.ModuleList(), nn.ModuleList()
        for wd in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, wd, 2, stride=2))
            self.merge.append(conv_block(2 * wd, wd, weight_standardization))
            c = wd
        self.head = nn.Conv2d(c, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


@register_model("dae", description="Denoising autoencoder (Kascenas et al. 2022): U-Net trained to remove "
                                   "coarse (16x16-grid) Gaussian noise from healthy slices, L2 loss",
                tiny=dict(depth=3, base_channels=4))
class DenoisingAE(AnomalyModel):
    def __init__(self, in_channels: int = 1, image_size: int = 128, depth: int = 4, base_channels: int = 64,
                 noise_std: float = 0.2, noise_res: int = 16, foreground_threshold: float = 0.01,
                 weight_standardization: bool = True, weight_decay: float = 1e-5, amsgrad: bool = True,
                 grad_clip: float | None = 0.5):
        super().__init__()
        if depth < 1 or image_size % 2 ** (depth - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2**(depth - 1) = {2 ** (depth - 1)}")
        if noise_std < 0 or noise_res < 1:
            raise ValueError(f"noise_std must be >= 0 and noise_res >= 1, got {noise_std}, {noise_res}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        self.in_channels = in_channels
        self.noise_std, self.noise_res = float(noise_std), int(noise_res)
        self.foreground_threshold = float(foreground_threshold)
        self.weight_decay, self.amsgrad = float(weight_decay), bool(amsgrad)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.unet = UNet(in_channels, in_channels, depth, base_channels, weight_standardization)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """The denoised reconstruction of `x` (for scoring: of the clean input)."""
        return ModelOutput(self.unet(x))

    def foreground(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool: pixels whose channel sum exceeds `foreground_threshold` (the head)."""
        return x.float().sum(dim=1, keepdim=True) > self.foreground_threshold

    def add_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x plus coarse noise inside its foreground (float32)."""
        noise = coarse_noise(tuple(x.shape), self.noise_res, self.noise_std, generator).to(x.device)
        noisy = x.float() + noise * self.foreground(x)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        return noisy

    def loss(self, x: torch.Tensor, out: ModelOutput) -> dict[str, torch.Tensor]:
        """Squared error of the reconstruction against the clean `x`, foreground only, mean over pixels."""
        rec = ((out.recon.float() - x.float()).pow(2) * self.foreground(x)).mean()
        return {"loss": rec, "rec": rec}

    def make_optimizers(self, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, torch.optim.Optimizer]:
        return {"model": torch.optim.Adam(self.parameters(), lr=lr, betas=tuple(betas), amsgrad=self.amsgrad,
                                          weight_decay=self.weight_decay)}

    def training_step(self, x: torch.Tensor, optimizers: dict, backward: Callable[[torch.Tensor], None],
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """Adds coarse noise to the healthy batch `x`, trains towards the clean `x` (see the module
        docstring); returns the loss terms as detached tensors, as `AnomalyModel.training_step`."""
        opt = optimizers["model"]
        noisy = self.add_noise(x)
        with autocast():
            scaled_grads = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16
            losses = self.loss(x, self(noisy))
        opt.zero_grad(set_to_none=True)
        backward(losses["loss"])
        if self.grad_clip is not None and not scaled_grads:
            nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip)
        opt.step()
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def validation_losses(self, x: torch.Tensor) -> dict[str, float]:
        """Denoising loss with fixed-seed noise (deterministic; see the module docstring), plus
        "clean": the same error for the clean input."""
        noisy = self.add_noise(x, torch.Generator().manual_seed(VALIDATION_SEED))
        losses = {k: float(v) for k, v in self.loss(x, self(noisy)).items()}
        losses["clean"] = float(self.loss(x, self(x))["loss"])
        return losses
