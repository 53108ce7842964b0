"""FAAL -- Fairness-Aware Adversarial Learning (Zhang, Zhang, Guo, Wang, Lin; CVPR 2024).

Each batch's loss is the worst case over class distributions ``q`` in a KL ball around the uniform
distribution ``u`` over the classes present in the batch:

    max_q  sum_c q_c L_c   s.t.  KL(q || u) <= rho,  q in the simplex,

with ``L_c`` the mean base loss (adversarial CE for ``pgd``, CE + beta * KL for ``trades``) of class
``c`` in the batch. The maximiser is an exponential tilting ``q_c ∝ exp(L_c / lam)``; the dual
variable ``lam > 0`` is found by bisection (in log space) so that ``KL(q || u) = rho`` -- a 1-D
search, no convex solver. When ``rho >= log K`` the ball holds the point mass on the largest loss,
which is the answer (ties share it). The weights are detached (the class distribution is the
adversary's choice, not differentiated through) and enter the loss as example weights
``N * q_{y_i} / n_{y_i}`` (so ``mean(w * l) = sum_c q_c L_c``).

Hyper-parameters: ``faal_rho`` (radius of the KL ball; set here: 0.1 -- we could not find the
released value) and ``faal_search_steps`` (bisection steps; 50). ``rho = 0`` gives ``q = u``: on a
class-balanced batch exactly the base method's update. The paper combines FAAL with AT and with AWP
(``awp_gamma``) and fine-tunes for 2 epochs; TRADES works too (Table 3 of the CSR paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .base import FairnessConfig, FairnessMethod
from .registry import register_fairness_method
from .common import per_class_mean

__all__ = ["FAAL", "FAALConfig", "kl_ball_worst_case"]


def _tilt(losses: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.softmax(losses / lam, dim=0)


def _kl_to_uniform(q: torch.Tensor) -> float:
    k = q.numel()
    positive = q > 0
    return float((q[positive] * (q[positive] * k).log()).sum())


def kl_ball_worst_case(losses: torch.Tensor, rho: float, steps: int = 50) -> torch.Tensor:
    """argmax_q ``q . losses`` over the simplex with ``KL(q || uniform) <= rho`` (float64, shape of ``losses``)."""
    losses = losses.detach().double().flatten()
    k = losses.numel()
    uniform = torch.full_like(losses, 1.0 / k)
    spread = float(losses.max() - losses.min())
    if rho <= 0 or k == 1 or spread <= 0:
        return uniform
    if rho >= math.log(k) - 1e-12:
        top = (losses == losses.max()).double()
        point = top / top.sum()
        if _kl_to_uniform(point) <= rho:
            return point
    # KL(q_lam || u) decreases in lam: bisection for KL = rho on log(lam).
    lo, hi = math.log(spread) - 40.0, math.log(spread) + 40.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if _kl_to_uniform(_tilt(losses, math.exp(mid))) > rho:
            lo = mid
        else:
            hi = mid
    return _tilt(losses, math.exp(hi))  # the feasible end of the bracket


@dataclass
class FAALConfig(FairnessConfig):
    """FAAL's settings (flags ``--faal_*``)."""

    rho: float = field(default=0.1, metadata={"help": "FAAL: radius of the KL ball around uniform class weights (0 = base method; set here)."})
    search_steps: int = field(default=50, metadata={"help": "FAAL: bisection steps of the 1-D search on the dual variable."})

    def __post_init__(self) -> None:
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not math.isfinite(self.rho) or self.rho < 0:
            raise ValueError(f"faal_rho must be a finite number >= 0; got {self.rho!r}.")
        if not isinstance(self.search_steps, int) or isinstance(self.search_steps, bool) or self.search_steps < 1:
            raise ValueError(f"faal_search_steps must be a positive integer; got {self.search_steps!r}.")

@register_fairness_method("faal")
class FAAL(FairnessMethod):
    config_class = FAALConfig

    def __init__(self, config: FAALConfig, context) -> None:
        super().__init__(config, context)
        self._last_max = 0.0

    def example_weights(self, labels: torch.Tensor, losses: torch.Tensor) -> Optional[torch.Tensor]:
        k = self.num_classes
        means, counts = per_class_mean(losses.detach().double(), labels, k)
        present = counts > 0
        q_present = kl_ball_worst_case(means[present], self.config.rho, self.config.search_steps)
        q = torch.zeros(k, dtype=torch.float64, device=losses.device)
        q[present] = q_present
        self._last_max = float(q_present.max()) * int(present.sum())
        weights = labels.numel() * q / counts.clamp_min(1)
        return weights.to(torch.float32)[labels]

    def log_metrics(self) -> Dict[str, float]:
        return {"faal_max_class_weight": self._last_max}  # K * max q (1 = uniform)
