"""Confusional Spectral Regularization (CSR) in pure torch.

This module implements sections 1-4 of ``docs/method.md``:

* :func:`confusion_counts` / :func:`normalize_confusion` -- the robust confusion estimate ``C``
  (rows: the class an example is confused with, columns: its true class) for the ``paper`` and
  ``reference`` variants, with margin ``gamma``;
* :func:`top_singular_pair` / :func:`spectral_weights` -- ``W = u v^T``, the gradient of
  ``||C||_2`` with respect to ``C``, with the signs fixed non-negative (Perron-Frobenius) and the
  ``reference`` min-max scaling to ``[0.01, 2.01]``;
* :func:`csr_penalty` -- the penalty ``Psi`` (``W`` is a constant in the backward pass);
* :class:`ConfusionEstimator` -- a stateful estimate of ``C`` fed from the ``epoch``, ``ema`` or
  ``batch`` source, with counts summed across processes by an optional ``reduce_fn``.

Nothing here imports a Trainer and nothing loops over examples in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .validation import check_choice, check_labels_in_range

__all__ = [
    "VARIANTS",
    "CONFUSION_SOURCES",
    "REFERENCE_WEIGHT_RANGE",
    "BatchStatistics",
    "ConfusionEstimator",
    "check_gamma",
    "check_logits_and_labels",
    "confusion_counts",
    "normalize_confusion",
    "runner_up",
    "top_singular_pair",
    "spectral_weights",
    "weights_from_singular_vectors",
    "csr_penalty",
]

VARIANTS = ("paper", "reference")
CONFUSION_SOURCES = ("epoch", "ema", "batch")
#: ``reference`` weights are scaled to ``2 * (W - min) / (max - min) + 0.01``.
REFERENCE_WEIGHT_RANGE = (0.01, 2.01)

# Exact SVD below this many classes; warm-started power iteration (with an SVD fallback) above.
_EXACT_SVD_MAX_CLASSES = 64
_POWER_MAX_ITERS = 500
_POWER_TOL = 1e-12


def check_gamma(gamma: float, variant: str, name: str = "gamma", variant_name: str = "variant") -> float:
    """The confusion margin: finite, >= 0, and < 1 for the ``reference`` variant (the one check, used by the
    functions below and by the CSR settings, which pass their flag names)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"{name} must be a finite number; got {gamma!r}.")
    if gamma < 0:
        raise ValueError(f"{name} must be >= 0 (0 means 'misclassified'); got {gamma}.")
    if variant == "reference" and gamma >= 1:
        raise ValueError(
            f"{name} must lie in [0, 1) for {variant_name}='reference', which shrinks the true-class logit "
            f"to (1 - gamma) * z_y; got {gamma}."
        )
    return float(gamma)


