"""WAT -- Worst-class Adversarial Training (Boqi Li and Weiwei Liu; AAAI 2023).

WAT treats the worst-class robust risk as a game between the model and a class-weighting player
who runs a no-regret algorithm (exponential weights / Hedge): before every epoch, the class-wise
adversarial cross-entropy on a validation split is added to a running sum ``L_c``, and the class
weights are ``w = softmax(eta * L)``. Training examples are weighted by ``K * w_{y_i}`` (so uniform
weights give weight 1 and the loss's scale is kept).

Hyper-parameters: ``wat_eta`` (the Hedge learning rate; set here: 0.1) and ``fairness_val_size``.
``wat_eta = 0`` keeps the weights uniform: exactly the base method's update. The CSR paper reports
WAT with the TRADES base (WAT_TRADES); ``pgd`` and AWP combine as well.
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

__all__ = ["WAT", "WATConfig", "hedge_weights"]

logger = logging.getLogger(__name__)


def hedge_weights(cumulative_loss: torch.Tensor, eta: float) -> torch.Tensor:
    """``softmax(eta * cumulative_loss)`` in float64."""
    return torch.softmax(eta * cumulative_loss.double(), dim=0)


@dataclass
class WATConfig(FairnessConfig):
    """WAT's settings (flags ``--wat_eta`` and ``--fairness_val_size``)."""

    eta: float = field(default=0.1, metadata={"help": "WAT: Hedge learning rate on the cumulative class-wise validation loss (0 = base method; set here)."})
    val_size: int = field(
        default=1000,
        metadata={"help": "FRL / WAT / CFA: size of the class-balanced validation split drawn from the training set "
                          "when CSRTrainer(fairness_validation_dataset=...) is not given (set here).",
                  "flag": "fairness_val_size"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"wat_eta must be a finite number >= 0; got {self.eta!r}.")
        if not isinstance(self.val_size, int) or isinstance(self.val_size, bool) or self.val_size < 1:
            raise ValueError(f"fairness_val_size must be a positive integer; got {self.val_size!r}.")


@register_fairness_method("wat")
class WAT(FairnessMethod):
    config_class = WATConfig

    def __init__(self, config: WATConfig, context) -> None:
        super().__init__(config, context)
        k = context.num_classes
        self.cumulative_loss = torch.zeros(k, dtype=torch.float64)
        self.weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self.updated_epoch = -1
        self._validation = None

    def on_epoch_begin(self, epoch: int) -> None:
        config = self.config
        if epoch == self.updated_epoch or config.eta == 0:
            return
        if self._validation is None:
            self._validation = validation_tensors(self.context, config.val_size)
        images, labels = self._validation
        stats = class_statistics(self.context, images, labels, tag=("wat", epoch))
        self.cumulative_loss += stats.robust_loss
        self.weights = hedge_weights(self.cumulative_loss, config.eta)
        self.updated_epoch = epoch
        logger.info("WAT epoch %d: class weights %s", epoch, [round(v, 4) for v in self.weights.tolist()])

    def example_weights(self, labels: torch.Tensor, losses: torch.Tensor) -> Optional[torch.Tensor]:
        if self.updated_epoch < 0:
            return None
        return class_to_example_weights(self.weights * self.num_classes, labels)

    def log_metrics(self) -> Dict[str, float]:
        return {"wat_max_class_weight": float(self.weights.max() * self.num_classes)}

    def state_dict(self) -> Dict[str, Any]:
        return {"cumulative_loss": self.cumulative_loss, "weights": self.weights, "updated_epoch": self.updated_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.cumulative_loss = state["cumulative_loss"].double()
        self.weights = state["weights"].double()
        self.updated_epoch = int(state["updated_epoch"])
