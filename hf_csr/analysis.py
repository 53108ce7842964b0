"""The paper's analyses as functions (each has a recipe ``recipes/analysis_*.py`` writing a JSON and a plot).

* :func:`sharpness_sigma2` -- Table 8: the largest ``sigma^2`` in a grid ({0.01, 0.02, ..., 1}) such that
  every one of 50 Gaussian weight perturbations ``u ~ N(0, sigma^2 I)`` keeps the training-accuracy drop
  within 5 points (Jiang et al. 2020's sharpness-based sampling).
* :func:`nu_ratio` / :func:`nu_study` -- ``nu = ||C||_1 / ||C||_2`` (Sec. 3: the constant linking the
  worst-class error to the confusion matrix's spectral norm) over random confusion matrices and over a
  model's own (robust) confusion matrix.
* :func:`phi_prime` -- the model-dependent term of Prop. 3.1,
  ``Phi'(f_w) = (B + eps)^2 n^2 h ln(nh) prod_l ||W_l||_2^2 sum_l ||W_l||_F^2 / ||W_l||_2^2``, with its
  two factors reported separately (the product of squared spectral norms and the sum of ratios).
* :func:`difficulty_groups` / :func:`group_accuracy` -- Table 7: classes split into easy / medium / hard
  thirds by a reference model's per-class accuracy, accuracy per group.
* :func:`long_tail_indices` / :func:`shot_groups` -- Table 9: a long-tailed version of a dataset by
  exponential subsampling (``n_c = n_max * ratio^(-c/(K-1))``, ratio 100) and many / medium / few-shot
  groups (thirds of the classes by training count; ImageNet-LT's >100 / 20-100 / <20 thresholds are
  available with ``thresholds=(100, 20)``).
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .utils import as_logits, inputs_prevalidated

__all__ = [
    "long_tail_counts", "long_tail_indices", "shot_groups", "group_accuracy", "difficulty_groups",
    "nu_ratio", "random_confusion_matrices", "nu_study", "layer_matrices", "phi_prime",
    "sharpness_sigma2", "accuracy", "SIGMA2_GRID",
]

logger = logging.getLogger(__name__)

SIGMA2_GRID = tuple(round(0.01 * i, 2) for i in range(1, 101))


# --------------------------------------------------------------------------- long tail (Table 9)
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


def shot_groups(train_counts: Sequence[int], thresholds: Optional[Tuple[int, int]] = None) -> Dict[str, List[int]]:
    """Classes split into ``many`` / ``medium`` / ``few``-shot: by ``thresholds`` (many > t0 >= medium >= t1 > few)
    or, by default, thirds of the classes sorted by training count (ties by index)."""
    counts = np.asarray(train_counts)
    if thresholds is not None:
        high, low = thresholds
        return {"many": np.flatnonzero(counts > high).tolist(),
                "medium": np.flatnonzero((counts <= high) & (counts >= low)).tolist(),
                "few": np.flatnonzero(counts < low).tolist()}
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    return dict(zip(("many", "medium", "few"), (sorted(part) for part in np.array_split(order, 3))))


def group_accuracy(per_class_accuracy: Sequence[float], groups: Dict[str, Sequence[int]]) -> Dict[str, float]:
    """Mean of the per-class accuracies in each group (classes weighted equally, as Tables 7 and 9)."""
    acc = np.asarray(per_class_accuracy, dtype=float)
    return {name: float(acc[list(members)].mean()) if len(members) else float("nan") for name, members in groups.items()}


def difficulty_groups(per_class_accuracy: Sequence[float]) -> Dict[str, List[int]]:
    """Table 7 (after Cui et al. 2024): thirds of the classes by a reference model's accuracy -- easy
    (highest), medium, hard (lowest)."""
    acc = np.asarray(per_class_accuracy, dtype=float)
    order = sorted(range(len(acc)), key=lambda c: (-acc[c], c))
    return dict(zip(("easy", "medium", "hard"), (sorted(int(i) for i in part) for part in np.array_split(order, 3))))
