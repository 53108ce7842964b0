"""Deprecated alias: the fairness baselines now live in :mod:`hf_csr.fairness` (``hf_csr.fairness.FRL`` ...)."""

import warnings

from ..fairness import *  # noqa: F401,F403

warnings.warn("hf_csr.baselines is deprecated; import from hf_csr.fairness instead.", DeprecationWarning, stacklevel=2)
