from anomaseg.models.base import AnomalyModel, ModelOutput
from anomaseg.models.registry import create_model, list_models, model_entry, register_model

__all__ = ["AnomalyModel", "ModelOutput", "create_model", "list_models", "model_entry", "register_model"]
