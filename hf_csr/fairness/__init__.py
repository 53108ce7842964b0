"""Fairness methods for :class:`~hf_csr.CSRTrainer`: the interface, the registry and the methods.

``fairness_method`` picks one by name: ``none`` (plain PGD-AT / TRADES), ``csr`` (this package's
method), and the baselines ``frl``, ``faal``, ``cfa``, ``wat``. Each method has its own settings
dataclass (``CSRConfig``, ``FRLConfig``, ...), one command-line flag per field. A method of your own
subclasses :class:`FairnessMethod` and registers with :func:`register_fairness_method` (see
``docs/fairness.md``). Every name here is imported on first use (``get_fairness_method``, or an attribute of this package
such as ``hf_csr.fairness.FRL``).
"""

from ..lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "FairnessConfig": ".base",
    "FairnessMethod": ".base",
    "LossInputs": ".base",
    "LossTerms": ".base",
    "NoFairness": ".base",
    "FairnessContext": ".context",
    "BUILTIN_FAIRNESS_METHODS": ".registry",
    "FAIRNESS_REGISTRY": ".registry",
    "available_fairness_methods": ".registry",
    "config_flags": ".registry",
    "get_fairness_method": ".registry",
    "register_fairness_method": ".registry",
    "CSR": ".csr",
    "CSRConfig": ".csr",
    "FRL": ".frl",
    "FRLConfig": ".frl",
    "FAAL": ".faal",
    "FAALConfig": ".faal",
    "CFA": ".cfa",
    "CFAConfig": ".cfa",
    "WAT": ".wat",
    "WATConfig": ".wat",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
