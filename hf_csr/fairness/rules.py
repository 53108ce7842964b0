"""The update rules of the four fairness baselines (hf_csr.fairness.frl / faal / cfa / wat), as pure functions (tensors in, tensors out).

Each function ports one step of an original's released code; the method classes only gather the
statistics (all-reduced across processes), call these and hand the results to the trainer. The
repository, commit and file each rule follows are named in its docstring and in docs/baselines.md.

* FRL (Xu et al. 2021; ``hannxu123/fair_robust`` @ a80547d, ``utils_frl2.py``, the RWRM variant run by
  ``frlrmrw.py``): :func:`frl_update_multipliers`, :func:`frl_normalize_multipliers`,
  :func:`frl_class_weights`, :func:`frl_eps_factors`, :func:`frl_loss`.
* FAAL (Zhang et al. 2024; ``TrustAI/FAAL`` @ b20ee9d, ``FAAL.py`` and ``ft_prn.py``):
  :func:`faal_margins`, :func:`faal_class_weights`.
* CFA (Wei et al. 2023; ``PKU-ML/CFA`` @ 071f333, ``train.py``, ``attack.py``, ``utils.py``):
  :func:`cfa_class_eps`, :func:`cfa_class_beta`, :func:`cfa_trades_loss`, :func:`cfa_fawa_update`.
* WAT (Li and Liu 2023; ``boqili/WAT`` @ 62d1184, ``worst_class_adversarial_train.py``):
  :func:`wat_validation_costs`, :func:`wat_class_weights`, :func:`wat_loss`.

All per-class inputs are *global* statistics: the callers sum them across processes first.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "frl_update_multipliers", "frl_normalize_multipliers", "frl_reweight_rate", "frl_class_weights", "frl_eps_factors", "frl_loss",
    "faal_margins", "faal_class_weights", "faal_kl_to_uniform",
    "cfa_class_eps", "cfa_class_beta", "cfa_trades_loss", "cfa_fawa_update",
    "wat_validation_costs", "wat_class_weights", "wat_loss", "wat_uniform_scale",
]


# ====================================================================================== FRL
def frl_normalize_multipliers(multipliers: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamp at 0 and, when the sum exceeds ``limit``, rescale so that it sums to ``limit``
    (``normalize_lambda`` in ``utils_frl2.py``)."""
    multipliers = multipliers.clamp_min(0.0)
    total = multipliers.sum()
    if float(total) > limit:
        multipliers = limit * multipliers / total
    return multipliers


def frl_update_multipliers(
    multipliers: torch.Tensor,
    clean_error: torch.Tensor,
    boundary_error: torch.Tensor,
    total_clean_error: float,
    total_boundary_error: float,
    *,
    tau_clean: float,
    tau_boundary: float,
    rate_reweight: float,
    rate_remargin: float,
    limit: float,
) -> torch.Tensor:
    """One epoch's multiplier update of FRL-RWRM (``frl_train`` in ``utils_frl2.py``).

    ``multipliers`` is (3, K): clean reweighting, boundary reweighting, remargin. With the violations
    ``g_nat = clean_error - total_clean_error - tau_clean`` and ``g_bndy = boundary_error -
    total_boundary_error - tau_boundary`` (class-wise errors on the validation split minus the
    overall ones):

        lambda_nat  <- normalize(lambda_nat  + rate_reweight * g_nat)
        lambda_bndy <- normalize(lambda_bndy + 2 * rate_reweight * g_bndy)
        lambda_rm   <- lambda_rm + rate_remargin * g_bndy          (not clamped, not normalised)

    ``normalize`` is :func:`frl_normalize_multipliers` with ``limit``."""
    multipliers = multipliers.double()
    g_nat = clean_error.double() - float(total_clean_error) - tau_clean
    g_bndy = boundary_error.double() - float(total_boundary_error) - tau_boundary
    nat = frl_normalize_multipliers(multipliers[0] + rate_reweight * g_nat, limit)
    bndy = frl_normalize_multipliers(multipliers[1] + rate_reweight * 2.0 * g_bndy, limit)
    remargin = multipliers[2] + rate_remargin * g_bndy
    return torch.stack([nat, bndy, remargin])


