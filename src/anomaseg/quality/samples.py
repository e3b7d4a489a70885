"""From prepared cases and candidate segmentations to the 2D slices the quality networks see.

Slices are the project's own (`data/slices.py`: RAS+ axial slices cropped to the brain's box,
padded square, resized to the model size). Masks are resized like images (bilinear, antialiased),
so a model-size mask holds the fraction of each pixel that is segmented and sums to the native
voxel count times (size / side)^2: the unit in which REG-Net counts areas ("model pixels").

Training tensors, float16, one row per slice:
- REC-Net: ``[I (C channels), G]`` for every slice holding ground truth G, plus as many lesion-free
  brain slices (which teach it to leave an image without a removed region alone);
- REG-Net: ``[I, S, S and G, G not S, n, v]`` for every slice where the candidate S or G is present
  (n = 1), and once per case ``[I, 0, 0, 0, n, v]`` for each brain slice holding neither: the
  row is the same for the n candidates that leave the slice empty, so it is kept once with weight
  n. The loss stays that of whole candidate volumes; without the weights the network over-predicts
  missed lesion on clean slices and every volume's Dice comes out too low. v is the row's weight in
  Dice points (`dice_weight`): ``100 / (|S| + |G|)`` of its candidate volume (model pixels); a count
  error e on the slice moves the volume's Dice by about e * v points, so REG-Net's default loss,
  the squared error of e * v, weighs a small lesion's slices as much as its Dice depends on them
  (networks.py). A clean row shared by n candidates holds the root of the sum of their v^2, so its
  squared error is the sum of theirs. The channels after S are targets and weights (constant maps
  for n and v); the difference image is computed from I and S by the trained REC-Net before
  REG-Net is trained (`with_inputs`).
"""

from __future__ import annotations

import numpy as np
import torch

from anomaseg.data.slices import PreparedCase


def soft_slices(case: PreparedCase, mask: np.ndarray) -> np.ndarray:
    """A native RAS+ mask as (Z, S, S) float32 model-size slices of segmented fractions."""
    return case.geometry.to_slices(np.asarray(mask, np.float32))[:, 0].numpy()


def assessed_slices(case: PreparedCase, seg: np.ndarray) -> np.ndarray:
    """Indices of the axial slices a candidate is assessed on: every slice with brain or with S."""
    return np.flatnonzero(case.brain.any(axis=(0, 1)) | np.asarray(seg, bool).any(axis=(0, 1)))


def slice_areas(case: PreparedCase, seg: np.ndarray) -> tuple[np.ndarray, float]:
    """Per axial slice the candidate's area inside the slice box (model pixels, exact from the native
    voxels), and its total area outside the box (never seen by the networks: counted as wrong)."""
    g = case.geometry
    seg = np.asarray(seg, bool)
    (x0, x1), (y0, y1) = g.box
    scale = (g.size / g.side) ** 2
    inside = seg[x0:x1, y0:y1].sum(axis=(0, 1)).astype(np.float64)
    outside = float(seg.sum() - inside.sum())
    return inside * scale, outside * scale


def rec_samples(case: PreparedCase, rng: np.random.Generator) -> np.ndarray:
    """REC-Net training rows of a labelled case (see the module docstring)."""
    truth = case.truth if case.truth is not None else np.zeros(case.brain.shape, bool)
    holds = truth.any(axis=(0, 1))
    positive = np.flatnonzero(holds)
    clean = np.flatnonzero(case.brain.any(axis=(0, 1)) & ~holds)
    negative = rng.choice(clean, size=min(len(clean), max(len(positive), 2)), replace=False) if len(clean) else clean
    z = np.sort(np.concatenate([positive, negative])).astype(int)
    g = soft_slices(case, truth)[z, None]
    return np.concatenate([case.images[z].astype(np.float32), g], axis=1).astype(np.float16)


# v = DICE_WEIGHT_UNIT / (|S| + |G|): Dice points (percent), which float16 rows hold precisely where
# 1 / 40000 (a large lesion at 64 px) would be subnormal
DICE_WEIGHT_UNIT = 100.0


def dice_denominator(case: PreparedCase, seg: np.ndarray) -> float:
    """``|S| + |G|`` of a candidate volume in model pixels (native voxels times (size / side)^2; at
    least 1, so an empty candidate of a lesion-free case stays finite)."""
    g = case.geometry
    voxels = int(np.count_nonzero(seg)) + int(np.count_nonzero(case.truth))
    return max(voxels * (g.size / g.side) ** 2, 1.0)


def dice_weight(case: PreparedCase, seg: np.ndarray) -> float:
    """A candidate's rows' weight v in Dice points per model pixel (see the module docstring)."""
    return DICE_WEIGHT_UNIT / dice_denominator(case, seg)


def reg_samples(case: PreparedCase, seg: np.ndarray) -> np.ndarray:
    """REG-Net rows ``[I, S, S and G, G not S, 1, v]`` of one candidate, on the slices holding S or G."""
    seg = np.asarray(seg, bool)
    truth = case.truth
    z = np.flatnonzero(seg.any(axis=(0, 1)) | truth.any(axis=(0, 1)))
    maps = [soft_slices(case, m)[z, None] for m in (seg, seg & truth, truth & ~seg)]
    weights = np.ones((len(z), 2) + case.images.shape[2:], np.float32)
    weights[:, 1] = dice_weight(case, seg)
    return np.concatenate([case.images[z].astype(np.float32), *maps, weights], axis=1).astype(np.float16)


def clean_samples(case: PreparedCase, candidates: list[np.ndarray]) -> np.ndarray:
    """REG-Net rows ``[I, 0, 0, 0, n, v]`` of the brain slices without ground truth, n being the number
    of the case's candidates that leave the slice empty too (they all share this row) and v the root
    of the sum of their squared Dice weights."""
    empty = np.zeros(case.brain.shape[2], int)
    squares = np.zeros(case.brain.shape[2], np.float64)
    for seg in candidates:
        leaves = ~np.asarray(seg, bool).any(axis=(0, 1))
        empty += leaves
        squares += leaves * dice_weight(case, seg) ** 2
    z = np.flatnonzero(case.brain.any(axis=(0, 1)) & ~case.truth.any(axis=(0, 1)) & (empty > 0))
    images = case.images[z].astype(np.float16)
    rows = np.zeros((len(z), images.shape[1] + 5) + images.shape[2:], np.float16)
    rows[:, :images.shape[1]] = images
    rows[:, -2] = empty[z, None, None]
    rows[:, -1] = np.sqrt(squares[z, None, None])
    return rows


@torch.no_grad()
def with_inputs(rows: torch.Tensor, channels: int, variant: str, rec=None, batch_size: int = 256) -> torch.Tensor:
    """REG-Net training rows for a variant: ``[I, S, TP, missed, n, v]`` -> ``[X, S, TP, missed, n, v]`` with X
    the image ("image"), the difference image I - REC([I * (1 - S), S]) ("difference") or both."""
    if variant == "image":
        return rows
    out = []
    for i in range(0, len(rows), batch_size):
        r = rows[i:i + batch_size].float()
        image, rest = r[:, :channels], r[:, channels:]
        dif = image - rec(r[:, :channels + 1]).recon.float()
        x = dif if variant == "difference" else torch.cat([image, dif], dim=1)
        out.append(torch.cat([x, rest], dim=1).to(torch.float16))
    return torch.cat(out) if out else rows.new_zeros((0, rows.shape[1] + (variant == "both") * channels) + rows.shape[2:])
