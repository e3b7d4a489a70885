"""The predictor contract (scikit-learn style) and the predictor registry.

A predictor turns a trained model and an image batch into a per-pixel anomaly map:

- `__init__(**hyper_parameters)` only stores them;
- `fit(model, healthy_batches)` calibrates whatever the predictor needs on healthy data into
  attributes ending in `_` and returns self (most predictors need nothing);
- `anomaly_map(model, x) -> (B, 1, H, W)`: higher = more anomalous (the opposite sign of
  scikit-learn's `score_samples`);
- `score(model, x, mask) -> (B,)`: one anomaly score per image, higher = more anomalous.

`requires` names what the predictor needs from a model: "recon" (a reconstruction; every model),
"vae" (a posterior: `encode` returning (mu, logvar), `decode`, and a KL weight `beta`) or
"discriminator" (`discriminator_features(x)`: the feature maps of an adversarial model's discriminator).
An empty `requires` (the `intensity` baseline) means the predictor ignores the model.

`set_modalities(names)` tells a predictor which modality each input channel holds (the run's
`data.modalities`; stored as the fitted attribute `modalities_`); polarity-aware predictors use it
to resolve `polarity="auto"` per channel (see `polarity.py`).
"""

from __future__ import annotations

from typing import ClassVar, Iterable

import torch

from anomaseg.registry import Entry, Registry

TOP_FRACTION = 0.01  # image score: mean of the highest 1% of the map inside the brain


def top_fraction_mean(maps: torch.Tensor, mask: torch.Tensor | None = None,
                      fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Per image: mean of the highest `fraction` of map values (inside `mask`). (B, ...) -> (B,).

    A mean of the top values rather than the maximum: one hot pixel should not decide an image.
    """
    flat = maps.flatten(1).float()
    m = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.flatten(1).bool()
    counts = m.sum(1)
    k_each = (counts.float() * fraction).ceil().clamp(min=1)
    k = min(int(k_each.max()), flat.shape[1])
    top = torch.where(m, flat, torch.full_like(flat, -torch.inf)).topk(k, dim=1).values
    rank = torch.arange(k, device=flat.device)[None]
    use = (rank < k_each[:, None]) & (rank < counts[:, None])  # an empty mask scores 0
    return torch.where(use, top, torch.zeros_like(top)).sum(1) / use.sum(1).clamp(min=1)


def foreground(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels where any channel is non-zero (all pixels if there is none).

    Slices are zero outside the brain, so on healthy calibration batches this is the brain (less the
    few voxels at or below the normalisation's low percentile in every channel).
    """
    fg = x.detach().abs().amax(dim=1, keepdim=True) > 0
    return fg if bool(fg.any()) else torch.ones_like(fg)


def model_capabilities(model) -> set[str]:
    caps = {"recon"}
    if getattr(model, "variational", False) and hasattr(model, "encode") and hasattr(model, "decode"):
        caps.add("vae")
    if callable(getattr(model, "discriminator_features", None)):
        caps.add("discriminator")  # adversarial models: discriminator feature maps f(x)
    return caps


class Predictor:
    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ("recon",)

    def fit(self, model, healthy_batches: Iterable[torch.Tensor]) -> "Predictor":
        return self

    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, model, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return top_fraction_mean(self.anomaly_map(model, x), mask)

    def predict(self, model, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly_map, score) of a batch; computes the map once when `score` is the default."""
        maps = self.anomaly_map(model, x)
        if type(self).score is Predictor.score:
            return maps, top_fraction_mean(maps, mask)
        return maps, self.score(model, x, mask)

    def supports(self, model) -> bool:
        return set(self.requires) <= model_capabilities(model)

    def set_modalities(self, modalities) -> "Predictor":
        """The modality of each input channel, in order (e.g. the run's ["flair", "t2"])."""
        from anomaseg.data.cases import canonical_modality

        self.modalities_ = [canonical_modality(m) for m in modalities]
        return self

    def channel_polarities(self, n_channels: int) -> tuple[str, ...]:
        """Per channel: the polarity of a predictor with a `polarity` parameter (polarity.py)."""
        from anomaseg.predictors.polarity import channel_polarities

        return channel_polarities(self.polarity, getattr(self, "modalities_", None), n_channels)

    def get_params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    def fitted_state(self) -> dict:
        """Learned attributes (ending in `_`) as plain Python values, for calibration.json."""
        out = {}
        for k, v in vars(self).items():
            if k.endswith("_") and not k.startswith("_"):
                out[k] = v.tolist() if isinstance(v, torch.Tensor) else v
        return out

    def load_fitted_state(self, state: dict) -> "Predictor":
        for k, v in state.items():
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def _load_builtin_predictors() -> None:
    # Imported here, explicitly, so that every built-in predictor is registered before any lookup.
    from anomaseg.predictors import adversarial, ensemble, gradients, intensity, projection, residual  # noqa: F401


PREDICTORS = Registry("predictor", _load_builtin_predictors)
list_predictors = PREDICTORS.names


def register_predictor(name: str, *, description: str):
    def decorator(cls):
        cls.name = name
        return PREDICTORS.register(name, description=description)(cls)

    return decorator


def predictor_entry(name: str) -> Entry:
    return PREDICTORS.entry(name)


def create_predictor(name: str, **params) -> Predictor:
    return PREDICTORS.build(name, **params)
