"""WAT -- Worst-class Adversarial Training (Boqi Li and Weiwei Liu; AAAI 2023).

Ported from the authors' release (``boqili/WAT`` @ 62d1184: ``worst_class_adversarial_train.py``; the
rules are :mod:`hf_csr.fairness.rules`). A Hedge (exponential weights) player over K + 1 entries -- the
K classes and their average -- weighs the training loss: each example weighs ``w_y + w_avg``. Epoch 0
trains with all K + 1 weights 1 (the original's initialisation); before every later epoch, the TRADES
loss ``CE(f(x), y) + beta KL(f(x) || f(x'))`` under the TRADES attack (the training attack's eps, step
and steps, KL loss, start ``x + 0.001 N(0, I)``) on a validation split held out of the training set
gives the costs ``K S_c / M`` per class and ``S / M`` for the average (``S_c`` the class's summed loss
over the global split, ``M`` its size), and ``w = K softmax(eta * cumulative costs)``.

``wat_normalize_loss`` divides the loss by its value at equal weights (2 in epoch 0, ``2K / (K + 1)``
later; not in the original), so that ``wat_eta = 0`` is exactly the base update. The original trains
with TRADES (WAT_TRADES); ``pgd`` and AWP combine too. Settings, the original's values and the remaining
differences: docs/baselines.md.
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

__all__ = ["WAT", "WATConfig"]

logger = logging.getLogger(__name__)


@dataclass
class WATConfig(FairnessConfig):
    """WAT's settings (flags ``--wat_*``; defaults are ``worst_class_adversarial_train.py``'s)."""

    eta: float = field(default=0.1, metadata={"help": "WAT: Hedge learning rate on the cumulative validation costs "
                                                       "(original: --eta 0.1)."})
    normalize_loss: bool = field(default=False, metadata={"help": "WAT: divide the loss by its value at equal weights "
                                                                   "(2 in epoch 0, 2K/(K+1) later) so that wat_eta = 0 "
                                                                   "is exactly the base update (original: not divided)."})
    val_size: Optional[int] = field(default=None, metadata={"help": VAL_SIZE_HELP, "flag": "fairness_val_size"})

    def __post_init__(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"wat_eta must be a finite number >= 0; got {self.eta!r}.")
        if not isinstance(self.normalize_loss, bool):
            raise ValueError(f"wat_normalize_loss must be true or false; got {self.normalize_loss!r}.")
        check_positive_int(self.val_size, "fairness_val_size", allow_none=True)


@register_fairness_method("wat")
class WAT(FairnessMethod):
    config_class = WATConfig

    def __init__(self, config: WATConfig, context) -> None:
        super().__init__(config, context)
        k = context.num_classes
        self.cumulative_costs: Optional[torch.Tensor] = None  # (K + 1,), None before the first validation
        self.updated_epoch = -1
        self._validation = None
        if config.eta > 0:  # at eta = 0 the weights never move: nothing to validate, nothing held out
            self._validation = context.hold_out_validation(held_out_per_class(config.val_size, k, 300))

    @property
    def weights(self) -> torch.Tensor:
        """The K + 1 Hedge weights (K classes, then the average), summing to K (K + 1 in epoch 0)."""
        return rules.wat_class_weights(self.cumulative_costs, self.config.eta, self.num_classes)

    def on_epoch_begin(self, epoch: int) -> None:
        if epoch == 0 or epoch == self.updated_epoch or self._validation is None:
            return  # epoch 0 trains with the initial weights; at eta = 0 they stay equal
        images, labels = self._validation
        beta = float(self.args.trades_beta)
        stats = self.context.class_statistics(images, labels, tag=("wat", epoch), attack_loss="kl",
                                              random_start="gaussian", trades_beta=beta)
        sums = stats.trades_loss * stats.counts  # class sums S_c of CE(clean) + beta KL (global)
        costs = rules.wat_validation_costs(sums, float(stats.counts.sum()))
        self.cumulative_costs = costs if self.cumulative_costs is None else self.cumulative_costs + costs
        self.updated_epoch = epoch
        logger.info("WAT epoch %d: weights %s (classes, then the average)", epoch, [round(v, 4) for v in self.weights.tolist()])

    def example_weights(self, labels: torch.Tensor, losses: torch.Tensor) -> Optional[torch.Tensor]:
        w = self.weights
        per_class = w[:-1] + w[-1]  # each example weighs w_y + w_avg
        if self.config.normalize_loss:
            equal = rules.wat_class_weights(None if self.cumulative_costs is None else torch.zeros_like(self.cumulative_costs),
                                            self.config.eta, self.num_classes)
            per_class = per_class / (equal[0] + equal[-1])
            if not bool((per_class != 1).any()):
                return None
        return per_class.to(device=labels.device, dtype=torch.float32)[labels]

    def log_metrics(self) -> Dict[str, float]:
        w = self.weights
        return {"wat_max_class_weight": float(w[:-1].max()), "wat_average_weight": float(w[-1])}

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"updated_epoch": self.updated_epoch}
        if self.cumulative_costs is not None:
            state["cumulative_costs"] = self.cumulative_costs
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.updated_epoch = int(state["updated_epoch"])
        costs = state.get("cumulative_costs")
        self.cumulative_costs = None if costs is None else costs.double()
