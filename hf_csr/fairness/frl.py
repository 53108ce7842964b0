"""FRL -- Fair Robust Learning, reweight + remargin (Xu, Liu, Li, Jain, Tang; ICML 2021).

FRL asks every class ``c`` to satisfy two constraints on a validation split,

    clean error:     R_nat(c)  - mean_c' R_nat(c')  <= tau1
    boundary error:  R_bndy(c) - mean_c' R_bndy(c') <= tau2

(boundary error: correct on the clean image, wrong on its adversarial version) and enforces them with
per-class Lagrange multipliers updated once per epoch by projected ascent on the violations:

    phi_nat(c)  <- max(0, phi_nat(c)  + rw_rate * (R_nat(c)  - mean R_nat  - tau1))
    phi_bndy(c) <- max(0, phi_bndy(c) + rw_rate * (R_bndy(c) - mean R_bndy - tau2))
    phi_rm(c)   <- max(0, phi_rm(c)   + rm_rate * (R_bndy(c) - mean R_bndy - tau2))

*Reweight* multiplies the losses of class ``c``: with the TRADES base (FRL's own), the clean CE by
``1 + phi_nat(c)`` and the KL (boundary) term by ``1 + phi_bndy(c)`` (through the per-example beta);
with the PGD-AT base, whose single adversarial CE carries both errors, by ``1 + phi_nat(c) + phi_bndy(c)``
(set here). *Remargin* trains class ``c`` with the budget ``eps * min(1 + phi_rm(c), max_eps_factor)``.

Hyper-parameters (``CSRTrainingArguments``): ``frl_tau_clean`` = tau1 and ``frl_tau_boundary`` = tau2
(paper's best RWRM settings: 0.05/0.05 and 0.07/0.07; default 0.05), ``frl_rw_rate`` and ``frl_rm_rate``
(the multipliers' step sizes; set here: 0.05), ``frl_max_eps_factor`` (cap of the remargined budget; set
here: 2.0), ``fairness_val_size`` (the validation split). With both rates 0 the multipliers stay 0 and
the update is exactly the base method's. Combinable with ``pgd``/``trades`` and AWP. The paper fine-tunes
a pre-trained model (80 epochs in the CSR paper's Table 1); nothing here requires that.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from .base import FairnessConfig, FairnessMethod
from .registry import register_fairness_method
from .common import class_statistics, class_to_example_weights, validation_tensors

__all__ = ["FRL", "FRLConfig", "frl_multiplier_update"]

logger = logging.getLogger(__name__)


def frl_multiplier_update(multiplier: torch.Tensor, errors: torch.Tensor, tau: float, rate: float) -> torch.Tensor:
    """One projected ascent step: ``max(0, phi + rate * (errors - mean(errors) - tau))``."""
    violation = errors - errors.mean() - tau
    return (multiplier + rate * violation).clamp_min(0.0)


@dataclass
class FRLConfig(FairnessConfig):
    """FRL's settings (flags ``--frl_*`` and ``--fairness_val_size``)."""

    tau_clean: float = field(default=0.05, metadata={"help": "FRL tau1: allowed excess clean error per class (paper: 0.05 or 0.07)."})
    tau_boundary: float = field(default=0.05, metadata={"help": "FRL tau2: allowed excess boundary error per class (paper: 0.05 or 0.07)."})
    rw_rate: float = field(default=0.05, metadata={"help": "FRL reweight multipliers' step size per epoch (0 disables reweighting; set here)."})
    rm_rate: float = field(default=0.05, metadata={"help": "FRL remargin multipliers' step size per epoch (0 disables remargin; set here)."})
    max_eps_factor: float = field(default=2.0, metadata={"help": "FRL: cap of the remargined budget as a multiple of attack_eps (>= 1; set here)."})
    val_size: int = field(
        default=1000,
        metadata={"help": "FRL / WAT / CFA: size of the class-balanced validation split drawn from the training set "
                          "when CSRTrainer(fairness_validation_dataset=...) is not given (set here).",
                  "flag": "fairness_val_size"},
    )

    def __post_init__(self) -> None:
        for name in ("tau_clean", "tau_boundary", "rw_rate", "rm_rate"):
            _nonnegative(f"frl_{name}", getattr(self, name))
        if not isinstance(self.max_eps_factor, (int, float)) or not math.isfinite(self.max_eps_factor) or self.max_eps_factor < 1:
            raise ValueError(f"frl_max_eps_factor must be >= 1; got {self.max_eps_factor}.")
        if not isinstance(self.val_size, int) or isinstance(self.val_size, bool) or self.val_size < 1:
            raise ValueError(f"fairness_val_size must be a positive integer; got {self.val_size!r}.")


