"""FAAL -- Fairness-Aware Adversarial Learning (Zhang, Zhang, Guo, Wang, Lin; CVPR 2024).

Ported from the authors' release (``TrustAI/FAAL`` @ b20ee9d: ``FAAL.py``'s ``DAW`` and the training
loop of ``ft_prn.py`` / ``ft_wrn.py``; the rule is :func:`hf_csr.fairness.rules.faal_class_weights`).
Every batch, the adversary picks the class distribution ``p`` that maximises ``sum_c n_c m_c p_c``
inside the KL ball ``KL(u || p) <= r`` around the uniform ``u`` over the K classes, where ``m_c`` is the
class's mean margin on the adversarial logits (largest other probability minus the true class's; -1
for a class absent from the batch) and ``n_c`` its count; margins and counts are summed over the
global batch, so every process solves the same problem. The loss is ``mean(K p_y l)`` with ``l`` the
per-example base loss (adversarial CE for ``pgd``; clean CE + beta KL for ``trades``); ``p`` is not
differentiated. It enters the trainer as a loss term, ``mean((K p_y - 1) l)``, on top of the base loss.

``faal_rho = 0`` gives ``p = u``: exactly the base method's update. Settings, the original's values and
the remaining differences: docs/baselines.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ..validation import check_positive_int
from . import rules
from .base import FairnessConfig, FairnessMethod, LossInputs, LossTerms
from .registry import register_fairness_method

__all__ = ["FAAL", "FAALConfig"]


@dataclass
class FAALConfig(FairnessConfig):
    """FAAL's settings (flags ``--faal_*``)."""

    rho: float = field(default=0.5, metadata={"help": "FAAL: radius r of the KL ball KL(uniform || p) <= r of class "
                                                       "distributions (0 = the base method; original: --scale 0.5 in "
                                                       "every released script)."})
    search_steps: int = field(default=100, metadata={"help": "FAAL: bisection steps of the 1-D search for the KKT "
                                                              "multiplier (the original calls a conic solver)."})

    def __post_init__(self) -> None:
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not math.isfinite(self.rho) or self.rho < 0:
            raise ValueError(f"faal_rho must be a finite number >= 0; got {self.rho!r}.")
        check_positive_int(self.search_steps, "faal_search_steps")


@register_fairness_method("faal")
class FAAL(FairnessMethod):
    config_class = FAALConfig

    def __init__(self, config: FAALConfig, context) -> None:
        super().__init__(config, context)
        self.class_distribution = torch.full((context.num_classes,), 1.0 / context.num_classes, dtype=torch.float64)

    def class_weights(self, logits_adv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's class distribution ``p`` (K,), float64 on the CPU (global over processes)."""
        k = self.num_classes
        sums, counts = self.context.class_sums(rules.faal_margins(logits_adv.detach(), labels), labels)
        sums, counts = sums.cpu(), counts.cpu()
        margins = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full((k,), -1.0, dtype=torch.float64))
        return rules.faal_class_weights(margins, counts, self.config.rho, self.config.search_steps)

    def loss_terms(self, inputs: LossInputs) -> Optional[LossTerms]:
        if self.config.rho <= 0:
            return None
        p = self.class_weights(inputs.logits_adv, inputs.labels)
        self.class_distribution = p
        per_example = inputs.ce if inputs.robust is None else inputs.ce + inputs.robust
        extra = (self.num_classes * p - 1.0).to(device=per_example.device, dtype=per_example.dtype)[inputs.labels]
        return LossTerms(terms={"faal": (extra * per_example).mean()})

    def log_metrics(self) -> Dict[str, float]:
        return {"faal_max_class_weight": float(self.class_distribution.max()) * self.num_classes}  # 1 = uniform