def frl_reweight_rate(rate: float, epoch: int, period: int = 40) -> float:
    """The reweighting step size of (0-based) ``epoch``: halved every ``period`` epochs (``frlrmrw.py``
    halves it before its 1-based epochs 40, 80, ...; ``period=0`` never halves)."""
    if period <= 0:
        return rate
    return rate / 2 ** ((epoch + 1) // period)


def frl_class_weights(multipliers: torch.Tensor) -> torch.Tensor:
    """``1/K + lambda_c - mean(lambda)`` (``cost_sensitive`` in ``utils_frl2.py``, written there for
    K = 10 as ``1/10 + 9/10 lambda_c - 1/10 sum_{j != c} lambda_j``)."""
    k = multipliers.numel()
    return 1.0 / k + multipliers - multipliers.mean()


def frl_eps_factors(remargin: torch.Tensor) -> torch.Tensor:
    """``clamp(exp(2 lambda_rm), 0.98, 3)``: the class's attack budget as a multiple of eps."""
    return torch.exp(2.0 * remargin).clamp(0.98, 3.0)


def frl_loss(ce: torch.Tensor, kl: torch.Tensor, labels: torch.Tensor, w_nat: torch.Tensor, w_bndy: torch.Tensor,
             beta: float) -> torch.Tensor:
    """``sum(w_nat[y] CE) / sum(w_nat[y]) + beta * sum(w_bndy[y] KL) / sum(w_bndy[y])`` over the batch
    (``train_model`` in ``utils_frl2.py``)."""
    a = w_nat.to(ce)[labels]
    b = w_bndy.to(kl)[labels]
    return (a * ce).sum() / a.sum() + beta * (b * kl).sum() / b.sum()


# ====================================================================================== FAAL
def faal_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: the largest other class's probability minus the true class's, on the softmax of
    the (adversarial) logits (``cw`` in ``ft_prn.py``), in [-1, 1]."""
    probs = F.softmax(logits.float(), dim=1)
    true = probs.gather(1, labels[:, None]).squeeze(1)
    others = probs.scatter(1, labels[:, None], float("-inf"))
    return others.max(dim=1).values - true


def faal_kl_to_uniform(p: torch.Tensor) -> float:
    """``KL(u || p) = sum_c (1/K) log((1/K) / p_c)``: the direction of ``cp.kl_div(Pemp, p)`` in ``FAAL.py``."""
    k = p.numel()
    return float((-math.log(k) - p.double().log()).mean())


def faal_class_weights(class_margin: torch.Tensor, class_counts: torch.Tensor, radius: float, steps: int = 200
                       ) -> torch.Tensor:
    """FAAL's class distribution (``DAW.solve_weight`` in ``FAAL.py``, solved there with cvxpy):

        max_p  sum_c n_c m_c p_c   s.t.  sum_c p_c = 1,  p >= 0,  KL(u || p) <= radius,

    with ``m_c`` the class's mean margin (:func:`faal_margins`; absent classes -1), ``n_c`` its count in
    the (global) batch -- the original sums ``p[y_i] m[y_i]`` over the batch's examples -- and ``u``
    uniform over all K classes. The KKT conditions give ``p_c ∝ 1 / (nu - a_c)`` with ``a = n m`` and
    ``nu > max a`` such that the KL constraint is active; ``KL(u || p(nu))`` falls monotonically in
    ``nu``, so ``nu`` is found by bisection (on ``log(nu - max a)``). ``radius <= 0`` (the original's
    ``r_choice == 0`` branch) and constant ``a`` give the uniform distribution. Float64, shape (K,)."""
    a = (class_counts.double() * class_margin.double()).flatten()
    k = a.numel()
    uniform = torch.full_like(a, 1.0 / k)
    spread = float(a.max() - a.min())
    if radius <= 0 or k == 1 or spread <= 0:
        return uniform
    gaps = a.max() - a  # >= 0, zero at the maximisers

    def distribution(log_t: float) -> torch.Tensor:
        log_inv = -torch.log(gaps + math.exp(log_t))
        return torch.exp(log_inv - torch.logsumexp(log_inv, dim=0))

    lo, hi = math.log(spread) - 60.0, math.log(spread) + 60.0  # KL(lo) > radius >= KL(hi) for any sane radius
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if faal_kl_to_uniform(distribution(mid)) > radius:
            lo = mid
        else:
            hi = mid
    return distribution(hi)  # the feasible end of the bracket


# ====================================================================================== CFA
def cfa_class_eps(train_robust_accuracy: torch.Tensor, eps: float, lam: float) -> torch.Tensor:
    """CCM: ``(lambda_1 + t_c) * eps`` with ``t_c`` the class's training robust accuracy of the last
    epoch (``train.py``)."""
    return (lam + train_robust_accuracy.double()) * eps


def cfa_class_beta(train_robust_accuracy: torch.Tensor, beta: float, lam: Optional[float]) -> torch.Tensor:
    """CCR's calibrated beta ``b_c = (lambda_2 + t_c) * beta``; ``lam=None`` (warm-up, or CCR off in the
    original) gives ``b_c = beta``. The loss is ``(CE + b_c KL) / (1 + b_c)`` (:func:`cfa_trades_loss`;
    the original stores the mixing weight ``b_c / (1 + b_c)``)."""
    t = train_robust_accuracy.double()
    if lam is None:
        return torch.full_like(t, float(beta))
    return (lam + t) * beta


def cfa_trades_loss(ce: torch.Tensor, kl: torch.Tensor, labels: torch.Tensor, class_beta: torch.Tensor) -> torch.Tensor:
    """``mean((1 - c_y) CE + c_y KL)`` with ``c = b / (1 + b)`` (``trades_loss`` / ``cw_trades_loss`` in
    ``attack.py``), i.e. ``mean((CE + b_y KL) / (1 + b_y))``."""
    b = class_beta.to(ce)[labels]
    mix = b / (1.0 + b)
    return ((1.0 - mix) * ce + mix * kl).mean()


def cfa_fawa_update(average: Optional[Dict[str, torch.Tensor]], current: Dict[str, torch.Tensor], decay: float,
                    worst_valid_accuracy: float, threshold: float) -> Tuple[Optional[Dict[str, torch.Tensor]], bool]:
    """FAWA (``train.py`` with ``weight_average`` in ``utils.py``): when the worst class's validation
    robust accuracy reaches ``threshold``, the first such epoch copies the weights and each later one
    folds them in, ``avg <- decay * avg + (1 - decay) * current`` (every state entry: BatchNorm buffers
    too; integer buffers are copied); otherwise the average is left as it is. Returns (average, taken)."""
    if worst_valid_accuracy < threshold:
        return average, False
    if average is None:
        return {k: v.detach().clone() for k, v in current.items()}, True
    updated = {}
    for key, value in current.items():
        old = average[key]
        if value.is_floating_point():
            updated[key] = (old * decay + value.detach().to(old) * (1.0 - decay)).to(value.dtype)
        else:
            updated[key] = value.detach().clone()
    return updated, True


# ====================================================================================== WAT
def wat_validation_costs(class_sums: torch.Tensor, num_images: float) -> torch.Tensor:
    """One validation pass's K + 1 costs (``validate`` in ``worst_class_adversarial_train.py``): with
    ``S_c`` the summed TRADES loss ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` of class ``c``'s validation
    images and ``M`` the number of images, ``cost_c = K * S_c / M`` and ``cost_K = sum_c S_c / M`` (the
    average). Float64, shape (K + 1,)."""
    sums = class_sums.double()
    k = sums.numel()
    m = float(num_images)
    return torch.cat([k * sums / m, (sums.sum() / m).reshape(1)])


def wat_class_weights(cumulative_costs: Optional[torch.Tensor], eta: float, num_classes: int) -> torch.Tensor:
    """Hedge over the K + 1 entries, normalised to K: ``K * softmax(eta * sum of past costs)``; before
    the first validation (``cumulative_costs=None``, epoch 0) all K + 1 weights are 1, as the original
    initialises them."""
    if cumulative_costs is None:
        return torch.ones(num_classes + 1, dtype=torch.float64)
    return num_classes * torch.softmax(eta * cumulative_costs.double(), dim=0)


def wat_loss(ce_nat: torch.Tensor, kl: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum_i w_{y_i} (CE_i + beta KL_i) / N + w_K * mean(CE + beta KL)`` (``train`` in
    ``worst_class_adversarial_train.py``): each example weighs ``w_{y_i} + w_K``."""
    w = weights.to(ce_nat)
    per_example = ce_nat + beta * kl
    return (w[labels] * per_example).mean() + w[-1] * per_example.mean()


def wat_uniform_scale(num_classes: int, first_epoch: bool) -> float:
    """The example weight ``w_y + w_K`` at equal weights: 2 in epoch 0 (all ones), ``2K / (K + 1)`` later."""
    return 2.0 if first_epoch else 2.0 * num_classes / (num_classes + 1)
