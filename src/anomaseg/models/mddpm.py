"""Masked denoising diffusion model (mDDPM; Iqbal, Khalid, Hua & Chen, "Unsupervised Anomaly Detection in
Medical Images Using Masked Diffusion Model", MLMI 2023, arXiv 2305.19867), on the pDDPM code paths of
models/ddpm.py (MONAI's DiffusionModelUNet and schedulers, the same patched noising, loss, test
step and residual map).

mDDPM is pDDPM trained on *masked* healthy slices: a few random rectangles of each training slice
are replaced by a frequency-filtered version of the slice (its low-pass or its high-pass part), and
the network, which sees the masked slice (one grid patch of it noised, the rest as it is), must
reconstruct the *clean* slice inside the noised patch. The paper names the two ingredients masked
image modelling and masked frequency modelling; at test time nothing is masked and the model is
used exactly as pDDPM.

Read: the authors' code, hasan1292/mDDPM: src/models/mDDPM.py (`get_freq_image` and the masking loop
of `training_step`; validation and test steps), src/models/modules/cond_DDPM.py (GaussianDiffusion:
p_losses with the masked input noised and the clean `orig` as target, forward), configs/model/mDDPM.yaml,
configs/experiment/mDDPM/mDDPM.yaml, README.md; the paper's abstract.

Followed (the masking of the released code, per training slice):

- One frequency-filtered copy of the slice: its 2D Fourier transform, a centred square of
  half-width v (v uniform in 2..10 frequency indices, inclusive) kept (low-pass) or removed
  (high-pass), each with probability 1/2, back-transformed (real part).
- 0 to 5 rectangles (uniform, inclusive), each of a height and width uniform in [L // 2, L] pixels,
  L = int(0.18 x the brain's height in rows), its corner uniform over the brain's bounding box less a
  margin of 5 px (of the code's 96 px slices; scaled to the slice size here) at the start and
  5 + L at the end; inside each rectangle the slice is replaced by the filtered copy, then
  everything outside the brain is set to 0.
- The masked slice is what the pDDPM step sees: one random grid patch of it noised to a random step,
  the rest of it as it is; the target is the clean slice; L1 of the x0-prediction inside the patch.
  Validation (as the code's validation step) and test time are unmasked pDDPM; test: the grid of
  patches each noised to t = 500 with the rest clean, one x0-prediction each, stitched.
- The pDDPM sizes of the experiment (patch = half the slice side, 2 x 2 grid, T = 1000 cosine,
  x0, L1; the paper's U-Net in configs/iqbal2023_mddpm_paper.yaml).

Not followed, and why:

- The brain is the slice's nonzero pixels (any channel; the training loop hands the model slices,
  not masks); the code multiplies by the dataset's brain mask. Where the brain is too small for the
  code's margins (its random draw would fail), the corner is the first allowed pixel.
- Several channels: the same rectangles in every channel, each channel filtered with the same v.
- The loss counts the error inside the noised patch only; the code's L1 also averages the masked
  slice's constant error outside the patch (no gradient: the same training, a different number).
- Python's `random` of the code is torch's generator here (re-seeded per step by the training loop,
  so a resumed run masks what the uninterrupted one masked).
- As for pDDPM (models/ddpm.py): Gaussian instead of the code's simplex noise; MONAI's U-Net, fp32
  or bf16; training length sized for a CPU in configs/iqbal2023_mddpm.yaml.
"""

from __future__ import annotations

import torch

from anomaseg.models.ddpm import PatchedDDPM
from anomaseg.models.registry import register_model

CODE_SLICE = 96  # the side of the code's training slices, to which its pixel margins belong


def randint(low: int, high: int, generator: torch.Generator | None = None) -> int:
    """Uniform integer in [low, high], both inclusive (Python's random.randint), from torch's generator."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def frequency_filtered(x: torch.Tensor, half_width: torch.Tensor, low_pass: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) with, per slice, the centred square of its spectrum of `half_width` (B,) kept
    (`low_pass`, B bool) or removed: the real part of the inverse transform."""
    b, _, h, w = x.shape
    fy = torch.arange(h, device=x.device).view(1, h, 1) - h // 2
    fx = torch.arange(w, device=x.device).view(1, 1, w) - w // 2
    v = half_width.view(b, 1, 1).to(x.device)
    square = (fy >= -v) & (fy < v) & (fx >= -v) & (fx < v)  # in fftshift order: [c - v, c + v)
    keep = torch.where(low_pass.view(b, 1, 1).to(x.device), square, ~square)
    spectrum = torch.fft.fft2(x.float()) * torch.fft.ifftshift(keep, dim=(-2, -1)).unsqueeze(1)
    return torch.fft.ifft2(spectrum).real


@register_model("mddpm", description="Masked DDPM (Iqbal et al. 2023): pDDPM trained on slices whose random "
                                     "rectangles hold their low- or high-pass filtered copy; target the clean slice",
                tiny=dict(channels=(8, 16), num_res_blocks=1, norm_num_groups=4, num_head_channels=16,
                          patch_size=16))
class MaskedDDPM(PatchedDDPM):
    def __init__(self, in_channels: int = 1, image_size: int = 64, *args, max_masks: int = 5,
                 mask_size: float = 0.18, frequency_band: tuple[int, int] = (2, 10), **kwargs):
        super().__init__(in_channels, image_size, *args, **kwargs)
        low, high = (int(v) for v in frequency_band)
        if max_masks < 0 or not 0 < mask_size <= 1 or not 1 <= low <= high:
            raise ValueError(f"max_masks must be >= 0, mask_size in (0, 1] and frequency_band (low, high) with "
                             f"1 <= low <= high; got {max_masks}, {mask_size}, {tuple(frequency_band)}")
        self.max_masks, self.mask_size, self.frequency_band = int(max_masks), float(mask_size), (low, high)

    def mask_slices(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The masked copy of the healthy slices x (B, C, H, W in [0, 1] scale): see the module docstring."""
        b, _, h, w = x.shape
        low, high = self.frequency_band
        half_width = torch.randint(low, high + 1, (b,), generator=generator)
        low_pass = torch.randint(0, 2, (b,), generator=generator).bool()
        filtered = frequency_filtered(x, half_width, low_pass).to(x.dtype)
        margin = round(5 * h / CODE_SLICE)
        out = x.clone()
        for i in range(b):
            brain = (x[i] != 0).any(0)
            count = randint(0, self.max_masks, generator)
            rows, cols = brain.any(1).nonzero().flatten(), brain.any(0).nonzero().flatten()
            if count == 0 or len(rows) == 0:
                continue
            longest = int(len(rows) * self.mask_size)
            shortest = longest // 2
            for _ in range(count):
                height, width = randint(shortest, longest, generator), randint(shortest, longest, generator)
                top = randint(int(rows[0]), max(int(rows[0]), int(rows[-1]) - 2 * margin - longest), generator)
                left = randint(int(cols[0]), max(int(cols[0]), int(cols[-1]) - 2 * margin - longest), generator)
                top, left = top + margin, left + margin
                out[i, :, top:top + height, left:left + width] = filtered[i, :, top:top + height, left:left + width]
            out[i] = out[i] * brain
        return out

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_slices(x)
