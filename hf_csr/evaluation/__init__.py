"""Robust evaluation, class by class (``docs/method.md`` sections 6 and 7).

* :func:`evaluate_robustness` -- clean, PGD-20, CW-20 and AutoAttack accuracy of any classifier taking
  [0, 1] images, with per-class accuracy, the worst class, the robust confusion matrix of eq. (1) and
  its norms, per attack and for the pointwise worst case over all attacks (``worst_of_all``);
* :class:`RobustnessReport` -- ``results.json`` (:meth:`~RobustnessReport.to_dict`), a Markdown table,
  the flags that make robust numbers untrustworthy, and the train-vs-test agreement of the paper's Fig. 2;
* :func:`classwise_agreement` -- Kendall's tau and covariance of two per-class accuracy vectors;
* :mod:`hf_csr.evaluation.plots` -- the paper's Fig. 2 and Fig. 3 and per-class accuracy bars;
* :mod:`hf_csr.evaluation.sharding` -- per-example keyed randomness and the split of an evaluation across
  ``torch.distributed`` processes (``evaluate_robustness(..., distributed=True)``), which give the same
  numbers however the evaluation is split.
"""

from .report import AttackResult, RobustnessReport, classwise_agreement
from .robustness import DEFAULT_ATTACKS, evaluate_robustness
from .specs import (
    AUTOATTACK_COMPONENTS,
    WORST_OF_ALL,
    AutoAttackConfig,
    CleanConfig,
    PGDConfig,
    parse_attack,
    parse_attacks,
)

__all__ = [
    "AUTOATTACK_COMPONENTS",
    "DEFAULT_ATTACKS",
    "WORST_OF_ALL",
    "AttackResult",
    "AutoAttackConfig",
    "CleanConfig",
    "PGDConfig",
    "RobustnessReport",
    "classwise_agreement",
    "evaluate_robustness",
    "parse_attack",
    "parse_attacks",
]
