"""Conditioned denoising diffusion model (cDDPM; Behrendt, Bhattacharya, Mieling, Maack, Krüger, Opfer &
Schlaefer, "Guided Reconstruction with Conditioned Diffusion Models for Unsupervised Anomaly
Detection in Brain MRIs", Computers in Biology and Medicine 186, 2025; preprint 2024), on the pDDPM
code paths of models/ddpm.py (MONAI's DiffusionModelUNet and schedulers, the same loss, test-time
noising and residual map).

The denoising U-Net is conditioned on a latent vector of the *clean* (un-noised) input slice,
computed by a CNN encoder trained with it: the reconstruction of a noised slice is guided by the
intensities of the very slice it reconstructs, which is what the paper credits for fewer false
positives from intensity shifts between input and reconstruction.

Read: the authors' code, FinnBehrendt/Conditioned-Diffusion-Models-UAD: src/models/DDPM_2D.py (the
Lightning model: encoder of the clean input, training, the noise-ensemble test step),
src/models/modules/DDPM_encoder.py and src/models/modules/spark/Spark_2D.py (SparK_2D_encoder),
src/models/modules/spark/models.py (build_encoder: a timm CNN with a linear head of `cond_dim`),
src/models/modules/OpenAI_Unet.py (UNetModel: `label_emb` and its forward),
src/models/modules/cond_DDPM.py (GaussianDiffusion: q_sample, p_losses, forward),
configs/experiment/cDDPM/DDPM_cond_spark_2D.yaml, Spark_2D_pretrain.yaml, configs/model/DDPM_2D.yaml,
configs/datamodule/IXI.yaml, README.md.

Followed:

- The encoder: a ResNet (the experiment's `version: resnet50`) on the clean slice in the [0, 1]
  scale, 7x7 stride-2 stem, max-pooling, four stages, global average pooling, a linear layer to the
  condition vector of `cond_dim` = 4 x the U-Net's base width (DDPM_2D overrides the config's
  `cond_dim: 128` with `unet_dim * 4`). The same latent serves every diffusion step of its slice.
- How the condition enters: the timestep-embedding path, not cross-attention (the experiment sets
  `spatial_transformer: False`): an MLP (linear, SiLU, linear) maps the latent to the width of the
  time embedding, and every residual block of the U-Net receives it with the time embedding.
- The encoder is trained jointly with the U-Net by the diffusion loss, one Adam over both: the
  code's `pretrained_encoder=False` run, which its README gives as the way to run cDDPM without
  pretraining.
- Diffusion as DDPM_2D (not the patched model): the whole slice noised, T = 1000, cosine schedule,
  x0 prediction, L1 averaged over the slice, timesteps uniform in training.
- Test: the experiment's `noise_ensemble: True`: the slice noised to steps 250, 500 and 750 (passed
  as t - 1), each from its own noise draw, one x0-prediction each, the three reconstructions averaged
  (`step_ensemble`; `step_ensemble=()` gives the single step `t_test` = 500 of `test_timesteps`).
- U-Net of the paper's preset as pDDPM's (128 channels, multipliers 1, 2, 2, 3 residual blocks,
  configs/behrendt2024_cddpm_paper.yaml); Adam, lr 1e-4, batch 32; the map is the residual.

Not followed, and why:

- Combining time and condition: the authors' OpenAI U-Net concatenates the two embeddings (each
  block sees twice the width); MONAI's class-conditioning path adds the condition's embedding to
  the time embedding (what OpenAI's class-conditional U-Net does). That path is switched on after the
  U-Net is built (`num_class_embeds`, read by its forward), with the MLP of the latent in place of the
  `nn.Embedding` of integer labels.
- Encoder: MONAI's ResNet (`monai.networks.nets.ResNet`; timm is not a dependency): the paper's
  preset is its ResNet-50 (bottleneck blocks 3-4-6-3, widths 64-512); the CPU preset a ResNet-10
  at a quarter width (basic blocks, one per stage, widths 16-128). timm's stochastic depth (drop
  path 0.05 in the code's encoder table) is not in MONAI's ResNet.
- SparK masked pretraining of the encoder (`Spark_2D_pretrain`, mask ratio 0.65; the README's route
  to "better performance" and `pretrained_encoder: True` of the experiment config) is not
  implemented: the encoder starts from random weights.
- As for pDDPM (models/ddpm.py): Gaussian instead of the code's simplex noise; MONAI's U-Net rather
  than OpenAI's (no scale-shift norm), fp32 or bf16 rather than fp16; the code's intensity
  augmentation (`aug_intensity`: torchio gamma, bias field, blur, ghosting) is not applied, since
  the training data here has no augmentation step; training length sized for a CPU in
  configs/behrendt2024_cddpm.yaml.

The pDDPM options apply (`patch_size` < `image_size` noises one patch at a time with the rest clean,
`ddim_steps`, `ensemble`, `objective`); the condition is always the latent of the whole clean slice.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from anomaseg.models.ddpm import PatchedDDPM
from anomaseg.models.registry import register_model

ENCODER_BLOCKS = ("basic", "bottleneck")


@register_model("cddpm", description="Conditioned DDPM (Behrendt et al. 2024): MONAI diffusion U-Net conditioned "
                                     "on a jointly trained ResNet's latent of the clean slice; whole slice noised "
                                     "to t=250/500/750, x0, averaged",
                tiny=dict(channels=(8, 16), num_res_blocks=1, norm_num_groups=4, num_head_channels=16,
                          encoder_channels=(8, 8, 16, 16), encoder_max_pool=False))
class ConditionedDDPM(PatchedDDPM):
    def __init__(self, in_channels: int = 1, image_size: int = 64, channels: tuple[int, ...] = (32, 64, 64),
                 encoder_block: str = "basic", encoder_layers: tuple[int, ...] = (1, 1, 1, 1),
                 encoder_channels: tuple[int, ...] = (16, 32, 64, 128), encoder_max_pool: bool = True,
                 cond_dim: int | None = None, patch_size: int | None = None,
                 step_ensemble: tuple[int, ...] = (250, 500, 750), **kwargs):
        if encoder_block not in ENCODER_BLOCKS:
            raise ValueError(f"encoder_block must be one of {ENCODER_BLOCKS}, got {encoder_block!r}")
        if len(encoder_layers) != 4 or len(encoder_channels) != 4:
            raise ValueError(f"encoder_layers and encoder_channels need 4 stages each, got {tuple(encoder_layers)}, "
                             f"{tuple(encoder_channels)}")
        # the whole slice is one patch unless asked otherwise (the paper's cDDPM is not patched)
        super().__init__(in_channels, image_size, channels,
                         patch_size=image_size if patch_size is None else patch_size,
                         step_ensemble=step_ensemble, **kwargs)
        from monai.networks.nets import ResNet

        width = int(channels[0]) * 4  # MONAI's (and OpenAI's) time-embedding width
        self.cond_dim = width if cond_dim is None else int(cond_dim)
        self.encoder = ResNet(encoder_block, [int(n) for n in encoder_layers], [int(c) for c in encoder_channels],
                              spatial_dims=2, n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2,
                              no_max_pool=not encoder_max_pool, num_classes=self.cond_dim, bias_downsample=False)
        # MONAI's class conditioning adds `class_embedding(class_labels)` to the time embedding when
        # `num_class_embeds` is set; the labels here are the encoder's latents, embedded by an MLP
        self.unet.num_class_embeds = self.cond_dim
        self.unet.class_embedding = nn.Sequential(nn.Linear(self.cond_dim, width), nn.SiLU(), nn.Linear(width, width))

    def condition(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's latent (B, cond_dim) of the clean slices x (B, C, H, W in [0, 1] scale)."""
        return self.encoder(x)

    def compile_targets(self):
        return [self.encoder, self.unet]
