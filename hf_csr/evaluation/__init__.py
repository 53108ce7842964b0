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

from ..lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "AttackResult": ".report",
    "RobustnessReport": ".report",
    "classwise_agreement": ".report",
    "DEFAULT_ATTACKS": ".robustness",
    "evaluate_robustness": ".robustness",
    "AUTOATTACK_COMPONENTS": ".specs",
    "WORST_OF_ALL": ".specs",
    "AutoAttackConfig": ".specs",
    "CleanConfig": ".specs",
    "PGDConfig": ".specs",
    "parse_attack": ".specs",
    "parse_attacks": ".specs",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
