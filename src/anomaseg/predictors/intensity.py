"""The intensity baseline: how far each voxel's intensity lies from healthy brain tissue, no network.

Meissen et al. (2021) showed that thresholding the (normalised, median-filtered) FLAIR intensity beats
most published autoencoders on brain MRI; every quality claim of this package is therefore reported
beside this predictor, on the same cases, through the same slicing, normalisation, post-processing
and healthy-calibrated threshold as the models' maps (`anomaseg evaluate` computes it in the same
pass, as `baseline`).

Per channel c (a modality, normalised like every model input: brain 1st/99th percentiles -> 0/1):

    fit:  m_c = median, s_c = 1.4826 * MAD of the healthy calibration slices' foreground pixels
          (pixels where any channel is non-zero, i.e. the brain; `foreground` in base.py)
    map:  max_c  r_c((x_c - m_c) / s_c)

with r_c the channel's polarity (polarity.py; "auto" = FLAIR/T2 "bright", T1/T1ce and unknown
modalities "both"). Channels are combined by their max (`combine="max"`, default): a voxel is as
anomalous as its most deviating modality. Robust statistics because healthy brains hold CSF, GM and
WM in different proportions: the median and the MAD describe the bulk of the tissue without being
pulled by the tails. At most `MAX_FIT_VALUES` pixels per channel enter the median (an even stride
over all foreground pixels beyond that), so memory stays bounded on large calibration sets.

Why a predictor and not a model: it needs no training, only healthy statistics, which is exactly a
predictor's `fit`; as a predictor it runs through the same Scorer, calibration, post-processing and
metrics as every model's map, in the same pass over the test set, and it can be an ensemble member.
It ignores the model (`requires = ()`): it works with every run.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from anomaseg.predictors.base import Predictor, foreground, register_predictor
from anomaseg.predictors.polarity import check_combine, check_polarity, combine_channels, signed

MAX_FIT_VALUES = 1 << 22
MAD_TO_STD = 1.4826  # MAD of a normal distribution times this = its standard deviation
EPS = 1e-6


@register_predictor("intensity", description="baseline without a network: healthy-intensity z-score per "
                                             "modality, signed by polarity, max over modalities")
class IntensityPredictor(Predictor):
    """map = max_c r_c((x_c - median_c) / (1.4826 MAD_c)), healthy statistics per channel (module
    docstring). Defaults: polarity="auto" (FLAIR/T2 bright, T1 both), combine="max"."""

    requires: tuple[str, ...] = ()

    def __init__(self, polarity="auto", combine: str = "max"):
        self.polarity = check_polarity(polarity)
        self.combine = check_combine(combine)

    def fit(self, model, healthy_batches: Iterable[torch.Tensor]) -> "IntensityPredictor":
        values: list[list[np.ndarray]] = []
        for x in healthy_batches:
            fg = foreground(x)[:, 0]
            if not values:
                values = [[] for _ in range(x.shape[1])]
            for c in range(x.shape[1]):
                values[c].append(x[:, c][fg].float().cpu().numpy())
        if not values:
            raise ValueError("no healthy batches to fit the intensity baseline on")
        self.centre_, self.spread_ = [], []
        for chunks in values:
            v = np.concatenate(chunks)
            if v.size > MAX_FIT_VALUES:
                v = v[:: -(-v.size // MAX_FIT_VALUES)]
            centre = float(np.median(v))
            spread = MAD_TO_STD * float(np.median(np.abs(v - centre)))
            self.centre_.append(centre)
            self.spread_.append(spread if spread > EPS else max(float(v.std()), EPS))
        return self

    @torch.no_grad()
    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "centre_"):
            raise RuntimeError("predictor 'intensity' needs fit(model, healthy_batches) (or load_fitted_state) first")
        if len(self.centre_) != x.shape[1]:
            raise ValueError(f"intensity baseline fitted on {len(self.centre_)} channels, got {x.shape[1]}")
        centre = torch.tensor(self.centre_, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        spread = torch.tensor(self.spread_, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        z = (x.float() - centre) / spread
        return combine_channels(signed(z, self.channel_polarities(x.shape[1])), self.combine)
