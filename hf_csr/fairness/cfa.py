"""CFA -- Class-wise calibrated Fair Adversarial training (Wei, Wang, Guo, Wang; CVPR 2023).

Ported from the authors' release (``PKU-ML/CFA`` @ 071f333: ``train.py``, ``attack.py``, ``utils.py``;
the rules are :mod:`hf_csr.fairness.rules`). ``t_c`` is class ``c``'s robust accuracy on the
adversarial *training* examples of the previous epoch (counted over the global batch; no extra pass).
From epoch ``cfa_begin`` on (before it, ``eps_c = eps`` and ``b_c = beta``):

* **CCM** (``cfa_ccm``): class ``c`` is attacked with ``eps_c = (cfa_eps_lambda + t_c) * eps``, the step
  staying ``attack_step_size`` (the original's fixed 2/255);
* **CCR** (``cfa_ccr``, TRADES only): the loss of class ``c`` is ``(CE + b_c KL) / (1 + b_c)`` with
  ``b_c = (cfa_beta_lambda + t_c) * beta`` -- the original's form, also before ``cfa_begin``
  (``b_c = beta``); with CCR off the loss is the base TRADES loss;
* **FAWA** (``cfa_fawa``): after every epoch, PGD (the training attack's settings, CE loss) on a
  validation split held out of the training set gives the worst class's robust accuracy; when it
  reaches ``cfa_fawa_threshold`` the weights enter the average (the first time copied, later
  ``avg = decay * avg + (1 - decay) * w``, every state entry). The average replaces the model's
  weights at the end of training.

With ``cfa_ccm = cfa_ccr = cfa_fawa = False`` the update is exactly the base method's (and nothing is
held out). Settings, the original's values and the remaining differences: docs/baselines.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from . import rules
from .base import FairnessConfig, FairnessMethod
from ..validation import check_positive_int
from .frl import VAL_SIZE_HELP, held_out_per_class
from .registry import register_fairness_method

__all__ = ["CFA", "CFAConfig"]

logger = logging.getLogger(__name__)


@dataclass
class CFAConfig(FairnessConfig):
    """CFA's settings (flags ``--cfa_*``; defaults are ``train.py``'s)."""

    ccm: bool = field(default=True, metadata={"help": "CFA: class-wise calibrated margins, eps_c = (cfa_eps_lambda + t_c) * eps "
                                                       "(original: --ccm)."})
    ccr: bool = field(default=True, metadata={"help": "CFA: class-wise calibrated TRADES loss (CE + b_c KL) / (1 + b_c), "
                                                       "b_c = (cfa_beta_lambda + t_c) * beta (original: --ccr)."})
    fawa: bool = field(default=True, metadata={"help": "CFA: fairness-aware weight averaging, swapped in at the end of training."})
    eps_lambda: float = field(default=0.5, metadata={"help": "CFA: base factor of the class-wise budget (original: --lambda-1 0.5)."})
    beta_lambda: float = field(default=0.5, metadata={"help": "CFA: base factor of the class-wise beta (original: --lambda-2 0.5)."})
    begin: int = field(default=10, metadata={"help": "CFA: first epoch (from 0) with calibrated budgets and betas; "
                                                      "before it eps and beta (original: --begin 10)."})
    eps_max_factor: Optional[float] = field(default=None, metadata={"help": "CFA: optional cap of eps_c / eps (unset: "
                                                                             "lambda + 1, as the original)."})
    fawa_decay: float = field(default=0.88, metadata={"help": "CFA: decay of the weight average, in [0, 1) "
                                                               "(original: --decay-rate 0.88)."})
    fawa_threshold: float = field(default=0.24, metadata={"help": "CFA: worst-class validation robust accuracy an epoch "
                                                                   "needs to enter the average (original: --threshold 0.24)."})
    fawa_start: int = field(default=0, metadata={"help": "CFA: first epoch (from 0) that may enter the weight average "
                                                          "(original: 0)."})
    val_size: Optional[int] = field(default=None, metadata={"help": VAL_SIZE_HELP, "flag": "fairness_val_size"})

    def __post_init__(self) -> None:
        for name in ("ccm", "ccr", "fawa"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"cfa_{name} must be true or false; got {getattr(self, name)!r}.")
        for name in ("eps_lambda", "beta_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"cfa_{name} must be a finite number >= 0; got {value!r}.")
        for name in ("begin", "fawa_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"cfa_{name} must be an integer >= 0; got {value!r}.")
        if self.eps_max_factor is not None and not (math.isfinite(self.eps_max_factor) and self.eps_max_factor > 0):
            raise ValueError(f"cfa_eps_max_factor must be > 0 or unset; got {self.eps_max_factor}.")
        if not 0 <= self.fawa_decay < 1:
            raise ValueError(f"cfa_fawa_decay must lie in [0, 1); got {self.fawa_decay}.")
        if not 0 <= self.fawa_threshold <= 1:
            raise ValueError(f"cfa_fawa_threshold must lie in [0, 1]; got {self.fawa_threshold}.")
        check_positive_int(self.val_size, "fairness_val_size", allow_none=True)


@register_fairness_method("cfa")
class CFA(FairnessMethod):
    config_class = CFAConfig

    def __init__(self, config: CFAConfig, context) -> None:
        super().__init__(config, context)
        k = context.num_classes
        self.train_accuracy: Optional[torch.Tensor] = None  # t_c of the previous epoch
        self._correct = torch.zeros(k, dtype=torch.float64)
        self._counts = torch.zeros(k, dtype=torch.float64)
        self.average: Optional[Dict[str, torch.Tensor]] = None
        self.averaged_epochs = 0
        self.closed_epoch = -1
        self._last_worst = float("nan")
        self._validation = None
        self._epoch = 0
        if config.fawa:
            self._validation = context.hold_out_validation(held_out_per_class(config.val_size, k, 100))
        args = context.args
        if config.ccm and args.attack_norm == "Linf":
            top = config.eps_lambda + 1 if config.eps_max_factor is None else min(config.eps_lambda + 1, config.eps_max_factor)
            if top * float(args.attack_eps) > 1:
                raise ValueError(f"CFA's largest class budget ({top:g} * attack_eps) exceeds 1 for Linf; lower "
                                 "cfa_eps_lambda or set cfa_eps_max_factor.")

    # ------------------------------------------------------------------ per step
    def calibrated(self) -> bool:
        """Whether this epoch uses the calibrated budgets / betas (from ``cfa_begin`` on, once t_c exists)."""
        return self.train_accuracy is not None and self._epoch >= self.config.begin

    def class_eps(self) -> torch.Tensor:
        eps = rules.cfa_class_eps(self.train_accuracy, float(self.args.attack_eps), self.config.eps_lambda)
        if self.config.eps_max_factor is not None:
            eps = eps.clamp(max=self.config.eps_max_factor * float(self.args.attack_eps))
        return eps

    def attack_budget(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        if not (self.config.ccm and self.calibrated()):
            return None
        return self.class_eps().to(device=labels.device, dtype=torch.float32)[labels]

    def attack_step_size(self, labels: torch.Tensor, eps) -> Optional[float]:
        if not (self.config.ccm and self.calibrated()):
            return None
        return float(self.args.attack_step_size)  # fixed, whatever eps_c (the original's --pgd-alpha)

    def class_beta(self) -> torch.Tensor:
        k = self.num_classes
        t = self.train_accuracy if self.train_accuracy is not None else torch.zeros(k, dtype=torch.float64)
        return rules.cfa_class_beta(t, float(self.args.trades_beta), self.config.beta_lambda if self.calibrated() else None)

    def trades_beta(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.config.ccr:
            return None
        return self.class_beta().to(device=labels.device, dtype=torch.float32)[labels]

    def example_weights(self, labels: torch.Tensor, losses: torch.Tensor) -> Optional[torch.Tensor]:
        if not (self.config.ccr and self.args.base_loss == "trades"):
            return None
        # (CE + b KL) / (1 + b): the trainer's mean(w * (CE + beta_i KL)) with w = 1 / (1 + b), beta_i = b
        return (1.0 / (1.0 + self.class_beta())).to(device=labels.device, dtype=torch.float32)[labels]

    def on_batch_statistics(self, stats) -> None:
        self._correct += stats.correct.double().cpu()
        self._counts += stats.class_counts.double().cpu()

    # ------------------------------------------------------------------ epochs
    def _close_epoch(self, epoch: int) -> None:
        if epoch <= self.closed_epoch:
            return
        self.closed_epoch = epoch
        seen = self._counts > 0
        if bool(seen.any()):
            previous = self.train_accuracy if self.train_accuracy is not None else torch.zeros_like(self._counts)
            self.train_accuracy = torch.where(seen, self._correct / self._counts.clamp_min(1), previous)
        self._correct.zero_()
        self._counts.zero_()
        if self.config.fawa and epoch >= self.config.fawa_start:
            self._maybe_average(epoch)

    def _maybe_average(self, epoch: int) -> None:
        config = self.config
        images, labels = self._validation
        stats = self.context.class_statistics(images, labels, tag=("cfa", epoch))
        present = stats.counts > 0
        self._last_worst = float(stats.robust_accuracy[present].min())
        model = self.context.model
        current = {k: v.detach() for k, v in model.state_dict().items()}
        self.average, taken = rules.cfa_fawa_update(self.average, current, config.fawa_decay, self._last_worst,
                                                    config.fawa_threshold)
        if taken:
            self.averaged_epochs += 1
        else:
            logger.info("CFA epoch %d: worst-class validation robust accuracy %.4f < %.4f, not averaged", epoch,
                        self._last_worst, config.fawa_threshold)

    def on_epoch_begin(self, epoch: int) -> None:
        self._epoch = epoch
        if epoch > 0:
            self._close_epoch(epoch - 1)

    def on_epoch_end(self, epoch: int) -> None:
        self._close_epoch(epoch)

    def on_train_end(self) -> None:
        if self.average is None:
            if self.config.fawa:
                logger.warning("CFA: no epoch reached cfa_fawa_threshold = %g on the validation split; the model keeps "
                               "its trained weights (the original's average would be untouched)", self.config.fawa_threshold)
            return
        self.context.model.load_state_dict(self.average)
        logger.info("CFA: the model now holds the fairness-aware weight average of %d epoch(s)", self.averaged_epochs)

    def log_metrics(self) -> Dict[str, float]:
        logs: Dict[str, float] = {"cfa_averaged_epochs": float(self.averaged_epochs)}
        if self.train_accuracy is not None:
            logs["cfa_min_train_robust_accuracy"] = float(self.train_accuracy.min())
        if not math.isnan(self._last_worst):
            logs["cfa_worst_val_robust_accuracy"] = self._last_worst
        return logs

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"correct": self._correct, "counts": self._counts, "closed_epoch": self.closed_epoch,
                                 "averaged_epochs": self.averaged_epochs}
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
            reference = self.context.model.state_dict()
            self.average = {k: v.to(reference[k].device) for k, v in average.items()}
