"""Model registry: explicit names, an error on duplicates, a `tiny` configuration per model for tests.

    @register_model("spatial_vae", description="...", tiny=dict(base_channels=8, max_channels=16))
    class SpatialVAE(AnomalyModel): ...

    model = create_model("spatial_vae", in_channels=1, image_size=128)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    description: str
    tiny: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, description: str, tiny: dict | None = None):
    def decorator(constructor):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].constructor!r})")
        _REGISTRY[name] = ModelEntry(name, constructor, description, dict(tiny or {}))
        return constructor

    return decorator


def _ensure_builtin_models() -> None:
    # Imported here, explicitly, rather than by `import *` side effects scattered over the package.
    from anomaseg.models import autoencoders, skip_ganomaly, vaegan  # noqa: F401


def list_models() -> list[str]:
    _ensure_builtin_models()
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    _ensure_builtin_models()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, *, tiny: bool = False, **kwargs) -> nn.Module:
    """Build a registered model. `tiny=True` starts from the model's small test configuration.

    The keyword arguments used are stored on the model as `model.hparams` (with `name`), which is
    all a checkpoint needs to rebuild it.
    """
    entry = model_entry(name)
    params = {**(entry.tiny if tiny else {}), **kwargs}
    try:
        model = entry.constructor(**params)
    except TypeError as exc:
        raise TypeError(f"model {name!r}: {exc}") from None
    model.hparams = {"name": name, **params}
    return model
