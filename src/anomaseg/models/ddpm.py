"""Patched denoising diffusion model (pDDPM; Behrendt, Bhattacharya, Krüger, Opfer & Schlaefer, MIDL 2023,
"Patched Diffusion Models for Unsupervised Anomaly Detection in Brain MRI"), on MONAI's diffusion stack.

A diffusion U-Net (`monai.networks.nets.DiffusionModelUNet`) learns to reconstruct healthy slices from
slices in which one patch was noised to a random diffusion step (the rest of the slice stays clean: the
network sees the spatial context of the patch). At test time the slice is cut into a grid of patches;
each patch is noised to a partial step `t_test` with the rest of the slice clean, reconstructed, and
the reconstructed patches are stitched into one reconstruction. The anomaly map is the residual of
that reconstruction (the `residual` predictor, signed by modality), so `forward(x)` returns it.

Followed, from the paper and its public code (FinnBehrendt/patched-Diffusion-Models-UAD, the MIDL23
`DDPM_patched` experiment):

- T = 1000 training steps, the cosine noise schedule (Nichol & Dhariwal; MONAI's "cosine"), images
  mapped from [0, 1] to [-1, 1] inside the model.
- Objective: the network predicts x0 (the clean slice) directly; L1 loss; the loss counts only the
  noised patch (the code's "inpaint" mode: outside the patch the output is replaced by the input),
  averaged over all pixels of the slice.
- Training patches: per slice one patch of the test grid, drawn at random ("grid_boxes"); patch 48 px
  of a 96 px slice (half the side), stride = patch size, so 2 x 2 patches.
- Test: noise to step 500 (the code passes timestep index `t_test - 1` = 499), one x0-prediction per
  patch, patches stitched without overlap. `patch_stride` < `patch_size` gives overlapping patches,
  averaged where they overlap (the code's "avg" option).
- U-Net of the paper's preset: 128 base channels, multipliers (1, 2, 2), 3 residual blocks per level,
  residual blocks for up/down-sampling, 64 channels per attention head, no attention in the levels
  (the code asks for attention at downsampling rates 6, 12, 24, which a 3-level U-Net never reaches;
  the middle block has one), GroupNorm of 32 groups, dropout 0. Adam, lr 1e-4, batch 32.

Not followed, and why:

- Noise: the code's MIDL23 experiments draw *simplex* noise (from AnoDDPM, Wyatt et al. 2022; one
  field per batch); here the noise is Gaussian, as in the DDPM the schedulers implement. Simplex noise
  is not in MONAI and was not written by hand here.
- The U-Net is MONAI's, not OpenAI's: its residual blocks add the time embedding (OpenAI's scale-shift
  norm is not offered), fp32 rather than the code's fp16.
- Training length: the code trains 1600 epochs on IXI T2; `configs/behrendt2023_pddpm.yaml` is sized
  for a 2-core CPU (its `paper` preset: `configs/behrendt2023_pddpm_paper.yaml`).
- `DiffusionInferer` is not used: it noises the whole slice, pDDPM noises one patch of it; the noising
  is the scheduler's `add_noise`, the x0 of an epsilon-predicting network and the DDIM steps are
  `DDIMScheduler.step`.

Options beyond the paper's default (off by default):

- `objective="epsilon"`: the network predicts the noise (x0 follows from the scheduler).
- `ddim_steps=N`: N deterministic DDIM steps (eta 0) from `t_test` to 0 per patch instead of one
  x0-prediction; at every step the rest of the slice is clean.
- `ensemble=K`: K noise draws, their stitched reconstructions averaged (the "noise ensemble" of the
  issue; the paper's code uses one draw).
- `step_ensemble=(t1, t2, ...)`: reconstructions from several test steps (each from its own noise
  draw) averaged, in place of `t_test` (the cDDPM code's `noise_ensemble`: 250, 500, 750).
- `patch_size=image_size`: one patch, the whole slice noised: the paper's plain DDPM baseline.

The conditioned and masked variants of the same group build on this class: `cddpm`
(models/cddpm.py: the denoiser conditioned on an encoder's latent of the clean slice, through
`condition` / `denoise`) and `mddpm` (models/mddpm.py: training slices masked in image and
frequency space, through `training_input`).

Determinism: the test-time noise fields (one per test step and ensemble member) are drawn once, when
the model is built, from a generator seeded with `noise_seed` (a non-persistent buffer, so an exported
graph holds them as constants), and one field serves every slice of a batch, so a slice's reconstruction does not
depend on the batch it is scored in. Training draws timesteps, patches and noise from torch's global
generators, which the training loop re-seeds per step (`seeding.seed_phase`), so a resumed run draws
what the uninterrupted one drew.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch

from anomaseg.models.base import AnomalyModel, ModelOutput
from anomaseg.models.registry import register_model

VALIDATION_SEED = 1234
OBJECTIVES = {"x0": "sample", "epsilon": "epsilon"}  # ours -> MONAI's prediction_type


def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets of patches of `patch` pixels covering `size` pixels with about `stride` between
    them: the first at 0, the last at size - patch, evenly spread (the paper's grid when stride
    divides size)."""
    n = math.ceil((size - patch) / stride) + 1
    if n == 1:
        return [0]
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


