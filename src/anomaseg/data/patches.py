"""Patches of model-size slices: a model that sees `patch_size` windows of finer `image_size` slices
(`data.patch_size`; 0 = the whole slice).

Training steps and the BatchNorm re-estimation after each epoch take one random `patch_size` crop per
slice whose centre is a brain pixel (a non-zero pixel: slices are zero outside the brain), so crops hold
brain without favouring any region of it; validation and sample images take the centre crop
(deterministic, so the validation loss compares across epochs). Scoring (`scorer.Scorer`) slides overlapping windows over the whole slice
(`window_grid`, MONAI's grid) and blends their maps; predictors are fitted on the same windows
(`windows`).
"""

from __future__ import annotations

import torch

WINDOW_OVERLAP = 0.5  # scoring windows overlap by half a window: every pixel lies in several windows


def check_patch_size(patch_size: int, image_size: int) -> None:
    """ValueError unless `patch_size` is 0 (whole slices) or a power of two in [32, image_size]."""
    p = patch_size
    if isinstance(p, bool) or not isinstance(p, int) or (p != 0 and (p < 32 or p > image_size or p & (p - 1))):
        raise ValueError(f"patch_size must be 0 (whole slices) or a power of two from 32 to image_size "
                         f"({image_size}), got {patch_size!r}")


def brain_crop_offsets(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 2) top-left corners (row, column) of one random `size` crop per slice of x (B, C, S, S):
    the crop's centre is drawn uniformly among the slice's non-zero pixels (any pixel if it has
    none), then the crop is shifted to lie inside the slice."""
    fg = (x.detach().abs().amax(dim=1) > 0).flatten(1).float()  # (B, S*S)
    fg[fg.sum(1) == 0] = 1.0
    centres = torch.multinomial(fg.cpu(), 1, generator=generator)[:, 0]
    width = x.shape[-1]
    rows, cols = centres // width, centres % width
    corner = torch.stack([rows, cols], 1) - size // 2
    return corner.clamp(min=0, max=width - size)


def crop(x: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, size, size): slice b of x cropped at offsets[b] = (row, column)."""
    return torch.stack([x[b, :, r:r + size, c:c + size] for b, (r, c) in enumerate(offsets.tolist())])


def random_brain_crops(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random crop per slice, centred on a brain pixel (`brain_crop_offsets`); x itself when it
    is no larger than `size`. Draws from torch's global generator unless one is given (the training
    loop re-seeds it before every step, so crops repeat exactly on resume)."""
    if size >= x.shape[-1]:
        return x
    return crop(x, brain_crop_offsets(x, size, generator), size).contiguous(memory_format=_format_of(x))


def centre_crops(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central `size` window of every slice (x itself when it is no larger)."""
    if size >= x.shape[-1]:
        return x
    start = (x.shape[-1] - size) // 2
    return x[..., start:start + size, start:start + size].contiguous(memory_format=_format_of(x))


def window_grid(image_size: int, size: int) -> list[tuple[slice, slice]]:
    """The windows scoring slides over an image_size slice: MONAI's own grid (`dense_patch_slices`)
    with the interval `sliding_window_inference` uses at WINDOW_OVERLAP, so fitting sees the
    windows scoring sees."""
    from monai.data.utils import dense_patch_slices

    interval = int(size * (1 - WINDOW_OVERLAP))
    return [tuple(s) for s in dense_patch_slices((image_size, image_size), (size, size), (interval, interval))]


def windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B * n, C, size, size): the `window_grid` windows of every slice of x (B, C, S, S), slice by slice."""
    grid = window_grid(x.shape[-1], size)
    return torch.stack([x[b, :, r, c] for b in range(len(x)) for r, c in grid])


def _format_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
