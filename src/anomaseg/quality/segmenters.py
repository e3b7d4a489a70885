"""Candidate segmentations from real segmenters, for REG-Net's pool.

Zhou, Deng & Wu made their pool from U-Nets "with different depths, filter numbers and training
epochs", so its errors have a network's shape rather than a perturbation's. This module makes such
candidates from a labelled set:

- `unet_candidates`: small supervised 2D U-Nets (MONAI's `UNet`, on the project's own slices,
  `data/slices.py`) of several depths, widths and training lengths (`UNetSpec`), each prediction
  thresholded at several probabilities. Cross-fitted by subject: a case is segmented only by
  networks fitted on other subjects (`folds`), or, given `predict`, networks fitted on all of `fit`
  segment those new cases. A network never segments a case it was fitted on: that would give
  near-perfect candidates no real segmenter produces.
- `anomaly_candidates`: a trained anomaly-detection run's segmentations (`anomaseg.scoring`: its
  healthy-calibrated threshold times several factors, for one or more predictors); the caller
  trains the run to several epochs in turn.
- `balanced_candidates`: a subset of a case's candidates spread evenly over Dice (`pool.py`'s
  `select_balanced`); the perturbations of `pool.fill_pool` then complete the pool.
- `write_candidates`: one folder per source, `<case>_segmentation.nii.gz`, as
  `candidates.find_candidates` reads them (`anomaseg qa fit --segmentations`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anomaseg.data.slices import PreparedCase

THRESHOLDS = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class UNetSpec:
    """One supervised segmenter: `depth` resolution levels, `width` channels at the first level
    (doubling per level), trained `epochs` passes over the fitting slices."""

    depth: int = 3
    width: int = 8
    epochs: int = 4

    def __post_init__(self):
        if self.depth < 2 or self.width < 1 or self.epochs < 1:
            raise ValueError(f"U-Net spec needs depth >= 2, width >= 1, epochs >= 1, got {self}")

    @property
    def name(self) -> str:
        return f"unet_d{self.depth}_w{self.width}_e{self.epochs}"


# From a barely trained shallow net to a longer-trained deeper one: a spread of quality.
DEFAULT_UNETS = (UNetSpec(2, 4, 1), UNetSpec(2, 8, 3), UNetSpec(3, 8, 2), UNetSpec(3, 16, 6))


def build_unet(in_channels: int, spec: UNetSpec) -> torch.nn.Module:
    """MONAI's 2D U-Net with one logit per pixel."""
    from monai.networks.nets import UNet

    channels = tuple(spec.width * 2 ** i for i in range(spec.depth))
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=1, channels=channels,
                strides=(2,) * (spec.depth - 1), num_res_units=1)