def check_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``logits`` is a finite (N, K) tensor and ``labels`` (N,) in [0, K).

    One device synchronisation in the good case; the details are only computed on failure.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (N, K); got {shape}.")
    n, k = logits.shape
    if k < 2:
        raise ValueError(f"logits must have at least 2 classes (K >= 2); got K = {k}.")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point; got dtype {logits.dtype}.")
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape (N,) = ({n},) matching logits; got {shape}.")
    if labels.dtype in (torch.bool,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor of class indices; got dtype {labels.dtype}.")
    if n == 0:
        return
    bad = (labels < 0).any() | (labels >= k).any() | ~torch.isfinite(logits).all()
    if bool(bad):
        check_labels_in_range(labels, k, "labels")  # raises when a label is the problem
        n_bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        raise ValueError(
            f"logits contain NaN or inf in {n_bad} of {n} rows; the model diverged or the inputs are not finite."
        )


def runner_up(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``argmax_{i != y} z[i]`` for every row: the class each example is most confused with."""
    masked = logits.detach().scatter(1, labels[:, None], float("-inf"))
    return masked.argmax(dim=1)


def _pair_index(rows: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    return rows * k + cols


def confusion_counts(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    variant: str = "paper",
    gamma: float = 0.0,
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer confusion counts of one batch.

    Returns ``(counts, class_counts)``: ``counts[i, j]`` is the number of examples of true class ``j``
    confused with class ``i`` (zero diagonal) and ``class_counts[j] = m_j`` the number of examples of
    class ``j``. Both are ``int64`` on the logits' device, so that they can be summed exactly across
    processes before :func:`normalize_confusion` turns them into ``C``.

    ``paper``: ``r = argmax_{i != y} z_i``; the example counts at ``(r, y)`` when ``z_y <= gamma + z_r``.
    ``reference``: the true-class logit is shrunk to ``(1 - gamma) z_y``; ``p = argmax``; the example
    counts at ``(p, y)`` when ``p != y``.
    """
    check_choice("variant", variant, VARIANTS)
    check_gamma(gamma, variant)
    if validate:
        check_logits_and_labels(logits, labels)
    z = logits.detach()
    k = z.shape[1]
    if variant == "paper":
        other = runner_up(z, labels)
        z_true = z.gather(1, labels[:, None]).squeeze(1)
        z_other = z.gather(1, other[:, None]).squeeze(1)
        hit = z_true <= gamma + z_other
    else:
        z_true = z.gather(1, labels[:, None])
        shrunk = z.scatter(1, labels[:, None], z_true - gamma * z_true)
        other = shrunk.argmax(dim=1)
        hit = other != labels
    counts = torch.zeros(k * k, dtype=torch.long, device=z.device)
    counts.index_add_(0, _pair_index(other, labels, k), hit.long())
    class_counts = torch.bincount(labels, minlength=k)
    return counts.view(k, k), class_counts


def normalize_confusion(counts: torch.Tensor, class_counts: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """Turn (possibly averaged) counts into ``C``.

    ``paper``: ``C[i, j] = counts[i, j] / m_j`` (columns of absent classes are zero), as in eq. (1).
    ``reference``: the raw counts, as the released code uses them.
    """
    check_choice("variant", variant, VARIANTS)
    counts = counts.to(torch.float64)
    if variant == "reference":
        return counts
    m = class_counts.to(torch.float64)
    return torch.where(m > 0, counts / m.clamp_min(1e-300), torch.zeros_like(counts))


def _fix_signs(u: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # For a non-negative C the top singular vectors can be chosen non-negative (Perron-Frobenius);
    # numerically they come back with an arbitrary common sign and round-off negatives.
    return u.abs(), v.abs()


def top_singular_pair(
    matrix: torch.Tensor, v0: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triple ``(sigma, u, v)`` of a non-negative square matrix, with ``u, v >= 0``.

    Computed in float64 on the CPU. Up to 64 classes an exact SVD is used; above, a power iteration
    on ``C^T C`` warm-started from ``v0`` (the previous right vector), falling back to the exact SVD
    when it has not converged. For an all-zero matrix ``sigma = 0`` and ``u = v = 0``.
    """
    c = matrix.detach().to(device="cpu", dtype=torch.float64)
    k = c.shape[0]
    if not torch.any(c != 0):
        zeros = torch.zeros(k, dtype=torch.float64)
        return torch.zeros((), dtype=torch.float64), zeros, zeros.clone()
    if k > _EXACT_SVD_MAX_CLASSES:
        result = _power_iteration(c, v0)
        if result is not None:
            return result
    u_all, s_all, vh_all = torch.linalg.svd(c)
    u, v = _fix_signs(u_all[:, 0], vh_all[0])
    return s_all[0], u, v


def _power_iteration(
    c: torch.Tensor, v0: Optional[torch.Tensor]
) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    k = c.shape[0]
    if v0 is not None and v0.shape == (k,) and torch.any(v0 > 0):
        v = v0.detach().to(device="cpu", dtype=torch.float64).clamp_min(0) + 1e-3 / k
    else:
        v = torch.ones(k, dtype=torch.float64)
    v = v / v.norm()
    ctc = c.T @ c
    sigma_sq = torch.zeros((), dtype=torch.float64)
    for _ in range(_POWER_MAX_ITERS):
        w = ctc @ v
        sigma_sq = v @ w
        norm = w.norm()
        if norm == 0:
            return None
        v_next = w / norm
        residual = (w - sigma_sq * v).norm()
        v = v_next
        if residual <= _POWER_TOL * max(float(sigma_sq), 1e-300):
            sigma = torch.sqrt(sigma_sq.clamp_min(0))
            u = c @ v
            u = u / u.norm()
            u, v = _fix_signs(u, v)
            return sigma, u, v
    return None


def spectral_weights(
    confusion: torch.Tensor, variant: str = "paper", *, v0: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spectral weights ``W`` (K x K, float64, CPU) and the right singular vector used.

    ``W = u v^T = d||C||_2 / dC``. ``paper`` uses it as is; ``reference`` rescales it to
    ``2 (W - min W) / (max W - min W) + 0.01``. An all-zero ``C`` gives ``W = 0`` (``paper``: no
    penalty) or ``W = 1`` (``reference``: uniform weights); so does a constant ``W`` for ``reference``.
    """
    check_choice("variant", variant, VARIANTS)
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"the confusion matrix must be square (K, K); got {tuple(confusion.shape)}.")
    _, u, v = top_singular_pair(confusion, v0=v0)
    return weights_from_singular_vectors(u, v, variant), v


def weights_from_singular_vectors(u: torch.Tensor, v: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """``W = u v^T``, min-max scaled to [0.01, 2.01] for ``reference`` (constant ``W`` -> all ones)."""
    w = torch.outer(u, v)
    if variant == "reference":
        lo, hi = REFERENCE_WEIGHT_RANGE
        w_min, w_max = w.min(), w.max()
        spread = w_max - w_min
        if spread <= 1e-12 * max(float(w_max.abs()), 1e-300):
            return torch.ones_like(w)
        w = (hi - lo) * (w - w_min) / spread + lo
    return w


def csr_penalty(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    variant: str = "paper",
    gamma: float = 0.0,
    class_counts: Optional[torch.Tensor] = None,
    num_examples: Optional[int] = None,
    validate: bool = True,
) -> torch.Tensor:
    """The CSR penalty ``Psi`` on (adversarial) logits.

    ``paper`` (eq. 10-12): ``sum_{confused q} W[r_q, y_q] / m_{y_q} * CE(z_q + gamma (1 - e_{y_q}), y_q)``
    where ``m_j`` is ``class_counts`` (pass the *global* batch counts under data parallelism; defaults
    to this batch's counts).

    ``reference``: ``(1 / N) sum_q W[p_q, y_q] CE(z_q, y_q)`` with ``p_q = argmax z_q`` and ``N`` =
    ``num_examples`` (the global batch size; defaults to this batch's size).

    ``weights`` is treated as a constant: no gradient flows into it.
    """
    check_choice("variant", variant, VARIANTS)
    check_gamma(gamma, variant)
    if validate:
        check_logits_and_labels(logits, labels)
    n, k = logits.shape
    if weights.shape != (k, k):
        raise ValueError(f"weights must have shape (K, K) = ({k}, {k}); got {tuple(weights.shape)}.")
    if n == 0:
        return logits.sum() * 0.0
    w = weights.detach().to(device=logits.device, dtype=torch.float32)
    z = logits.float()
    if variant == "paper":
        other = runner_up(z, labels)
        z_true = z.detach().gather(1, labels[:, None]).squeeze(1)
        z_other = z.detach().gather(1, other[:, None]).squeeze(1)
        confused = (z_true <= gamma + z_other).float()
        if class_counts is None:
            class_counts = torch.bincount(labels, minlength=k)
        m = class_counts.to(device=logits.device, dtype=torch.float32).clamp_min(1.0)
        coef = w[other, labels] / m[labels] * confused
        margin = gamma * (1.0 - F.one_hot(labels, k).to(z.dtype))
        per_example = F.cross_entropy(z + margin, labels, reduction="none")
        return (coef * per_example).sum()
    predicted = z.detach().argmax(dim=1)
    coef = w[predicted, labels]
    per_example = F.cross_entropy(z, labels, reduction="none")
    total = n if num_examples is None else num_examples
    return (coef * per_example).sum() / total


@dataclass
class BatchStatistics:
    """Counts of one (global) batch, summed across processes.

    ``counts``/``class_counts`` are the confusion counts of :func:`confusion_counts`; ``correct[j]``
    counts the examples of class ``j`` whose plain argmax is right (for logging robust accuracy).
    """

    counts: torch.Tensor
    class_counts: torch.Tensor
    correct: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.class_counts.sum())

    def accuracy(self) -> float:
        n = self.num_examples
        return float(self.correct.sum()) / n if n else float("nan")

    def worst_class_accuracy(self) -> float:
        present = self.class_counts > 0
        if not bool(present.any()):
            return float("nan")
        per_class = self.correct[present].double() / self.class_counts[present].double()
        return float(per_class.min())


ReduceFn = Callable[[torch.Tensor], torch.Tensor]


class ConfusionEstimator:
    """A running estimate of the robust confusion matrix ``C`` and its spectral weights ``W``.

    Sources (``docs/method.md`` section 2):

    * ``ema``: every training step's counts (numerators and ``m_j`` separately) are folded into
      exponential moving averages ``S_t = mu S_{t-1} + (1 - mu) S_batch``; ``C = S_counts / S_m``.
    * ``batch``: ``C`` from the current global batch alone.
    * ``epoch``: ``C`` is set once per epoch from a full attack pass (:meth:`start_pass`,
      :meth:`accumulate`, :meth:`finish_pass`); training steps leave it unchanged.

    ``reduce_fn`` sums a tensor across processes (e.g. ``accelerator.reduce(t, "sum")``); every
    count goes through it before it is used, so all processes hold the same ``C``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        variant: str = "paper",
        gamma: float = 0.0,
        source: str = "ema",
        momentum: float = 0.99,
        reduce_fn: Optional[ReduceFn] = None,
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}.")
        check_choice("variant", variant, VARIANTS)
        check_choice("source", source, CONFUSION_SOURCES)
        check_gamma(gamma, variant)
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f"momentum (the EMA decay mu) must lie in [0, 1); got {momentum}.")
        self.num_classes = num_classes
        self.variant = variant
        self.gamma = float(gamma)
        self.source = source
        self.momentum = float(momentum)
        self.reduce_fn = reduce_fn
        k = num_classes
        self.counts = torch.zeros(k, k, dtype=torch.float64)
        self.class_counts = torch.zeros(k, dtype=torch.float64)
        self.num_updates = 0
        self.pass_tag: Optional[int] = None
        self._pass_counts: Optional[torch.Tensor] = None
        self._pass_class_counts: Optional[torch.Tensor] = None
        self._weights: Optional[torch.Tensor] = None
        self._sigma = 0.0
        self._right_vector: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ counting
    def _reduce(self, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Sum the tensors across processes with one collective call."""
        if self.reduce_fn is None:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        flat = self.reduce_fn(flat)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start : start + t.numel()].view_as(t))
            start += t.numel()
        return tuple(out)

    def batch_statistics(
        self, logits: torch.Tensor, labels: torch.Tensor, *, validate: bool = True
    ) -> BatchStatistics:
        """Counts of this batch, summed across processes (one ``reduce_fn`` call), on the CPU."""
        if logits.dim() == 2 and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the estimator was built for num_classes = {self.num_classes} but the logits have "
                f"{logits.shape[1]} columns."
            )
        counts, class_counts = confusion_counts(
            logits, labels, variant=self.variant, gamma=self.gamma, validate=validate
        )
        hit = (logits.detach().argmax(dim=1) == labels).long()
        correct = torch.zeros(self.num_classes, dtype=torch.long, device=labels.device).index_add_(0, labels, hit)
        counts, class_counts, correct = self._reduce(counts, class_counts, correct)
        return BatchStatistics(counts.cpu(), class_counts.cpu(), correct.cpu())

    def update(self, logits: torch.Tensor, labels: torch.Tensor, *, validate: bool = True) -> BatchStatistics:
        """Observe one training step's adversarial logits; returns the step's global statistics.

        ``ema`` and ``batch`` fold the counts into ``C``; ``epoch`` leaves ``C`` as the last pass set it.
        """
        stats = self.batch_statistics(logits, labels, validate=validate)
        self.update_from_statistics(stats)
        return stats

    def update_from_statistics(self, stats: BatchStatistics) -> None:
        if self.source == "epoch":
            return
        counts = stats.counts.to(torch.float64)
        class_counts = stats.class_counts.to(torch.float64)
        if self.source == "batch":
            self.counts, self.class_counts = counts, class_counts
        else:
            mu = self.momentum
            self.counts = mu * self.counts + (1.0 - mu) * counts
            self.class_counts = mu * self.class_counts + (1.0 - mu) * class_counts
        self.num_updates += 1
        self._weights = None

    # ------------------------------------------------------------------ epoch pass
    def start_pass(self) -> None:
        """Begin a full pass (``epoch`` source): counts are accumulated locally, reduced at the end."""
        k = self.num_classes
        self._pass_counts = torch.zeros(k, k, dtype=torch.long)
        self._pass_class_counts = torch.zeros(k, dtype=torch.long)

    def accumulate(self, logits: torch.Tensor, labels: torch.Tensor, *, validate: bool = True) -> None:
        if self._pass_counts is None:
            raise RuntimeError("call start_pass() before accumulate().")
        counts, class_counts = confusion_counts(
            logits, labels, variant=self.variant, gamma=self.gamma, validate=validate
        )
        device = counts.device
        if self._pass_counts.device != device:
            self._pass_counts = self._pass_counts.to(device)
            self._pass_class_counts = self._pass_class_counts.to(device)
        self._pass_counts += counts
        self._pass_class_counts += class_counts

    def finish_pass(self, tag: Optional[int] = None) -> None:
        """Sum the pass's counts across processes and make them the current ``C``.

        ``tag`` (e.g. the epoch) is remembered as :attr:`pass_tag`, so that a resumed run can tell
        that the pass for that epoch was already done.
        """
        if self._pass_counts is None:
            raise RuntimeError("call start_pass() before finish_pass().")
        counts, class_counts = self._reduce(self._pass_counts, self._pass_class_counts)
        self.counts = counts.cpu().to(torch.float64)
        self.class_counts = class_counts.cpu().to(torch.float64)
        self._pass_counts = self._pass_class_counts = None
        self.pass_tag = tag
        self.num_updates += 1
        self._weights = None

    # ------------------------------------------------------------------ outputs
    def confusion(self) -> torch.Tensor:
        """The current ``C`` (float64, CPU)."""
        return normalize_confusion(self.counts, self.class_counts, self.variant)

    def weights(self) -> torch.Tensor:
        """The current spectral weights ``W`` (float64, CPU), cached until ``C`` changes."""
        if self._weights is None:
            sigma, u, v = top_singular_pair(self.confusion(), v0=self._right_vector)
            self._weights = weights_from_singular_vectors(u, v, self.variant)
            self._sigma = float(sigma)
            if torch.any(v > 0):
                self._right_vector = v
        return self._weights

    def spectral_norm(self) -> float:
        """``||C||_2`` of the current estimate ``C`` (for ``reference``: of its raw counts)."""
        self.weights()
        return self._sigma

    def normalized_spectral_norm(self) -> float:
        """``||C||_2`` of the current counts normalised as in eq. (1) (columns / m_j), whatever the
        variant: comparable across variants and sources, for logging."""
        return float(top_singular_pair(normalize_confusion(self.counts, self.class_counts, "paper"))[0])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, object]:
        return {
            "num_classes": self.num_classes,
            "variant": self.variant,
            "gamma": self.gamma,
            "source": self.source,
            "momentum": self.momentum,
            "counts": self.counts.clone(),
            "class_counts": self.class_counts.clone(),
            "num_updates": self.num_updates,
            "pass_tag": self.pass_tag,
            # The warm start and the cached W make the continuation bit-identical after a resume.
            "right_vector": None if self._right_vector is None else self._right_vector.clone(),
            "weights": None if self._weights is None else self._weights.clone(),
            "sigma": self._sigma,
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        for key in ("num_classes", "variant", "gamma", "source"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"confusion-estimator state has {key} = {state[key]!r} but this estimator has "
                    f"{getattr(self, key)!r}; resume with the same CSR settings."
                )
        k = self.num_classes
        counts = torch.as_tensor(state["counts"], dtype=torch.float64)
        class_counts = torch.as_tensor(state["class_counts"], dtype=torch.float64)
        if counts.shape != (k, k) or class_counts.shape != (k,):
            raise ValueError(
                f"confusion-estimator state has shapes {tuple(counts.shape)} / {tuple(class_counts.shape)}; "
                f"expected ({k}, {k}) / ({k},)."
            )
        self.momentum = float(state.get("momentum", self.momentum))
        self.counts = counts.clone()
        self.class_counts = class_counts.clone()
        self.num_updates = int(state.get("num_updates", 0))
        self.pass_tag = state.get("pass_tag")
        right = state.get("right_vector")
        self._right_vector = None if right is None else torch.as_tensor(right, dtype=torch.float64).clone()
        weights = state.get("weights")
        self._weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64).clone()
        self._sigma = float(state.get("sigma", 0.0))
