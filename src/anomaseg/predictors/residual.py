"""Reconstruction error: the classic predictor of Baur et al. (2018)."""

from __future__ import annotations

import torch

from anomaseg.predictors.base import Predictor, register_predictor
from anomaseg.predictors.polarity import check_combine, check_polarity, combine_channels, signed


@register_predictor("residual", description="reconstruction error x - recon, signed per modality (bright/dark/both)")
class ResidualPredictor(Predictor):
    """map = combine_c r_c(x_c - recon(x)_c): the reconstruction error of each channel taken in its
    polarity r_c ("bright": max(., 0), only tissue brighter than its healthy reconstruction, e.g.
    lesions on FLAIR; "dark": max(-., 0); "both": |.|), then the channels' mean (`combine="mean"`)
    or max. `polarity` is one value for every channel, a list (one per channel), or "auto" (each
    channel by its modality: FLAIR/T2 bright, others both; see polarity.py). Defaults:
    polarity="both" (the plain |x - recon| of the paper), combine="mean"."""

    def __init__(self, polarity="both", combine: str = "mean"):
        self.polarity = check_polarity(polarity)
        self.combine = check_combine(combine)

    @torch.no_grad()
    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        diff = x.float() - model.reconstruct(x).float()
        return combine_channels(signed(diff, self.channel_polarities(x.shape[1])), self.combine)
