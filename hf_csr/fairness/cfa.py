"""CFA -- Class-wise calibrated Fair Adversarial training (Wei, Wang, Guo, Wang; CVPR 2023).

Three components, each switchable:

* **CCM** (class-wise calibrated margin): class ``c`` is attacked with ``eps_c = (lambda_eps + t_c) * eps``,
  ``t_c`` being the class's *training* robust accuracy over the previous epoch (the adversarial
  training examples the trainer already classifies -- no extra pass). ``t_c`` is in [0, 1], so
  ``eps_c`` stays within ``[lambda_eps * eps, (lambda_eps + 1) * eps]``; ``cfa_eps_max_factor`` can cap it.
* **CCR** (class-wise calibrated regularisation, TRADES only): ``beta_c = (lambda_beta + t_c) * beta``.
* **FAWA** (fairness-aware weight averaging): after each epoch from ``cfa_fawa_start`` on, the weights
  are folded into an exponential moving average (decay ``cfa_fawa_decay``) only if the worst-class
  robust accuracy on the validation split reaches ``cfa_fawa_threshold``; at the end of training the
  average replaces the model's weights (BatchNorm buffers included).

During the first epoch (no statistics yet) eps_c = eps and beta_c = beta. Hyper-parameters:
``cfa_eps_lambda`` (0.5) and ``cfa_beta_lambda`` (0.5) -- set here after the paper's description of a
base value plus the training accuracy; ``cfa_fawa_decay`` (0.85), ``cfa_fawa_threshold`` (0.2) and
``cfa_fawa_start`` (epoch 0) -- set here. With ``cfa_ccm = cfa_ccr = cfa_fawa = False`` the update is
exactly the base method's. Combinable with ``pgd`` (CFA_AT) and ``trades`` (CFA_TRADES) and with AWP.
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

__all__ = ["CFA", "CFAConfig", "calibrated_budgets"]

logger = logging.getLogger(__name__)


def calibrated_budgets(accuracy: torch.Tensor, eps: float, lam: float, max_factor: Optional[float] = None) -> torch.Tensor:
    """``(lam + clamp(accuracy, 0, 1)) * eps``, capped at ``max_factor * eps`` when given."""
    factors = lam + accuracy.double().clamp(0.0, 1.0)
    if max_factor is not None:
        factors = factors.clamp(max=max_factor)
    return factors * eps


@dataclass
class CFAConfig(FairnessConfig):
    """CFA's settings (flags ``--cfa_*`` and ``--fairness_val_size``)."""

    ccm: bool = field(default=True, metadata={"help": "CFA: class-wise calibrated margins (eps_c = (cfa_eps_lambda + t_c) * eps)."})
    ccr: bool = field(default=True, metadata={"help": "CFA: class-wise calibrated TRADES beta (beta_c = (cfa_beta_lambda + t_c) * beta)."})
    fawa: bool = field(default=True, metadata={"help": "CFA: fairness-aware weight averaging, swapped in at the end of training."})
    eps_lambda: float = field(default=0.5, metadata={"help": "CFA: base factor of the class-wise budget (set here)."})
    beta_lambda: float = field(default=0.5, metadata={"help": "CFA: base factor of the class-wise TRADES beta (set here)."})
    eps_max_factor: Optional[float] = field(default=None, metadata={"help": "CFA: optional cap of eps_c / eps (None: lambda + 1)."})
    fawa_decay: float = field(default=0.85, metadata={"help": "CFA: decay of the weight average, in [0, 1) (set here)."})
    fawa_threshold: float = field(default=0.2, metadata={"help": "CFA: minimal worst-class validation robust accuracy for an epoch to enter the average (set here)."})
    fawa_start: int = field(default=0, metadata={"help": "CFA: first epoch (from 0) that may enter the weight average."})
    val_size: int = field(
        default=1000,
        metadata={"help": "FRL / WAT / CFA: size of the class-balanced validation split drawn from the training set "
                          "when CSRTrainer(fairness_validation_dataset=...) is not given (set here).",
                  "flag": "fairness_val_size"},
    )

    def __post_init__(self) -> None:
        for name in ("eps_lambda", "beta_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"cfa_{name} must be a finite number >= 0; got {value!r}.")
        if self.eps_max_factor is not None and not (math.isfinite(self.eps_max_factor) and self.eps_max_factor > 0):
            raise ValueError(f"cfa_eps_max_factor must be > 0 or None; got {self.eps_max_factor}.")
        if not 0 <= self.fawa_decay < 1:
            raise ValueError(f"cfa_fawa_decay must lie in [0, 1); got {self.fawa_decay}.")
        if not 0 <= self.fawa_threshold <= 1:
            raise ValueError(f"cfa_fawa_threshold must lie in [0, 1]; got {self.fawa_threshold}.")
        if not isinstance(self.fawa_start, int) or isinstance(self.fawa_start, bool) or self.fawa_start < 0:
            raise ValueError(f"cfa_fawa_start must be an integer >= 0; got {self.fawa_start!r}.")
        if not isinstance(self.val_size, int) or isinstance(self.val_size, bool) or self.val_size < 1:
            raise ValueError(f"fairness_val_size must be a positive integer; got {self.val_size!r}.")


@register_fairness_method("cfa")
class CFA(FairnessMethod):
    config_class = CFAConfig

    def __init__(self, config: CFAConfig, context) -> None:
        super().__init__(config, context)
        args = context.args
        if config.ccm and args.attack_norm == "Linf":
            top = (config.eps_lambda + 1) if config.eps_max_factor is None else min(config.eps_lambda + 1, config.eps_max_factor)
            if top * args.attack_eps > 1:
                raise ValueError(f"CFA's largest class budget ({top:g} * attack_eps) exceeds 1 for Linf; lower cfa_eps_lambda or set cfa_eps_max_factor.")
        k = context.num_classes
        self.train_accuracy: Optional[torch.Tensor] = None  # t_c of the previous epoch
        self._correct = torch.zeros(k, dtype=torch.float64)
        self._counts = torch.zeros(k, dtype=torch.float64)
        self.average: Optional[Dict[str, torch.Tensor]] = None
        self.averaged_epochs = 0
        self.closed_epoch = -1
        self._validation = None
        self._last_worst = float("nan")

    # ------------------------------------------------------------------ per step
    def on_batch_statistics(self, stats) -> None:
        self._correct += stats.correct.double().cpu()
        self._counts += stats.class_counts.double().cpu()

    def attack_budget(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.config.ccm or self.train_accuracy is None:
            return None
        eps = calibrated_budgets(self.train_accuracy, float(self.args.attack_eps), self.config.eps_lambda,
                                 self.config.eps_max_factor)
        return class_to_example_weights(eps, labels)

    def trades_beta(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.config.ccr or self.train_accuracy is None:
            return None
        beta = (self.config.beta_lambda + self.train_accuracy.clamp(0.0, 1.0)) * self.args.trades_beta
        return class_to_example_weights(beta, labels)

    # ------------------------------------------------------------------ epochs
    def _close_epoch(self, epoch: int) -> None:
        if epoch <= self.closed_epoch:
            return
        self.closed_epoch = epoch
        if bool((self._counts > 0).all()):
            self.train_accuracy = self._correct / self._counts
        elif bool((self._counts > 0).any()):
            seen = self._counts > 0
            previous = self.train_accuracy if self.train_accuracy is not None else torch.ones_like(self._counts)
            self.train_accuracy = torch.where(seen, self._correct / self._counts.clamp_min(1), previous)
        self._correct.zero_()
        self._counts.zero_()
        if self.config.fawa and epoch >= self.config.fawa_start:
            self._maybe_average(epoch)

    def _maybe_average(self, epoch: int) -> None:
        config = self.config
        if self._validation is None:
            self._validation = validation_tensors(self.context, config.val_size)
        images, labels = self._validation
        stats = class_statistics(self.context, images, labels, tag=("cfa", epoch))
        present = stats.counts > 0
        self._last_worst = float(stats.robust_accuracy[present].min())
        if self._last_worst < config.fawa_threshold:
            logger.info("CFA epoch %d: worst-class val robust accuracy %.4f < %.4f, not averaged", epoch,
                        self._last_worst, config.fawa_threshold)
            return
        model = self.context.model
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.average is None:
            self.average = current
        else:
            decay = config.fawa_decay
            for key, value in current.items():
                if value.is_floating_point():
                    self.average[key].mul_(decay).add_(value, alpha=1.0 - decay)
                else:
                    self.average[key].copy_(value)
        self.averaged_epochs += 1

    def on_epoch_begin(self, epoch: int) -> None:
        if epoch > 0:
            self._close_epoch(epoch - 1)

    def on_epoch_end(self, epoch: int) -> None:
        self._close_epoch(epoch)

    def on_train_end(self) -> None:
        if self.average is None:
            return
        model = self.context.model
        model.load_state_dict(self.average)
        logger.info("CFA: the model now holds the fairness-aware weight average of %d epoch(s)", self.averaged_epochs)

    def log_metrics(self) -> Dict[str, float]:
        logs: Dict[str, float] = {"cfa_averaged_epochs": float(self.averaged_epochs)}
        if self.train_accuracy is not None:
            logs["cfa_min_train_robust_accuracy"] = float(self.train_accuracy.min())
        return logs

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {
            "correct": self._correct, "counts": self._counts, "closed_epoch": self.closed_epoch,
            "averaged_epochs": self.averaged_epochs,
        }
        if self.train_accuracy is not None:
            state["train_accuracy"] = self.train_accuracy
        if self.average is not None:
            state["average"] = {k: v.cpu() for k, v in self.average.items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._correct = state["correct"].double()
        self._counts = state["counts"].double()
        self.closed_epoch = int(state["closed_epoch"])
        self.averaged_epochs = int(state["averaged_epochs"])
        self.train_accuracy = state.get("train_accuracy")
        average = state.get("average")
        if average is not None:
            model = self.context.model
            reference = model.state_dict()
            self.average = {k: v.to(reference[k].device) for k, v in average.items()}
