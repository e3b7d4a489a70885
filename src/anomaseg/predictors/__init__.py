"""Anomaly-map predictors: residual, energy-based projection, VAE input gradients, combinations.

Built-in predictors register themselves when the registry is first used (`list_predictors`,
`create_predictor`); see `base.py` for the contract.
"""

from anomaseg.predictors.base import (Predictor, create_predictor, list_predictors, model_capabilities,
                                      predictor_entry, register_predictor, top_fraction_mean)

__all__ = ["Predictor", "create_predictor", "list_predictors", "model_capabilities", "predictor_entry",
           "register_predictor", "top_fraction_mean"]
