"""Fairness baselines in the same Trainer: ``fairness_method`` = ``frl``, ``faal``, ``cfa`` or ``wat``.

Importing this package registers them in :data:`hf_csr.fairness.FAIRNESS_REGISTRY` (the trainer
does). Each module's docstring gives its paper, its hyper-parameters and where their defaults come from.
"""

from .cfa import CFA, calibrated_budgets
from .faal import FAAL, kl_ball_worst_case
from .frl import FRL, frl_multiplier_update
from .wat import WAT, hedge_weights

__all__ = ["CFA", "FAAL", "FRL", "WAT", "calibrated_budgets", "frl_multiplier_update", "hedge_weights", "kl_ball_worst_case"]
