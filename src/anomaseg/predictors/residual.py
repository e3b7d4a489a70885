"""Reconstruction error: the classic predictor of Baur et al. (2018)."""

from __future__ import annotations

import torch

from anomaseg.predictors.base import Predictor, register_predictor

SIGNS = ("abs", "positive", "negative")


@register_predictor("residual", description="reconstruction error |x - recon| (or its positive/negative part)")
class ResidualPredictor(Predictor):
    """map = r(x - recon(x)), averaged over channels, with r = |.| ("abs"), max(., 0) ("positive":
    only tissue brighter than its healthy reconstruction, e.g. lesions on FLAIR) or max(-., 0)
    ("negative": only darker tissue, e.g. T1 hypo-intensities)."""

    def __init__(self, sign: str = "abs"):
        if sign not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
        self.sign = sign

    @torch.no_grad()
    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        diff = x.float() - model.reconstruct(x).float()
        if self.sign == "abs":
            diff = diff.abs()
        elif self.sign == "positive":
            diff = diff.clamp(min=0)
        else:
            diff = (-diff).clamp(min=0)
        return diff.mean(dim=1, keepdim=True)