def _nonnegative(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{flag} must be a finite number >= 0; got {value!r}.")


@register_fairness_method("frl")
class FRL(FairnessMethod):
    config_class = FRLConfig

    def __init__(self, config: FRLConfig, context) -> None:
        super().__init__(config, context)
        k = context.num_classes
        self.phi_nat = torch.zeros(k, dtype=torch.float64)
        self.phi_bndy = torch.zeros(k, dtype=torch.float64)
        self.phi_rm = torch.zeros(k, dtype=torch.float64)
        self.updated_epoch = -1
        self.last_errors: Dict[str, float] = {}
        self._validation = None

    # ------------------------------------------------------------------ multipliers
    def eps_factors(self) -> torch.Tensor:
        return (1.0 + self.phi_rm).clamp(max=self.config.max_eps_factor)

    def update_multipliers(self, stats) -> None:
        config = self.config
        self.phi_nat = frl_multiplier_update(self.phi_nat, stats.clean_error, config.tau_clean, config.rw_rate)
        self.phi_bndy = frl_multiplier_update(self.phi_bndy, stats.boundary_error, config.tau_boundary, config.rw_rate)
        self.phi_rm = frl_multiplier_update(self.phi_rm, stats.boundary_error, config.tau_boundary, config.rm_rate)
        self.last_errors = {
            "frl_worst_clean_error": float(stats.clean_error.max()),
            "frl_worst_boundary_error": float(stats.boundary_error.max()),
        }

    def on_epoch_begin(self, epoch: int) -> None:
        args, config = self.args, self.config
        if epoch == self.updated_epoch or (config.rw_rate == 0 and config.rm_rate == 0):
            return
        if self._validation is None:
            self._validation = validation_tensors(self.context, config.val_size)
        images, labels = self._validation
        eps = float(args.attack_eps) * self.eps_factors()
        stats = class_statistics(self.context, images, labels, tag=("frl", epoch), eps=eps)
        self.update_multipliers(stats)
        self.updated_epoch = epoch
        logger.info("FRL epoch %d: phi_nat=%s phi_bndy=%s eps factors=%s", epoch,
                    [round(v, 4) for v in self.phi_nat.tolist()], [round(v, 4) for v in self.phi_bndy.tolist()],
                    [round(v, 4) for v in self.eps_factors().tolist()])

    # ------------------------------------------------------------------ per step
    def attack_budget(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        if not bool((self.phi_rm > 0).any()):
            return None
        return class_to_example_weights(float(self.args.attack_eps) * self.eps_factors(), labels)

    def example_weights(self, labels: torch.Tensor, losses: torch.Tensor) -> Optional[torch.Tensor]:
        if self.args.base_loss == "trades":
            weights = 1.0 + self.phi_nat
        else:
            weights = 1.0 + self.phi_nat + self.phi_bndy
        if not bool((weights != 1).any()):
            return None
        return class_to_example_weights(weights, labels)

    def trades_beta(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        if not bool((self.phi_bndy > 0).any() or (self.phi_nat > 0).any()):
            return None
        # weights * beta_c * KL = beta * (1 + phi_bndy) * KL given weights = 1 + phi_nat
        beta = self.args.trades_beta * (1.0 + self.phi_bndy) / (1.0 + self.phi_nat)
        return class_to_example_weights(beta, labels)

    def log_metrics(self) -> Dict[str, float]:
        return {"frl_max_phi_nat": float(self.phi_nat.max()), "frl_max_phi_bndy": float(self.phi_bndy.max()),
                "frl_max_eps_factor": float(self.eps_factors().max()), **self.last_errors}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"phi_nat": self.phi_nat, "phi_bndy": self.phi_bndy, "phi_rm": self.phi_rm,
                "updated_epoch": self.updated_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.phi_nat = state["phi_nat"].double()
        self.phi_bndy = state["phi_bndy"].double()
        self.phi_rm = state["phi_rm"].double()
        self.updated_epoch = int(state["updated_epoch"])
