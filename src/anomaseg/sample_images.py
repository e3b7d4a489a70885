"""The sample images a training run writes after each epoch (RUN/samples/epoch_NNN.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anomaseg.atomic import atomic_path


def sample_grid(images: torch.Tensor, recons: torch.Tensor) -> np.ndarray:
    """Inputs (top row) over reconstructions (bottom row), first channel, anterior up, uint8."""
    def row(t):
        t = t[:, 0].float().clamp(0, 1.5) / 1.5
        return torch.cat([s.T.flip(0) for s in t], dim=1)  # RAS slice (x, y) -> display (y up, x right)
    grid = torch.cat([row(images), row(recons)], dim=0)
    return (grid.numpy() * 255).round().astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
