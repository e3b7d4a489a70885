"""The training pool of REG-Net: candidate segmentations of widely spread quality.

Zhou, Deng & Wu made their pool from U-Nets of several depths, widths and training lengths and
balanced it to be uniform over Dice. A labelled set seldom comes with that many segmentations, so
`fill_pool` completes each case's candidates with perturbations of its ground truth G (native voxel
grid, RAS+), each drawn with random strength:

- ``erode`` / ``dilate``: G eroded or dilated by a ball of radius 1-4 / 1-6 voxels (under- and
  over-segmentation);
- ``shift``: G moved by 1-12 voxels in a random direction (misregistration);
- ``drop``: 20-100% of G's connected components removed (missed lesions; a single lesion dropped
  leaves an empty segmentation);
- ``add``: 1-4 false blobs (balls of radius 2-6 voxels) at random places in the brain;
- ``boundary``: the boundary moved by smooth random noise, the zero level of ``d + a * n`` with d
  the signed distance to G's surface, n a Gaussian-smoothed (sigma 1.5 voxels) unit-variance noise
  field and a in 0.3-3 voxels;
- ``threshold``: a threshold sweep of a synthetic anomaly map, ``w * blur(G) + (1 - w) * z(I)`` plus
  smooth noise, with z(I) the brain-standardised first image channel (hyperintense tissue is what a
  FLAIR threshold flags) and w in 0.1-0.8; the threshold keeps 0.2-4 times |G| voxels;
- ``combined``: two of the above in a row.

Balancing: every given candidate (a segmenter's output) is kept; the slots left up to `pool_size`
go to perturbations, each to the Dice bin (tenths of [0, 1]) that holds the fewest candidates so far
among the bins some perturbation reaches, so a case's pool comes out roughly uniform over Dice.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from anomaseg.boxes import bounding_box
from anomaseg.metrics import dice_score

KINDS = ("erode", "dilate", "shift", "drop", "add", "boundary", "threshold", "combined")
N_BINS = 10
_SIMPLE = ("erode", "dilate", "shift", "drop", "add", "boundary")


def _ball(radius: int) -> np.ndarray:
    r = int(radius)
    z, y, x = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (x * x + y * y + z * z) <= r * r + 0.5


def _morph(seg: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    box = bounding_box(seg, radius + 1)
    out = np.zeros_like(seg)
    op = ndi.binary_dilation if dilate else ndi.binary_erosion
    out[box] = op(seg[box], structure=_ball(radius))
    return out


def _shift(seg: np.ndarray, vector) -> np.ndarray:
    out = np.zeros_like(seg)
    src, dst = [], []
    for v, n in zip(vector, seg.shape):
        v = int(v)
        src.append(slice(max(0, -v), n - max(0, v)))
        dst.append(slice(max(0, v), n - max(0, -v)))
    out[tuple(dst)] = seg[tuple(src)]
    return out


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / max(float(n.std()), 1e-6)


def perturb(kind: str, truth: np.ndarray, brain: np.ndarray, rng: np.random.Generator,
            image: np.ndarray | None = None) -> np.ndarray:
    """One perturbation of the ground truth `truth` (bool, RAS+); see the module docstring."""
    truth = np.asarray(truth, bool)
    if kind == "erode":
        return _morph(truth, int(rng.integers(1, 5)), dilate=False)
    if kind == "dilate":
        return _morph(truth, int(rng.integers(1, 7)), dilate=True)
    if kind == "shift":
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        return _shift(truth, np.rint(direction * rng.uniform(1, 12)))
    if kind == "drop":
        labels, n = ndi.label(truth, structure=np.ones((3, 3, 3)))
        if n == 0:
            return truth.copy()
        k = max(1, int(round(rng.uniform(0.2, 1.0) * n)))
        dropped = rng.choice(np.arange(1, n + 1), size=k, replace=False)
        return truth & ~np.isin(labels, dropped)
    if kind == "add":
        out = truth.copy()
        where = np.argwhere(brain & ~truth)
        if len(where) == 0:
            return out
        for _ in range(int(rng.integers(1, 5))):
            r, c = int(rng.integers(2, 7)), where[rng.integers(len(where))]
            lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, truth.shape)
            grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
            ball = sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r * r
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            out[box] |= ball & brain[box]
        return out
    if kind == "boundary":
        amp = rng.uniform(0.3, 3.0)
        box = bounding_box(truth, int(np.ceil(3 * amp)) + 2)
        t = truth[box]
        signed = ndi.distance_transform_edt(t) - ndi.distance_transform_edt(~t)  # > 0 inside
        out = np.zeros_like(truth)
        out[box] = signed + amp * _smooth_noise(rng, t.shape, 1.5) > 0
        return out
    if kind == "threshold":
        ref = np.zeros(truth.shape, np.float32) if image is None else np.asarray(image, np.float32)
        inside = ref[brain]
        z = (ref - inside.mean()) / max(float(inside.std()), 1e-6) if inside.size else ref
        w = rng.uniform(0.1, 0.8)
        score = w * 4 * ndi.gaussian_filter(truth.astype(np.float32), 1.5) + (1 - w) * z
        score = ndi.gaussian_filter(score, 1.0) + 0.3 * _smooth_noise(rng, truth.shape, 2.0)
        keep = int(round(np.exp(rng.uniform(np.log(0.2), np.log(4.0))) * max(int(truth.sum()), 1)))
        values = score[brain]
        if keep >= values.size:
            return brain.copy()
        threshold = np.partition(values, values.size - keep)[values.size - keep]
        return (score >= threshold) & brain
    if kind == "combined":
        first, second = rng.choice(_SIMPLE, size=2, replace=False)
        return perturb(str(second), perturb(str(first), truth, brain, rng, image), brain, rng, image)
    raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(KINDS)}")


def dice_bin(dice: float) -> int:
    return min(int(dice * N_BINS), N_BINS - 1)


def fill_pool(truth: np.ndarray, brain: np.ndarray, given_dice: list[float], pool_size: int,
              rng: np.random.Generator, image: np.ndarray | None = None,
              raw_factor: int = 2) -> list[tuple[str, np.ndarray, float]]:
    """Perturbations (kind, segmentation, Dice) that complete a case's `given_dice` candidates to
    `pool_size`, chosen to flatten the pool's histogram over Dice (see the module docstring)."""
    slots = pool_size - len(given_dice)
    if slots <= 0:
        return []
    raw = []
    for i in range(raw_factor * slots):
        kind = KINDS[i % len(KINDS)] if i < len(KINDS) else KINDS[int(rng.integers(len(KINDS)))]
        seg = perturb(kind, truth, brain, rng, image)
        raw.append((kind, seg, dice_score(seg, truth)))
    given = np.bincount([dice_bin(d) for d in given_dice], minlength=N_BINS)
    return [raw[i] for i in select_balanced([d for _, _, d in raw], slots, rng, given)]


def select_balanced(dices: list[float], n: int, rng: np.random.Generator,
                    counts: np.ndarray | None = None) -> list[int]:
    """Indices of up to `n` of `dices`, each drawn from the Dice bin that holds the fewest so far
    (`counts`: per bin, what the pool already holds) among the bins with candidates left."""
    by_bin: dict[int, list[int]] = {}
    for i in rng.permutation(len(dices)):
        by_bin.setdefault(dice_bin(dices[i]), []).append(int(i))
    counts = np.zeros(N_BINS) if counts is None else np.asarray(counts, float).copy()
    chosen: list[int] = []
    while len(chosen) < n and any(by_bin.values()):
        open_bins = [b for b, members in by_bin.items() if members]
        b = min(open_bins, key=lambda k: (counts[k], rng.random()))
        chosen.append(by_bin[b].pop())
        counts[b] += 1
    return chosen
