"""The anomaly score of Skip-GANomaly (Akcay et al. 2019), for models with a discriminator.

Per image x with reconstruction x_hat and discriminator features f(.) (the model's
`discriminator_features`, its penultimate layer):

    R(x) = mean over pixels and channels of |x - x_hat|        (reconstruction / contextual error)
    L(x) = mean over features of (f(x) - f(x_hat))^2           (latent error)
    score(x) = weight * R~(x) + (1 - weight) * L~(x),          weight = 0.9 (the paper's lambda)

where R~ and L~ are min-max scaled with the minimum and maximum of R and L over the *healthy*
calibration images seen by `fit` (never the test set: the official code scaled with the test set's
own extremes). Healthy images thus score in [0, 1]; anomalous ones may exceed 1. The score is an
image-level quantity over the whole image, as in the paper: `mask` is accepted for the protocol but
not used (`fit` sees unmasked healthy images; scaling must match). Higher = more anomalous.

The pixel map is the reconstruction error |x - x_hat| averaged over channels (the `residual`
predictor's "abs" map).
"""

from __future__ import annotations

from typing import Iterable

import torch

from anomaseg.predictors.base import Predictor, register_predictor
from anomaseg.predictors.residual import ResidualPredictor


@register_predictor("skip_ganomaly", description="Skip-GANomaly image score 0.9*reconstruction + 0.1*latent "
                                                 "(healthy min-max scaled); pixel map |x - recon|")
class SkipGANomalyPredictor(Predictor):
    requires = ("recon", "discriminator")

    def __init__(self, weight: float = 0.9):
        if not 0 <= weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        self.weight = weight

    @torch.no_grad()
    def errors(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled (R, L) per image, each (B,)."""
        recon = model.reconstruct(x)
        rec = (x.float() - recon.float()).abs().flatten(1).mean(1)
        fx, fr = model.discriminator_features(x).float(), model.discriminator_features(recon).float()
        lat = (fx - fr).pow(2).flatten(1).mean(1)
        return rec, lat

    def fit(self, model, healthy_batches: Iterable[torch.Tensor]) -> "SkipGANomalyPredictor":
        recs, lats = [], []
        for x in healthy_batches:
            rec, lat = self.errors(model, x)
            recs.append(rec.cpu())
            lats.append(lat.cpu())
        if not recs:
            raise ValueError("skip_ganomaly needs healthy images to fit its score scaling")
        rec, lat = torch.cat(recs), torch.cat(lats)
        self.rec_min_, self.rec_max_ = float(rec.min()), float(rec.max())
        self.lat_min_, self.lat_max_ = float(lat.min()), float(lat.max())
        self.n_fit_images_ = int(len(rec))
        return self

    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        return ResidualPredictor(polarity="both").anomaly_map(model, x)

    def score(self, model, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not hasattr(self, "rec_min_"):
            raise RuntimeError("skip_ganomaly predictor is not fitted: call fit() on healthy images first")
        rec, lat = self.errors(model, x)
        rec = (rec - self.rec_min_) / max(self.rec_max_ - self.rec_min_, 1e-12)
        lat = (lat - self.lat_min_) / max(self.lat_max_ - self.lat_min_, 1e-12)
        return self.weight * rec + (1 - self.weight) * lat