@register_model("pddpm", description="Patched DDPM (Behrendt et al. 2023): MONAI diffusion U-Net; each patch "
                                     "noised to t=500 with the rest clean, reconstructed, stitched; L1, x0",
                tiny=dict(channels=(8, 16), num_res_blocks=1, norm_num_groups=4, num_head_channels=16,
                          patch_size=16))
class PatchedDDPM(AnomalyModel):
    # NCHW: under bf16 autocast (what `--precision auto` picks on a CPU with bf16 units) a training
    # step is 1.7x faster than in NHWC (benchmarks/bench_pddpm.py; benchmarks/README.md, "pDDPM")
    prefers_channels_last = False

    def __init__(self, in_channels: int = 1, image_size: int = 64, channels: tuple[int, ...] = (32, 64, 64),
                 num_res_blocks: int = 1, norm_num_groups: int = 32, num_head_channels: int = 64,
                 resblock_updown: bool = True, num_train_timesteps: int = 1000, schedule: str = "cosine",
                 objective: str = "x0", loss_type: str = "l1", t_test: int = 500,
                 patch_size: int | None = None, patch_stride: int | None = None, train_patches: bool = True,
                 ddim_steps: int = 0, ensemble: int = 1, step_ensemble: tuple[int, ...] = (), noise_seed: int = 0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if image_size % 2 ** (len(channels) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2**(levels - 1) = "
                             f"{2 ** (len(channels) - 1)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        test_steps = tuple(int(t) for t in step_ensemble) or (int(t_test),)
        if not all(1 <= t <= num_train_timesteps for t in test_steps):
            raise ValueError(f"t_test and step_ensemble must be in [1, {num_train_timesteps}], got {test_steps}")
        patch_size = image_size // 2 if patch_size is None else int(patch_size)
        patch_stride = patch_size if patch_stride is None else int(patch_stride)
        if not 1 <= patch_size <= image_size or patch_stride < 1:
            raise ValueError(f"patch_size must be in [1, image_size={image_size}] and patch_stride >= 1, "
                             f"got {patch_size}, {patch_stride}")
        if ddim_steps < 0 or ensemble < 1:
            raise ValueError(f"ddim_steps must be >= 0 and ensemble >= 1, got {ddim_steps}, {ensemble}")
        self.in_channels = in_channels
        self.image_size = int(image_size)
        self.objective, self.loss_type = objective, loss_type
        self.t_test, self.ddim_steps, self.ensemble = int(t_test), int(ddim_steps), int(ensemble)
        self.test_steps = test_steps  # the steps whose reconstructions are averaged (t_test alone by default)
        self.patch_size, self.patch_stride, self.train_patches = patch_size, patch_stride, bool(train_patches)
        self.noise_seed = int(noise_seed)
        # imported here: MONAI's networks take seconds to import, which every command that lists or
        # builds another model would otherwise pay (the registry imports this module)
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

        self.unet = DiffusionModelUNet(spatial_dims=2, in_channels=in_channels, out_channels=in_channels,
                                       channels=channels, attention_levels=(False,) * len(channels),
                                       num_res_blocks=num_res_blocks, norm_num_groups=norm_num_groups,
                                       num_head_channels=num_head_channels, resblock_updown=resblock_updown)
        # the schedulers hold no parameters or buffers: nothing of them goes into a checkpoint
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule,
                                       prediction_type=OBJECTIVES[objective], clip_sample=False)
        self.ddim = DDIMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule,
                                  prediction_type=OBJECTIVES[objective], clip_sample=False)
        self.num_train_timesteps = int(num_train_timesteps)
        # the test-time noise fields (one per test step and ensemble member) and patch masks at the
        # model's size, made once from `noise_seed` (not saved: rebuilt identically with the model);
        # constants to a traced or exported graph
        generator = torch.Generator().manual_seed(self.noise_seed)
        size = (self.draws, in_channels, self.image_size, self.image_size)
        self.register_buffer("test_noise", torch.randn(size, generator=generator), persistent=False)
        self.register_buffer("test_masks", self.patch_masks(self.image_size, self.image_size), persistent=False)

    @property
    def draws(self) -> int:
        """Noise fields per reconstruction: one per test step and ensemble member."""
        return len(self.test_steps) * self.ensemble

    # -- patches ----------------------------------------------------------------------------------

    def patch_masks(self, height: int, width: int, device=None) -> torch.Tensor:
        """(K, 1, H, W) bool: the test grid's K patches."""
        ys = patch_starts(height, min(self.patch_size, height), self.patch_stride)
        xs = patch_starts(width, min(self.patch_size, width), self.patch_stride)
        masks = torch.zeros(len(ys) * len(xs), 1, height, width, dtype=torch.bool, device=device)
        for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
            masks[k, :, y:y + self.patch_size, x:x + self.patch_size] = True
        return masks

    # -- the diffusion steps ----------------------------------------------------------------------

    def condition(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the denoiser is conditioned on, from the clean slices x (B, C, H, W in [0, 1] scale):
        nothing here (cDDPM: an encoder's latent)."""
        return None

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The U-Net's output for noised slices at timesteps t, given the condition of their clean slices."""
        return self.unet(sample, t) if cond is None else self.unet(sample, t, class_labels=cond)

    def x0_estimate(self, model_input: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from the network's output at timesteps t (B,): the output itself for x0-prediction."""
        if self.objective == "x0":
            return out
        a = self.scheduler.alphas_cumprod.to(model_input.device)[t].view(-1, 1, 1, 1)
        return (model_input - (1 - a).sqrt() * out) / a.sqrt()

    def denoise_patches(self, x0: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor, t_test: int,
                        cond: torch.Tensor | None = None) -> torch.Tensor:
        """(K, B, C, H, W): for each of the K patch masks, the slices x0 (B, C, H, W; in [-1, 1]) with
        that patch noised to step `t_test` (rest clean) and reconstructed, by one x0-prediction or by
        `ddim_steps` DDIM steps, the denoiser given `cond` (B, ...) of each slice. All K * B slices go
        through the U-Net as one batch."""
        k, (b, c, h, w) = len(masks), x0.shape
        clean = x0.unsqueeze(0).expand(k, b, c, h, w).reshape(k * b, c, h, w)
        inside = masks.unsqueeze(1).expand(k, b, 1, h, w).reshape(k * b, 1, h, w)
        cond = None if cond is None else cond.repeat(k, *([1] * (cond.dim() - 1)))
        start = t_test - 1
        t = torch.full((k * b,), start, dtype=torch.long, device=x0.device)
        noisy = self.scheduler.add_noise(clean, noise.expand(k, b, c, h, w).reshape(k * b, c, h, w), t)
        sample = torch.where(inside, noisy, clean)
        if self.ddim_steps == 0:
            return self.x0_estimate(sample, self.denoise(sample, t, cond).float(), t).view(k, b, c, h, w)
        # DDIM from `start` to 0 in about `ddim_steps` equal jumps (MONAI's step jumps by T // n)
        self.ddim.set_timesteps(max(1, min(self.num_train_timesteps,
                                           round(self.ddim_steps * self.num_train_timesteps / t_test))))
        jump = self.num_train_timesteps // self.ddim.num_inference_steps
        for step in range(start, -1, -jump):
            model_input = torch.where(inside, sample, clean)
            out = self.denoise(model_input, torch.full_like(t, step), cond).float()
            sample, _ = self.ddim.step(out, step, model_input)
        return torch.where(inside, sample, clean).view(k, b, c, h, w)

    def reconstruct_patched(self, x: torch.Tensor) -> torch.Tensor:
        """The stitched reconstruction of x (B, C, H, W in [0, 1] scale), float32, averaged over the
        test steps, the `ensemble` noise draws of each, and overlapping patches."""
        x0 = x.float() * 2 - 1
        noise, masks = self.test_noise, self.test_masks
        if tuple(x.shape[-2:]) != tuple(masks.shape[-2:]):  # another size than the model's: the same draws
            c, h, w = x.shape[1:]
            generator = torch.Generator().manual_seed(self.noise_seed)
            noise = torch.randn((self.draws, c, h, w), generator=generator).to(x.device)
            masks = self.patch_masks(h, w, x.device)
        cover = masks.sum(0).float()  # (1, H, W) patches per pixel
        cond = self.condition(x)
        total = torch.zeros_like(x0)
        for i in range(self.draws):
            rec = self.denoise_patches(x0, noise[i:i + 1].float(), masks, self.test_steps[i // self.ensemble], cond)
            total = total + (rec * masks.unsqueeze(1)).sum(0)
        return (total / (cover * self.draws) + 1) / 2

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """The stitched patch-wise reconstruction (deterministic; see the module docstring)."""
        return ModelOutput(self.reconstruct_patched(x).to(x.dtype))

    # -- training ---------------------------------------------------------------------------------

    def error(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = out.float() - target.float()
        return d.abs() if self.loss_type == "l1" else d.pow(2)

    def loss(self, x: torch.Tensor, out: ModelOutput) -> dict[str, torch.Tensor]:
        """Reconstruction error of a forward pass (the stitched reconstruction) against x."""
        rec = self.error(out.recon, x).mean()
        return {"loss": rec, "rec": rec}

    def training_input(self, x: torch.Tensor) -> torch.Tensor:
        """The slices the network sees in training in place of the healthy batch x (noised inside
        the patch, as they are elsewhere); the target stays x. Here x itself (mDDPM: x masked)."""
        return x

    def diffusion_loss(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                       seen: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective on the healthy batch x: per slice a random timestep and (with
        `train_patches`) one random patch of the test grid noised, the rest clean; the error of the
        network's x0 (or noise) prediction counted inside the patch, averaged over all pixels. `seen`
        (default x) is what the network sees in place of x, the target staying x."""
        b, c, h, w = x.shape
        x0 = x.float() * 2 - 1
        source = x0 if seen is None else seen.float() * 2 - 1
        dev = x.device
        # drawn on the CPU (from `generator`, or torch's global one the loop re-seeds), then moved
        t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator).to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        if self.train_patches:
            grid = self.patch_masks(h, w, dev)
            inside = grid[torch.randint(0, len(grid), (b,), generator=generator).to(dev)]
        else:
            inside = torch.ones(b, 1, h, w, dtype=torch.bool, device=dev)
        sample = torch.where(inside, self.scheduler.add_noise(source, noise, t), source)
        if x.is_contiguous(memory_format=torch.channels_last):
            sample = sample.contiguous(memory_format=torch.channels_last)
        with autocast():
            out = self.denoise(sample, t, self.condition(x))
        target = x0 if self.objective == "x0" else noise
        return (self.error(out, target) * inside).mean()

    def training_step(self, x: torch.Tensor, optimizers: dict, backward: Callable[[torch.Tensor], None],
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        opt = optimizers["model"]
        loss = self.diffusion_loss(x, autocast=autocast, seen=self.training_input(x))
        opt.zero_grad(set_to_none=True)
        backward(loss)
        opt.step()
        return {"loss": loss.detach(), "diffusion": loss.detach()}

    def compile_targets(self):
        return [self.unet]

    @torch.no_grad()
    def validation_losses(self, x: torch.Tensor) -> dict[str, float]:
        """The training objective with timesteps, patches and noise from a fixed seed (the same draws
        for every validation batch and epoch: reproducible, comparable across epochs)."""
        loss = float(self.diffusion_loss(x, torch.Generator().manual_seed(VALIDATION_SEED)))
        return {"loss": loss, "diffusion": loss}