def _training_slices(cases: list[PreparedCase]) -> tuple[torch.Tensor, torch.Tensor]:
    """Brain slices of labelled cases: images (N, C, S, S) and lesion masks (N, 1, S, S), float32."""
    xs, ys = [], []
    for case in cases:
        if case.labels is None:
            raise ValueError(f"case {case.case_id} has no ground truth: U-Nets are fitted on labelled cases")
        z = np.flatnonzero(case.masks.any(axis=(1, 2)))
        xs.append(case.images[z].astype(np.float32))
        ys.append(case.labels[z, None].astype(np.float32))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def fit_unet(cases: list[PreparedCase], spec: UNetSpec, seed: int = 0, batch_size: int = 8,
             lr: float = 3e-3) -> torch.nn.Module:
    """A U-Net fitted on the brain slices of labelled `cases` (Dice + cross-entropy loss, Adam)."""
    from monai.losses import DiceCELoss

    x, y = _training_slices(cases)
    torch.manual_seed(seed)
    net = build_unet(x.shape[1], spec)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)  # batch Dice: slices without lesion do not dominate
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(spec.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def probability_volume(net: torch.nn.Module, case: PreparedCase, batch_size: int = 64) -> np.ndarray:
    """The network's lesion probability on the case's native RAS+ grid (0 outside the brain)."""
    x = torch.from_numpy(case.images.astype(np.float32))
    probs = torch.cat([torch.sigmoid(net(b)) for b in x.split(batch_size)])
    volume = case.geometry.to_volume(probs[:, 0].numpy())
    volume[~case.brain] = 0.0
    return volume


def _folds(n: int, folds: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) % max(1, min(folds, n))


def unet_candidates(fit: list[PreparedCase], specs=DEFAULT_UNETS, thresholds=THRESHOLDS, folds: int = 2,
                    predict: list[PreparedCase] | None = None, seed: int = 0,
                    progress: bool = False) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Candidates (source, bool RAS+ segmentation) per case id, from U-Nets of each spec thresholded
    at each probability: of the `fit` cases by cross-fitting over `folds` subject folds (needs at
    least 2 cases), or, with `predict`, of those cases by networks fitted on all of `fit`."""
    from tqdm.auto import tqdm

    if predict is None and len(fit) < 2:
        raise ValueError("cross-fitted U-Net candidates need at least 2 labelled cases")
    if predict is None:
        fold = _folds(len(fit), folds, seed)
        jobs = [([c for c, f in zip(fit, fold) if f != k], [c for c, f in zip(fit, fold) if f == k])
                for k in np.unique(fold)]
    else:
        jobs = [(list(fit), list(predict))]
    out: dict[str, list] = {c.case_id: [] for _, targets in jobs for c in targets}
    steps = [(spec, train, targets) for spec in specs for train, targets in jobs]
    for i, (spec, train, targets) in enumerate(tqdm(steps, desc="fitting U-Net segmenters", disable=not progress,
                                                    leave=False)):
        net = fit_unet(train, spec, seed=seed + i)
        for case in targets:
            prob = probability_volume(net, case)
            for t in thresholds:
                out[case.case_id].append((f"{spec.name}_p{t:g}", prob >= t))
    return out


def anomaly_candidates(run_dir: str | Path, cases: list[PreparedCase], factors=(0.7, 1.0, 1.4),
                       predictors: list[str | None] = (None,), label: str = "",
                       progress: bool = False) -> tuple[dict, dict]:
    """A trained run's segmentations per case id (source, bool RAS+ segmentation): for each
    predictor (None: the run's own), the post-processed anomaly map thresholded at each factor of the
    threshold calibrated on the run's healthy cases; and the last predictor's post-processed map per
    case (float32). `cases` must be prepared at the run's slicing. Sources read
    `<label>_<predictor>_x<factor>` (`<label>_x<factor>` for the run's own predictor)."""
    from anomaseg.calibration import calibrate

    segs: dict = {c.case_id: [] for c in cases}
    maps: dict = {}
    for predictor in predictors:
        scorer = calibrate(run_dir, predictor=predictor, progress=progress, force=True)
        for case in cases:
            smoothed = scorer.smoothed_volume(case)
            for f in factors:
                seg = scorer.post.segment(smoothed, f * scorer.post.threshold_) > 0
                segs[case.case_id].append(("_".join(x for x in (label, predictor, f"x{f:g}") if x), seg))
            maps[case.case_id] = smoothed
    return segs, maps


def balanced_candidates(truth: np.ndarray, candidates: list[tuple[str, np.ndarray]], n: int,
                        rng: np.random.Generator) -> list[tuple[str, np.ndarray, float]]:
    """Up to `n` of a case's candidates (source, segmentation, Dice), spread evenly over Dice."""
    from anomaseg.metrics import dice_score
    from anomaseg.quality.pool import select_balanced

    dices = [dice_score(seg, truth) for _, seg in candidates]
    return [(*candidates[i], dices[i]) for i in select_balanced(dices, n, rng)]


def write_candidates(candidates: dict[str, list[tuple[str, np.ndarray]]], references: dict, folder: str | Path) -> list[Path]:
    """Write each case's candidates to FOLDER/<source>/<case>_segmentation.nii.gz (uint8, on the
    grid of `references[case_id]`, a header-only `Volume`); returns the source folders, each one
    readable by `find_candidates`."""
    from anomaseg.data.io import save_like

    folder = Path(folder)
    written = set()
    for case_id, segs in candidates.items():
        for source, seg in segs:
            (folder / source).mkdir(parents=True, exist_ok=True)
            save_like(references[case_id], np.asarray(seg, np.uint8), folder / source / f"{case_id}_segmentation.nii.gz",
                      dtype=np.uint8)
            written.add(folder / source)
    return sorted(written)
