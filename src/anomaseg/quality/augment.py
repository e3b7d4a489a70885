"""Training-time augmentation of REG-Net's slice rows, keeping inputs and targets exact.

A REG-Net row is ``[X, S, TP map, missed map, weight maps n, v]`` (`samples.py`). Its targets are *sums* of
the target maps over the slice, and REG-Net's outputs are sums over cells (`networks.py`), so a
rotation by a multiple of 90 degrees or a flip of the slice (the 8 symmetries of the square, the
dihedral group D4), applied to every channel alike, leaves the per-slice counts and hence the
volume Dice unchanged while showing the network another image: the usual remedy for a small
regression net fitted on few subjects. The transforms are exact (pixel permutations, no
interpolation), so image, candidate and targets stay aligned pixel for pixel. Brains are roughly
left-right symmetric, not up-down; the regression target does not care, and the measured effect is
in benchmarks/README.md.

Optionally, X (the network's image channels only, never S or the targets) is scaled by
``1 + U(-scale, scale)`` and shifted by ``U(-shift, shift)`` per row, imitating scanner contrast and
normalisation differences. torch has flips and rotations but no batched per-sample D4 transform,
hence these few lines (MONAI's RandRotate90d/RandFlipd work per sample on dictionaries, not on a
packed training batch).
"""

from __future__ import annotations

import torch

N_SYMMETRIES = 8  # 4 rotations, each with and without a left-right flip


def dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """Symmetry `code` (0-7) of the square applied to the last two dimensions: a left-right flip
    when code >= 4, then a rotation by (code % 4) * 90 degrees. Code 0 is the identity."""
    if code >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, code % 4, dims=(-2, -1))


def inverse_dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """Undo `dihedral(., code)`."""
    x = torch.rot90(x, -(code % 4), dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if code >= 4 else x


def augment_rows(rows: torch.Tensor, x_channels: int, flips: bool = True, intensity_scale: float = 0.0,
                 intensity_shift: float = 0.0, generator: torch.Generator | None = None,
                 codes: torch.Tensor | None = None) -> torch.Tensor:
    """A randomly transformed copy of a batch of rows (B, C, H, W): each row gets one of the 8
    symmetries (all channels alike; `flips`), and its first `x_channels` channels the intensity
    jitter. Draws from `generator` (default: torch's global generator, which the training loop
    seeds per step). `codes` (B,) forces the symmetries (for tests)."""
    if rows.shape[-1] != rows.shape[-2] and flips:
        raise ValueError(f"rotations need square slices, got {tuple(rows.shape[-2:])}")
    out = rows
    n = len(rows)
    if flips:
        if codes is None:
            codes = torch.randint(0, N_SYMMETRIES, (n,), generator=generator)
        out = torch.empty_like(rows)
        for code in range(N_SYMMETRIES):
            idx = (codes == code).nonzero().flatten().to(rows.device)
            if len(idx):
                out[idx] = dihedral(rows[idx], code)
    if intensity_scale or intensity_shift:
        if out is rows:
            out = rows.clone()
        shape = (n, 1, 1, 1)
        scale = 1 + intensity_scale * (2 * torch.rand(shape, generator=generator) - 1)
        shift = intensity_shift * (2 * torch.rand(shape, generator=generator) - 1)
        x = out[:, :x_channels]
        out[:, :x_channels] = x * scale.to(x) + shift.to(x)
    return out
