"""The interface through which fairness baselines plug into :class:`~hf_csr.CSRTrainer`.

A method changes some of: the per-example attack budget (class-wise eps), the per-example TRADES
beta, the per-example weights of the base loss, and what happens at epoch boundaries and after each
optimizer step; its state goes into every checkpoint. ``fairness_method="none"`` and ``"csr"`` use
no such object (CSR's penalty lives in the trainer). Methods register themselves by name in
:data:`FAIRNESS_REGISTRY`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Type

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import CSRTrainer

__all__ = ["FairnessMethod", "FAIRNESS_REGISTRY", "register_fairness_method"]


class FairnessMethod:
    """Base class: every hook is a no-op, so the subclass overrides only what its method changes."""

    name = "base"

    def __init__(self, trainer: "CSRTrainer") -> None:
        self.trainer = trainer

    @property
    def args(self):
        return self.trainer.args

    # ------------------------------------------------------------------ per step
    def attack_budget(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-example attack eps (N,), or None for ``args.attack_eps``. The step size scales with it."""
        return None

    def trades_beta(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-example TRADES beta (N,), or None for ``args.trades_beta``."""
        return None

    def example_weights(self, labels: torch.Tensor, losses: torch.Tensor) -> Optional[torch.Tensor]:
        """Weights (N,) of the per-example base losses (the loss is ``mean(weights * losses)``), or None."""
        return None

    def on_optimizer_step(self) -> None:
        """After every optimizer step (e.g. weight averaging)."""

    def on_batch_statistics(self, stats) -> None:
        """Every micro-batch's :class:`~hf_csr.regularizer.BatchStatistics` of the adversarial training
        logits (summed across processes; e.g. CFA's class-wise training robust accuracy)."""

    # ------------------------------------------------------------------ per epoch / run
    def on_train_begin(self) -> None:
        """Before the first step (validation splits, initial weights)."""

    def on_epoch_begin(self, epoch: int) -> None:
        """Before each epoch (e.g. multipliers updated from a validation split)."""

    def on_epoch_end(self, epoch: int) -> None:
        """After each epoch (``epoch`` counts from 0)."""

    def on_train_end(self) -> None:
        """After the last step, before the model is saved (e.g. CFA swaps in its weight average)."""

    def log_metrics(self) -> Dict[str, float]:
        """Extra values for the training logs."""
        return {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


FAIRNESS_REGISTRY: Dict[str, Type[FairnessMethod]] = {}


def register_fairness_method(name: str) -> Callable[[Type[FairnessMethod]], Type[FairnessMethod]]:
    def decorator(cls: Type[FairnessMethod]) -> Type[FairnessMethod]:
        cls.name = name
        FAIRNESS_REGISTRY[name] = cls
        return cls

    return decorator
