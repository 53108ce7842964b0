"""Fairness methods for :class:`~hf_csr.CSRTrainer`: the interface, the registry and the methods
(``frl``, ``faal``, ``cfa``, ``wat``)."""

from .base import FAIRNESS_REGISTRY, FairnessMethod, register_fairness_method
from .cfa import CFA, calibrated_budgets
from .faal import FAAL, kl_ball_worst_case
from .frl import FRL, frl_multiplier_update
from .wat import WAT, hedge_weights

__all__ = ["FAIRNESS_REGISTRY", "FairnessMethod", "register_fairness_method", "CFA", "FAAL", "FRL", "WAT",
           "calibrated_budgets", "frl_multiplier_update", "hedge_weights", "kl_ball_worst_case"]
