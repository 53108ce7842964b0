"""Deprecated alias: the fairness baselines now live in :mod:`hf_csr.fairness`."""

from ..fairness import *  # noqa: F401,F403
