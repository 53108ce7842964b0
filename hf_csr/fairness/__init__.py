"""Fairness methods for :class:`~hf_csr.CSRTrainer`: the interface, the registry and the methods.

``fairness_method`` picks one by name: ``none`` (plain PGD-AT / TRADES), ``csr`` (this package's
method), and the baselines ``frl``, ``faal``, ``cfa``, ``wat``. Each method has its own settings
dataclass (``CSRConfig``, ``FRLConfig``, ...), one command-line flag per field. A method of your own
subclasses :class:`FairnessMethod` and registers with :func:`register_fairness_method` (see
``docs/fairness.md``). The built-in methods are imported on first use (``get_fairness_method``, or an
attribute of this package such as ``hf_csr.fairness.FRL``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import FairnessConfig, FairnessMethod, LossInputs, LossTerms, NoFairness
from .context import FairnessContext
from .registry import (
    BUILTIN_FAIRNESS_METHODS,
    FAIRNESS_REGISTRY,
    available_fairness_methods,
    config_flags,
    get_fairness_method,
    register_fairness_method,
)

# attribute -> module of a built-in method (imported on first access)
_LAZY = {
    "CSR": "csr", "CSRConfig": "csr",
    "FRL": "frl", "FRLConfig": "frl",
    "FAAL": "faal", "FAALConfig": "faal",
    "CFA": "cfa", "CFAConfig": "cfa",
    "WAT": "wat", "WATConfig": "wat",
}

__all__ = [
    "FairnessConfig", "FairnessMethod", "FairnessContext", "LossInputs", "LossTerms", "NoFairness",
    "FAIRNESS_REGISTRY", "BUILTIN_FAIRNESS_METHODS", "register_fairness_method", "get_fairness_method",
    "available_fairness_methods", "config_flags", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
