"""FRL-RWRM -- Fair Robust Learning, reweight + remargin (Xu, Liu, Li, Jain, Tang; ICML 2021).

Ported from the authors' release (``hannxu123/fair_robust`` @ a80547d: ``frlrmrw.py`` and
``utils_frl2.py``; the rules are :mod:`hf_csr.fairness.rules`). FRL asks every class ``c`` to keep its
clean error and its boundary error (correct on the clean image, wrong on its adversarial version)
within ``tau`` of the overall ones, on a validation split held out of the training set, and enforces
that with Lagrange multipliers updated once per epoch, before training:

1. PGD-20 (CE loss, the nominal eps and step, uniform start) on the held-out split gives the
   class-wise and overall clean and boundary errors (global over processes);
2. ``lambda_nat += rate * g_nat`` and ``lambda_bndy += 2 rate g_bndy`` (``g`` the violations
   ``error_c - error_total - tau``), each clamped at 0 and rescaled to sum at most ``limit``;
   ``lambda_rm += rm_rate * g_bndy``; ``rate`` halves every ``rate_halving`` epochs;
3. *reweight*: the TRADES loss becomes ``sum(w_nat CE) / sum(w_nat) + beta sum(w_bndy KL) / sum(w_bndy)``
   over the (global) batch, ``w = 1/K + lambda_c - mean(lambda)``; with the PGD-AT base (not in the
   original) the adversarial CE is weighted by the mean of the two, normalised the same way;
4. *remargin*: class ``c`` is attacked with ``eps * clamp(exp(2 lambda_rm_c), 0.98, 3)``, every example
   stepping by the largest class budget times ``attack_step_size / attack_eps``.

With both rates 0 the multipliers stay 0 and the update is exactly the base method's. The paper's two
configurations are ``--frl_tau 0.05`` and ``--frl_tau 0.07`` (the default). Settings, the original's
values and the remaining differences: docs/baselines.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..validation import check_positive_int
from . import rules
from .base import FairnessConfig, FairnessMethod
from .registry import register_fairness_method

__all__ = ["FRL", "FRLConfig"]

logger = logging.getLogger(__name__)

VAL_SIZE_HELP = ("FRL / CFA / WAT: images held out of the training set as the validation split, in total "
                 "(divided evenly over the classes); unset: the original's count per class (FRL and WAT 300, "
                 "CFA 100). A CSRTrainer(fairness_validation_dataset=...) replaces the held-out split.")


def held_out_per_class(val_size: Optional[int], num_classes: int, original: int) -> int:
    """Images per class to hold out: ``val_size // K`` when given, else the original's count."""
    return original if val_size is None else max(1, int(val_size) // num_classes)


def _finite(flag: str, value, *, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{flag} must be a finite number >= {minimum:g}; got {value!r}.")


@dataclass
class FRLConfig(FairnessConfig):
    """FRL-RWRM's settings (flags ``--frl_*``; defaults are ``frlrmrw.py``'s)."""

    tau: float = field(default=0.07, metadata={"help": "FRL: allowed excess of a class's clean and boundary error over "
                                                        "the overall one (original: --bound0/--bound1 0.07; the paper "
                                                        "reports 0.05 and 0.07)."})
    tau_clean: Optional[float] = field(default=None, metadata={"help": "FRL: tau of the clean-error constraint alone "
                                                                        "(unset: frl_tau; original: --bound0)."})
    tau_boundary: Optional[float] = field(default=None, metadata={"help": "FRL: tau of the boundary-error constraint alone "
                                                                           "(unset: frl_tau; original: --bound1)."})
    rw_rate: float = field(default=0.05, metadata={"help": "FRL: step size of the reweighting multipliers per epoch "
                                                            "(0 disables reweighting; original: --rate1 0.05)."})
    rm_rate: float = field(default=0.2, metadata={"help": "FRL: step size of the remargin multipliers per epoch "
                                                           "(0 disables remargin; original: --rate2 0.2)."})
    limit: float = field(default=0.5, metadata={"help": "FRL: the reweighting multipliers are rescaled to sum at most "
                                                         "this (original: --lim 0.5)."})
    rate_halving: int = field(default=40, metadata={"help": "FRL: the reweighting step size halves every this many "
                                                             "epochs (0: never; original: 40, hard-coded)."})
    val_attack_steps: int = field(default=20, metadata={"help": "FRL: PGD steps of the validation attack (original: 20)."})
    val_size: Optional[int] = field(default=None, metadata={"help": VAL_SIZE_HELP, "flag": "fairness_val_size"})

    def __post_init__(self) -> None:
        _finite("frl_tau", self.tau)
        for name in ("tau_clean", "tau_boundary"):
            if getattr(self, name) is not None:
                _finite(f"frl_{name}", getattr(self, name))
        _finite("frl_rw_rate", self.rw_rate)
        _finite("frl_rm_rate", self.rm_rate)
        _finite("frl_limit", self.limit)
        if self.limit >= 1:
            raise ValueError(f"frl_limit must lie in [0, 1) (the class weights 1/K + lambda_c - mean(lambda) must stay "
                             f"positive); got {self.limit}.")
        for name in ("rate_halving", "val_attack_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "rate_halving" else 1):
                raise ValueError(f"frl_{name} must be an integer >= {0 if name == 'rate_halving' else 1}; got {value!r}.")
        check_positive_int(self.val_size, "fairness_val_size", allow_none=True)

    @property
    def taus(self):
        return (self.tau if self.tau_clean is None else self.tau_clean,
                self.tau if self.tau_boundary is None else self.tau_boundary)


@register_fairness_method("frl")
class FRL(FairnessMethod):
    config_class = FRLConfig

    def __init__(self, config: FRLConfig, context) -> None:
        super().__init__(config, context)
        k = context.num_classes
        self.multipliers = torch.zeros(3, k, dtype=torch.float64)  # clean reweight, boundary reweight, remargin
        self.updated_epoch = -1
        self.last_errors: Dict[str, float] = {}
        self._validation = None
        self._batch = (None, None)  # (labels of the micro-batch, its global class counts)
        if self.active:
            self._validation = context.hold_out_validation(held_out_per_class(config.val_size, k, 300))

    @property
    def active(self) -> bool:
        return self.config.rw_rate > 0 or self.config.rm_rate > 0

    # ------------------------------------------------------------------ the epoch update
    def update_multipliers(self, stats, epoch: int) -> None:
        config = self.config
        n = float(stats.counts.sum())
        # overall errors over all images (the original's 1 - correct / N), from the class-wise ones
        total_clean = float((stats.clean_error * stats.counts).sum()) / n
        total_bndy = float((stats.boundary_error * stats.counts).sum()) / n
        tau_clean, tau_bndy = config.taus
        self.multipliers = rules.frl_update_multipliers(
            self.multipliers, stats.clean_error, stats.boundary_error, total_clean, total_bndy,
            tau_clean=tau_clean, tau_boundary=tau_bndy, rate_reweight=rules.frl_reweight_rate(config.rw_rate, epoch, config.rate_halving),
            rate_remargin=config.rm_rate, limit=config.limit)
        self.last_errors = {"frl_worst_clean_error": float(stats.clean_error.max()),
                            "frl_worst_boundary_error": float(stats.boundary_error.max())}

    def on_epoch_begin(self, epoch: int) -> None:
        if epoch == self.updated_epoch or not self.active:
            return
        images, labels = self._validation
        stats = self.context.class_statistics(images, labels, tag=("frl", epoch), steps=self.config.val_attack_steps)
        self.update_multipliers(stats, epoch)
        self.updated_epoch = epoch
        logger.info("FRL epoch %d: clean weights %s, boundary weights %s, budget factors %s", epoch,
                    [round(v, 4) for v in self.class_weights(0).tolist()], [round(v, 4) for v in self.class_weights(1).tolist()],
                    [round(v, 4) for v in self.eps_factors().tolist()])

    # ------------------------------------------------------------------ what the trainer applies
    def class_weights(self, which: int) -> torch.Tensor:
        return rules.frl_class_weights(self.multipliers[which])

    def eps_factors(self) -> torch.Tensor:
        return rules.frl_eps_factors(self.multipliers[2])

    def _reweighting(self) -> bool:
        return bool((self.multipliers[:2] != 0).any())

    def _normalised(self, class_weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``w[y] / mean over the global batch of w[y]`` (so ``mean(result * l) = sum(w l) / sum(w)`` globally)."""
        if self._batch[0] is not labels:  # one all-reduce per micro-batch (trades_beta and example_weights share it)
            _, counts = self.context.class_sums(torch.zeros_like(labels, dtype=torch.float64), labels)
            self._batch = (labels, counts.cpu())
        counts = self._batch[1]
        mean = float((counts * class_weights).sum() / counts.sum())
        return (class_weights / mean).to(device=labels.device, dtype=torch.float32)[labels]

    def attack_budget(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        factors = self.eps_factors()
        if not bool((factors != 1).any()):
            return None
        return (float(self.args.attack_eps) * factors).to(device=labels.device, dtype=torch.float32)[labels]

    def attack_step_size(self, labels: torch.Tensor, eps) -> Optional[float]:
        factors = self.eps_factors()
        if not bool((factors != 1).any()):
            return None
        # the original: max(budget in the batch) / 4, for every example; here the largest class budget
        return float(self.args.attack_step_size) * float(factors.max())

    def example_weights(self, labels: torch.Tensor, losses: torch.Tensor) -> Optional[torch.Tensor]:
        if not self._reweighting():
            return None
        if self.args.base_loss == "trades":
            return self._normalised(self.class_weights(0), labels)
        return self._normalised(0.5 * (self.class_weights(0) + self.class_weights(1)), labels)

    def trades_beta(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        if not self._reweighting():
            return None
        # weights * beta_i * KL = beta * w_bndy[y] / mean(w_bndy[y]) * KL, given weights = w_nat[y] / mean(w_nat[y])
        nat = self._normalised(self.class_weights(0), labels)
        bndy = self._normalised(self.class_weights(1), labels)
        return float(self.args.trades_beta) * bndy / nat

    def log_metrics(self) -> Dict[str, float]:
        return {"frl_max_clean_weight": float(self.class_weights(0).max()) * self.num_classes,
                "frl_max_boundary_weight": float(self.class_weights(1).max()) * self.num_classes,
                "frl_max_eps_factor": float(self.eps_factors().max()), **self.last_errors}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"multipliers": self.multipliers, "updated_epoch": self.updated_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.multipliers = state["multipliers"].double()
        self.updated_epoch = int(state["updated_epoch"])
