"""Model registry: explicit names, an error on duplicates, a `tiny` configuration per model for tests.

    @register_model("spatial_vae", description="...", tiny=dict(base_channels=8, max_channels=16))
    class SpatialVAE(AnomalyModel): ...

    model = create_model("spatial_vae", in_channels=1, image_size=128)
"""

from __future__ import annotations

import torch.nn as nn

from anomaseg.registry import Entry, Registry


def _load_builtin_models() -> None:
    # Imported here, explicitly, rather than by `import *` side effects scattered over the package.
    from anomaseg.models import autoencoders, cddpm, dae, ddpm, mddpm, skip_ganomaly, vaegan  # noqa: F401


MODELS = Registry("model", _load_builtin_models)
register_model = MODELS.register
list_models = MODELS.names


def model_entry(name: str) -> Entry:
    return MODELS.entry(name)


def create_model(name: str, *, tiny: bool = False, **kwargs) -> nn.Module:
    """Build a registered model. `tiny=True` starts from the model's small test configuration.

    The keyword arguments used are stored on the model as `model.hparams` (with `name`), which is
    all a checkpoint needs to rebuild it.
    """
    params = {**(model_entry(name).tiny if tiny else {}), **kwargs}
    model = MODELS.build(name, **params)
    model.hparams = {"name": name, **params}
    return model
