"""REC-Net and REG-Net of Zhou, Deng & Wu (*Robust Image Segmentation Quality Assessment*, MIDL 2020).

Both are plain nn.Modules on 2D slices, trained by the project's one training loop (`training.py`)
through the `AnomalyModel` contract (`training_step`, `validation_losses`, `make_optimizers`).
Normalisation is GroupNorm, not BatchNorm: a network behaves the same in train and eval mode, so
the loop's precise-BN pass has nothing to do, and REC-Net inside a REG pipeline cannot be changed
by it.

**REC-Net** (`rec_net`) reconstructs the image from the image with the segmented region removed:
``REC([I * (1 - S), S]) -> I``. Trained with ground-truth segmentations only, it learns what the
segmented structure looks like given its outline, so it reconstructs well exactly where the
segmentation is right; ``I_dif = I - REC(...)`` shows where a candidate and the image disagree.
The removed region is set to zero (as in the authors' code), and S is also given as an input
channel: after percentile normalisation CSF is close to 0 on FLAIR, so without it a removed region
could not be told from a ventricle. A U-Net (Ronneberger et al.) of `depth` levels; the loss is L1
over the slice plus `hole_weight` times the mean L1 inside S (most pixels are a plain copy).

**REG-Net** (`reg_net`) regresses, per slice, how good a candidate segmentation S is, from
``[X, S]`` where X is the difference image (the paper), the image (Robinson et al. 2018) or both.
Why per-slice counts and not a Dice per slice: the Dice of a volume is not the mean of its slices'
Dice (and a slice without lesion and without segmentation has none), but overlap counts add up.
For slice k with candidate area s_k (known exactly from S), REG-Net predicts the fraction q_k of
s_k that is lesion and the lesion area m_k that S misses. Then ``TP = sum q_k s_k``,
``|G| = TP + sum m_k`` and the volume Dice is ``2 TP / (sum s_k + |G|)`` (`volume_dice`),
differentiable end to end (what the FGSM attack needs).

The loss (`loss`): by default ("dice") the squared error of the counts TP_k and m_k, each in Dice
points of its candidate volume, ``100 e / (|S| + |G|)`` (`samples.dice_weight`): a count error e on
a slice moves that volume's Dice by about that much, so a volume with a small lesion counts as much
as one with a large lesion. Squared, not absolute: the volume Dice needs the *sums* of the counts,
and a sum of per-slice conditional means is the conditional mean of the sum, where per-slice
medians (an L1 loss) of sparse counts (most slices miss nothing) add up to too little: with L1
(tried, one seed) the network under-predicted missed lesion and over-predicted
under-segmentations (dropped lesions at 0.37 predicted 0.90; benchmarks/README.md).
The earlier loss ("counts": the Huber loss of the counts in model pixels / `count_scale`) weighed
slices by the lesion area they hold; that let the network neglect small lesions (a count of 2-10
model pixels is almost free to get wrong), and on the phantom it predicted the exact ground truth
of MS-like subjects (at 32 px ~100-200 model pixels of lesion in all) at Dice 0.05-0.29, fitting
subjects included, with 50-90 pixels of missed lesion where none was missed (benchmarks/README.md,
issue 20).

Architecture: strided 3x3 convolutions as in Robinson et al. down to 1/2^depth of the slice, two
dilated convolutions for context, then a 1x1 head giving two maps on that grid: the probability
that the candidate's pixels in a cell are lesion, and the fraction of the cell that is lesion the
candidate misses. The counts are *sums* of these maps (weighted by the candidate's area per cell
for TP): a count is a sum over pixels, so sum pooling makes it follow the area and position of
what the network sees, where global average pooling and a fully connected head would have to
learn a division by the area (we tried: that version ranked a segmentation and its misplaced copy
alike after the same training).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from anomaseg.models.base import AnomalyModel, ModelOutput, adamw
from anomaseg.quality.augment import augment_rows
from anomaseg.registry import Registry

LOSSES = ("dice", "counts")  # REG-Net's training loss (module docstring)
NETWORKS = Registry("quality network", lambda: None)  # both entries are defined in this module


def create_network(name: str, *, tiny: bool = False, **kwargs) -> nn.Module:
    """Build `rec_net` or `reg_net`; like `create_model`, the keywords are kept as `hparams`."""
    params = {**(NETWORKS.entry(name).tiny if tiny else {}), **kwargs}
    net = NETWORKS.build(name, **params)
    net.hparams = {"name": name, **params}
    return net


def network_from_checkpoint(ckpt: dict) -> nn.Module:
    hp = dict(ckpt["hparams"])
    net = create_network(hp.pop("name"), **hp)
    net.load_state_dict(ckpt["model"])
    return net.eval()


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, min(8, channels // 4)), channels)


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), _norm(cout), nn.LeakyReLU(0.2, inplace=True)]


@NETWORKS.register("rec_net", description="REC-Net: U-Net reconstructing I from [I * (1 - S), S]",
                   tiny=dict(base_channels=4, depth=2))
class RECNet(AnomalyModel):
    """Input (B, C + 1, H, W): the image's C channels, then the segmentation S in [0, 1]."""

    def __init__(self, in_channels: int = 1, image_size: int = 64, base_channels: int = 8, depth: int = 3,
                 hole_weight: float = 1.0):
        super().__init__()
        if image_size % 2**depth:
            raise ValueError(f"image_size {image_size} is not divisible by 2**depth = {2**depth}")
        self.in_channels, self.hole_weight = in_channels, hole_weight
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c = in_channels + 1
        for i, w in enumerate(widths):
            self.down.append(nn.Sequential(*_conv(c, w, stride=1 if i == 0 else 2), *_conv(w, w)))
            c = w
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.Sequential(*_conv(c + w, w), *_conv(w, w)))
            c = w
        self.head = nn.Conv2d(c, in_channels, 1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        image, seg = x[:, :self.in_channels], x[:, self.in_channels:self.in_channels + 1]
        h = torch.cat([image * (1 - seg), seg], dim=1)
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return ModelOutput(self.head(h))

    def loss(self, x: torch.Tensor, out: ModelOutput) -> dict[str, torch.Tensor]:
        image, seg = x[:, :self.in_channels].float(), x[:, self.in_channels:self.in_channels + 1].float()
        err = (out.recon.float() - image).abs()
        whole = err.mean()
        hole = (err * seg).sum() / (seg.sum() * self.in_channels).clamp_min(1.0)
        return {"loss": whole + self.hole_weight * hole, "l1": whole, "l1_in_segmentation": hole}


class QualityOutput(NamedTuple):
    """REG-Net's per-slice prediction (see the module docstring)."""

    precision: torch.Tensor  # (B,) q: the fraction of the candidate's area that is lesion (0.5 without area)
    missed: torch.Tensor  # (B,) lesion area the candidate misses, model pixels (>= 0)


@NETWORKS.register("reg_net", description="REG-Net: per-slice overlap counts of a candidate from [X, S]",
                   tiny=dict(base_channels=4, depth=2))
class REGNet(AnomalyModel):
    """Input (B, in_channels + 1, H, W): X (difference image, image or both), then S.

    Training batches carry four more channels: the soft maps of the true positives and of the
    missed lesion (`loss` sums them into per-slice counts) and two constant maps holding the row's
    weights (n: how many candidate volumes share the row; v: its Dice weight, `samples.py`);
    `training_step` and `validation_losses` split them off, so the network never sees the ground
    truth. `loss` is "dice" (default) or "counts" (the earlier loss; see the module docstring).

    Regularisation against overfitting the few fitting subjects (REG-Net's training loss fell to
    ~0.01 while its validation loss stayed at 0.4-0.9: benchmarks/README.md), each off-switchable:
    `augment` gives every training row a random flip / 90-degree rotation, applied to inputs and
    target maps alike (`augment.py`: the counts, hence the Dice target, are unchanged);
    `intensity_scale` / `intensity_shift` jitter X only (not S); `dropout` is the channel dropout
    (Dropout2d) before the 1x1 head; `weight_decay` makes the optimiser AdamW (decoupled decay).
    Defaults (augment, dropout 0.1, weight decay 0.01; no jitter) by benchmarks/quality_assessment.py:
    the lowest or equal-lowest test MAE with 16 and with 48 fitting subjects.
    """

    reconstructs = False

    def __init__(self, in_channels: int = 1, image_size: int = 64, base_channels: int = 8, depth: int = 2,
                 count_scale: float = 16.0, augment: bool = True, intensity_scale: float = 0.0,
                 intensity_shift: float = 0.0, dropout: float = 0.1, weight_decay: float = 0.01,
                 loss: str = "dice"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if image_size % 2**depth:
            raise ValueError(f"image_size {image_size} is not divisible by 2**depth = {2**depth}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if min(intensity_scale, intensity_shift, weight_decay) < 0:
            raise ValueError("intensity_scale, intensity_shift and weight_decay must be >= 0")
        self.in_channels, self.count_scale, self.cell = in_channels, count_scale, 2**depth
        self.augment, self.intensity_scale, self.intensity_shift = bool(augment), intensity_scale, intensity_shift
        self.weight_decay, self.loss_kind = weight_decay, loss
        layers = _conv(in_channels + 1, base_channels)
        c = base_channels
        for i in range(depth):
            w = base_channels * 2 ** (i + 1)
            layers += _conv(c, w, stride=2) + _conv(w, w)
            c = w
        for dilation in (2, 4):
            layers += [nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, bias=False), _norm(c),
                       nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.head = nn.Conv2d(c, 2, 1)
        with torch.no_grad():  # start at q = 0.5 and almost nothing missed (most cells miss nothing)
            self.head.bias.copy_(torch.tensor([0.0, -8.0]))

    def forward(self, x: torch.Tensor) -> QualityOutput:
        if x.shape[1] != self.in_channels + 1:
            raise ValueError(f"reg_net expects {self.in_channels + 1} channels (X, S), got {x.shape[1]}")
        maps = self.head(self.dropout(self.features(x))).float()
        cell_area = float(self.cell**2)
        seg = F.avg_pool2d(x[:, -1:].float(), self.cell) * cell_area  # candidate area per cell
        area = seg.sum(dim=(1, 2, 3))
        tp = (torch.sigmoid(maps[:, :1]) * seg).sum(dim=(1, 2, 3))
        precision = torch.where(area > 1e-6, tp / area.clamp_min(1e-6), torch.full_like(area, 0.5))
        missed = (torch.sigmoid(maps[:, 1:]) * cell_area).sum(dim=(1, 2, 3))
        return QualityOutput(precision, missed)

    @staticmethod
    def split(batch: torch.Tensor):
        """A training batch [X, S, TP map, missed map, n map, v map] -> (inputs [X, S], and per slice:
        candidate area s, true positives, missed lesion area, weight n, Dice weight v)."""
        inputs = batch[:, :-4]
        area, tp, missed = (batch[:, i].float().sum(dim=(1, 2)) for i in (-5, -4, -3))
        return inputs, area, tp, missed, batch[:, -2, 0, 0].float(), batch[:, -1, 0, 0].float()

    def loss(self, batch: torch.Tensor, out: QualityOutput) -> dict[str, torch.Tensor]:
        _, area, tp, missed, weight, dice_weight = self.split(batch)
        tp_pred = out.precision * area
        n = weight.sum().clamp_min(1e-6)
        w = weight / n
        if self.loss_kind == "dice":
            # per candidate slice the batch stands for: the squared count errors in Dice points
            loss = (dice_weight.square() * ((tp_pred - tp).square() + (out.missed - missed).square())).sum() / n
        else:
            k = self.count_scale
            huber = (F.smooth_l1_loss(tp_pred / k, tp / k, reduction="none")
                     + F.smooth_l1_loss(out.missed / k, missed / k, reduction="none"))
            loss = (w * huber).sum()
        return {"loss": loss, "tp_abs_error": (w * (tp_pred - tp).abs()).sum(),
                "missed_abs_error": (w * (out.missed - missed).abs()).sum()}

    def make_optimizers(self, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, torch.optim.Optimizer]:
        if not self.weight_decay:
            return super().make_optimizers(lr, betas)
        # the usual exemption: biases and GroupNorm scales are not decayed (the head's bias holds the
        # "almost nothing missed" prior of -8)
        decay = [p for p in self.parameters() if p.ndim > 1]
        keep = [p for p in self.parameters() if p.ndim <= 1]
        groups = [{"params": decay}, {"params": keep, "weight_decay": 0.0}]
        return {"model": adamw(groups, lr, betas, self.weight_decay)}

    def training_step(self, batch: torch.Tensor, optimizers: dict, backward: Callable[[torch.Tensor], None],
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        opt = optimizers["model"]
        if self.augment or self.intensity_scale or self.intensity_shift:
            batch = augment_rows(batch, self.in_channels, flips=self.augment, intensity_scale=self.intensity_scale,
                                 intensity_shift=self.intensity_shift)
        with autocast():
            losses = self.loss(batch, self(self.split(batch)[0]))
        opt.zero_grad(set_to_none=True)
        backward(losses["loss"])
        opt.step()
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def validation_losses(self, batch: torch.Tensor) -> dict[str, float]:
        return {k: float(v) for k, v in self.loss(batch, self(self.split(batch)[0])).items()}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("reg_net is a regressor: it has no reconstruction")


def volume_dice(out: QualityOutput, areas: torch.Tensor, outside: float = 0.0) -> torch.Tensor:
    """Predicted Dice of a whole volume from REG-Net's outputs on all its slices, the candidate's area
    per slice and its area outside the slices' box (counted as wrong), in model pixels:
    ``2 TP / (sum s + outside + TP + sum m)``; 1 when both the candidate and the predicted lesion are
    empty (the convention of `metrics.dice_score`)."""
    tp = (out.precision * areas).sum()
    denom = areas.sum() + outside + tp + out.missed.sum()
    return torch.where(denom > 1e-3, 2 * tp / denom.clamp_min(1e-3), torch.ones_like(denom))


VARIANTS = {
    "difference": "REG-Net on (I_dif, S): Zhou, Deng & Wu 2020",
    "image": "REG-Net on (I, S): Robinson et al. 2018",
    "both": "REG-Net on (I, I_dif, S)",
}


class QualityPipeline(nn.Module):
    """Image slices and candidate slices -> REG-Net outputs, through REC-Net where the variant needs
    the difference image. Differentiable in the image (FGSM attacks the whole pipeline)."""

    def __init__(self, reg: REGNet, rec: RECNet | None, variant: str):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if variant != "image" and rec is None:
            raise ValueError(f"variant {variant!r} needs a REC-Net")
        self.reg, self.rec, self.variant = reg, rec, variant

    def inputs(self, image: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """[X, S] for REG-Net: X = I, I_dif = I - REC([I * (1 - S), S]) or both."""
        if self.variant == "image":
            x = image
        else:
            dif = image - self.rec(torch.cat([image, seg], dim=1)).recon
            x = dif if self.variant == "difference" else torch.cat([image, dif], dim=1)
        return torch.cat([x, seg], dim=1)

    def forward(self, image: torch.Tensor, seg: torch.Tensor) -> QualityOutput:
        return self.reg(self.inputs(image, seg))
