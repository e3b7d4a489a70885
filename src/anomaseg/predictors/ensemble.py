"""Predictors that combine other predictors' maps, with scales fitted on healthy data.

Healthy statistics are taken over the *foreground* pixels of the healthy calibration slices (pixels
where any channel is non-zero: the brain, since slices are zero outside it; a batch without any
non-zero pixel counts all its pixels), as a mean and a population standard deviation accumulated in
float64 over every healthy batch.

- `combi` (Zimmerer et al. 2019): the reconstruction error times the normalised KL gradient.
- `ensemble` (Zhou, Deng & Wu 2020): any list of registered predictors, each normalised by its
  healthy statistics, combined by mean, max or product.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from anomaseg.predictors.base import Predictor, create_predictor, foreground, register_predictor
from anomaseg.predictors.gradients import eval_mode, gradient_map
from anomaseg.predictors.residual import ResidualPredictor

EPS = 1e-12


class PixelStats:
    """Streaming mean and population std of map values at masked pixels (float64 sums)."""

    def __init__(self):
        self.n, self.total, self.total_sq = 0, 0.0, 0.0

    def update(self, maps: torch.Tensor, mask: torch.Tensor) -> None:
        v = maps.detach()[mask.expand_as(maps)].double()
        self.n += v.numel()
        self.total += float(v.sum())
        self.total_sq += float((v * v).sum())

    @property
    def mean(self) -> float:
        if not self.n:
            raise ValueError("no healthy pixels to fit on")
        return self.total / self.n

    @property
    def std(self) -> float:
        return math.sqrt(max(self.total_sq / self.n - self.mean**2, 0.0))


def _not_fitted(name: str) -> RuntimeError:
    return RuntimeError(f"predictor {name!r} needs fit(model, healthy_batches) (or load_fitted_state) first")


# --------------------------------------------------------------------------- combi
COMBI_MODES = ("product", "sum")


@register_predictor("combi", description="residual x normalised |dKL/dx| (Zimmerer et al. 2019), or their z-score sum")
class CombiPredictor(Predictor):
    """With R = |x - g(mu(x))| (channel mean; the `residual` predictor, decoding the posterior mean in
    eval mode) and K = G_sigma * |d kl/dx| (the `grad_kl` map, see gradients.py):

        mode="product" (default, Zimmerer et al.'s "combi"):  map = R * K / mean_K
        mode="sum":                                            map = (R - mean_R)/std_R + (K - mean_K)/std_K

    mean_*/std_* are fitted on healthy foreground pixels (`residual_mean_`, `residual_std_`,
    `grad_kl_mean_`, `grad_kl_std_`). In "product" the scale only makes the map unit-free (it changes
    no ranking); in "sum" it sets the weight of the two terms. Defaults: mode="product", sigma=2 px.
    """

    requires = ("vae",)

    def __init__(self, mode: str = "product", sigma: float = 2.0):
        if mode not in COMBI_MODES:
            raise ValueError(f"mode must be one of {COMBI_MODES}, got {mode!r}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.mode = mode
        self.sigma = float(sigma)

    def _terms(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with eval_mode(model):
            residual = ResidualPredictor(polarity="both").anomaly_map(model, x).float()
        return residual, gradient_map(model, x, "kl", sigma=self.sigma)

    def fit(self, model, healthy_batches: Iterable[torch.Tensor]) -> "CombiPredictor":
        stats = PixelStats(), PixelStats()
        for x in healthy_batches:
            fg = foreground(x)
            for s, m in zip(stats, self._terms(model, x)):
                s.update(m, fg)
        self.residual_mean_, self.residual_std_ = stats[0].mean, stats[0].std
        self.grad_kl_mean_, self.grad_kl_std_ = stats[1].mean, stats[1].std
        return self

    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "grad_kl_mean_"):
            raise _not_fitted(self.name)
        residual, grad = self._terms(model, x)
        if self.mode == "product":
            return residual * grad / max(self.grad_kl_mean_, EPS)
        return ((residual - self.residual_mean_) / max(self.residual_std_, EPS)
                + (grad - self.grad_kl_mean_) / max(self.grad_kl_std_, EPS))


# --------------------------------------------------------------------------- ensemble
COMBINES = ("mean", "max", "product")
DEFAULT_MEMBERS = ({"name": "residual"}, {"name": "grad_kl"})


def _member_spec(member) -> dict:
    if isinstance(member, str):
        return {"name": member, "params": {}}
    if isinstance(member, dict) and "name" in member and set(member) <= {"name", "params"}:
        params = member.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError(f"ensemble member params must be a mapping, got {params!r}")
        return {"name": str(member["name"]), "params": dict(params)}
    raise ValueError(f"an ensemble member is a predictor name or {{'name': ..., 'params': {{...}}}}, got {member!r}")


@register_predictor("ensemble", description="members normalised on healthy data, combined by mean/max/product")
class EnsemblePredictor(Predictor):
    """Combines member predictors' maps m_k, each normalised with statistics of its map over healthy
    foreground pixels (fitted in `fit`: `mean_[k]`, `std_[k]`):

        combine="mean" (default):  map = mean_k (m_k - mean_k) / std_k     (z-scores: unit-free, centred)
        combine="max":             map = max_k  (m_k - mean_k) / std_k
        combine="product":         map = prod_k  m_k / mean_k              (ratios: maps are >= 0, so
                                                                            products of z-scores would flip)

    An ensemble of one member is therefore that member's map normalised the same way. Members are
    predictor names or {"name": ..., "params": {...}}, the `intensity` baseline included (e.g.
    members=["residual", "intensity"]: a model's map and the baseline); each member is fitted (on the
    same healthy batches) before the statistics are taken. The default, pre-declared ensemble is
    residual + grad_kl, combined by mean (Zhou, Deng & Wu's best pair was reconstruction error with a
    KL-gradient predictor; chosen before looking at any test data). `fitted_state()` holds the
    statistics and every member's own fitted state; it is plain JSON.
    """

    def __init__(self, members=None, combine: str = "mean"):
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        specs = [_member_spec(m) for m in (DEFAULT_MEMBERS if members is None else members)]
        if not specs:
            raise ValueError("an ensemble needs at least one member")
        self.members = specs
        self.combine = combine
        self._predictors = [create_predictor(s["name"], **s["params"]) for s in specs]

    @property
    def requires(self) -> tuple[str, ...]:  # what every member needs
        return tuple(sorted({r for p in self._predictors for r in p.requires}))

    def supports(self, model) -> bool:
        return all(p.supports(model) for p in self._predictors)

    def set_modalities(self, modalities) -> "EnsemblePredictor":
        super().set_modalities(modalities)
        for p in self._predictors:
            p.set_modalities(modalities)
        return self

    def fit(self, model, healthy_batches: Iterable[torch.Tensor]) -> "EnsemblePredictor":
        batches = list(healthy_batches)  # iterated once per member, then once for the statistics
        for p in self._predictors:
            p.fit(model, iter(batches))
        stats = [PixelStats() for _ in self._predictors]
        with eval_mode(model):
            self._fit_stats(model, batches, stats)
        self.mean_ = [s.mean for s in stats]
        self.std_ = [s.std for s in stats]
        return self

    def _fit_stats(self, model, batches, stats) -> None:
        for x in batches:
            fg = foreground(x)
            for s, p in zip(stats, self._predictors):
                s.update(p.anomaly_map(model, x).float(), fg)

    def normalise(self, k: int, m: torch.Tensor) -> torch.Tensor:
        """Member k's map on the ensemble's common scale (see the class docstring)."""
        if self.combine == "product":
            return m / max(self.mean_[k], EPS)
        return (m - self.mean_[k]) / max(self.std_[k], EPS)

    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "mean_"):
            raise _not_fitted(self.name)
        with eval_mode(model):
            maps = torch.stack([self.normalise(k, p.anomaly_map(model, x).float()) for k, p in enumerate(self._predictors)])
        if self.combine == "mean":
            return maps.mean(0)
        if self.combine == "max":
            return maps.amax(0)
        return maps.prod(0)

    def fitted_state(self) -> dict:
        if not hasattr(self, "mean_"):
            return {}
        return {"mean_": [float(v) for v in self.mean_], "std_": [float(v) for v in self.std_],
                "member_states_": [p.fitted_state() for p in self._predictors]}

    def load_fitted_state(self, state: dict) -> "EnsemblePredictor":
        if not state:
            return self
        member_states = state.get("member_states_", [{}] * len(self._predictors))
        if not (len(state["mean_"]) == len(state["std_"]) == len(member_states) == len(self._predictors)):
            raise ValueError(f"fitted state has {len(state['mean_'])} members, this ensemble {len(self._predictors)}")
        self.mean_ = [float(v) for v in state["mean_"]]
        self.std_ = [float(v) for v in state["std_"]]
        for p, s in zip(self._predictors, member_states):
            p.load_fitted_state(s)
        return self
