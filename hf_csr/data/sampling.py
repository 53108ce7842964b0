"""Subsets of labelled data: class-stratified subsets and long-tailed subsets (exponential subsampling)."""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["stratified_subset", "long_tail_counts", "long_tail_indices"]

logger = logging.getLogger(__name__)


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``size`` random examples (all of them when ``size >= len(labels)``), taken
    round-robin over the classes (a random order within each class, chosen with ``seed``).

    Every class contributes equally until it runs out. On imbalanced data a subset with equal counts
    may be impossible (``size`` above K times the smallest class): then the small classes are kept
    whole and the other classes fill the remaining places -- the subset always has ``size`` examples,
    as balanced as the data allows, and an INFO line says so. Evaluation limits, validation subsets and
    ``limit=`` of the loaders all take their subsets here.
    """
    labels = np.asarray(labels)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"the subset size (limit) must be a positive number of examples; got {size!r}.")
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    # Order by (rank within the class, class): any prefix is as balanced as the data allows.
    index = np.concatenate(per_class)
    rank = np.concatenate([np.arange(len(p)) for p in per_class])
    klass = np.concatenate([np.full(len(p), i) for i, p in enumerate(per_class)])
    order = index[np.lexsort((klass, rank))]
    smallest = min(len(p) for p in per_class)
    if smallest * len(per_class) < size < len(labels):
        logger.info("stratified_subset: %d examples cannot have equal class counts (the smallest of the %d "
                    "classes has %d); the smaller classes are kept whole and the others fill the rest",
                    size, len(per_class), smallest)
    return np.sort(order[:size])


def long_tail_counts(n_max: int, num_classes: int, ratio: float = 100.0) -> List[int]:
    """``n_c = floor(n_max * ratio^(-c / (K - 1)))`` (at least 1): class 0 keeps ``n_max``, the last ``n_max / ratio``."""
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1; got {ratio}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}.")
    return [max(1, int(math.floor(n_max * ratio ** (-c / (num_classes - 1)) + 1e-9))) for c in range(num_classes)]


def long_tail_indices(labels: Sequence[int], ratio: float = 100.0, seed: int = 0,
                      order: Optional[Sequence[int]] = None) -> np.ndarray:
    """Sorted indices of an exponentially subsampled (long-tailed) subset of ``labels``.

    ``order`` lists the classes from head to tail (default 0, 1, ..., K-1); the head keeps every
    example of the smallest class count, the tail ``1/ratio`` of it."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    order = list(classes) if order is None else list(order)
    if sorted(order) != sorted(classes.tolist()):
        raise ValueError(f"order must be a permutation of the classes {classes.tolist()}; got {order}.")
    n_max = min(int((labels == c).sum()) for c in classes)
    counts = long_tail_counts(n_max, len(classes), ratio)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(order, counts)]
    return np.sort(np.concatenate(keep))
