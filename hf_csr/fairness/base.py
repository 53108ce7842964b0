"""The interface through which fairness methods (CSR and the baselines) plug into :class:`~hf_csr.CSRTrainer`.

A method is a :class:`FairnessMethod` subclass with a settings dataclass (a :class:`FairnessConfig`
subclass, its ``config_class``), registered by name with :func:`~hf_csr.fairness.register_fairness_method`.
The trainer builds it once, as ``method_class(config, context)``, and calls its hooks; every hook has
a no-op default, so a method overrides only what it changes:

* per step: :meth:`~FairnessMethod.attack_budget` (per-example eps), :meth:`~FairnessMethod.trades_beta`
  (per-example TRADES beta), :meth:`~FairnessMethod.example_weights` (weights of the per-example base
  losses), :meth:`~FairnessMethod.on_batch_statistics` (the step's global class-wise counts),
  :meth:`~FairnessMethod.loss_terms` (extra loss terms, e.g. CSR's penalty), :meth:`~FairnessMethod.on_optimizer_step`;
* per epoch / run: :meth:`~FairnessMethod.on_train_begin`, :meth:`~FairnessMethod.on_epoch_begin`,
  :meth:`~FairnessMethod.on_epoch_end`, :meth:`~FairnessMethod.on_train_end`;
* reporting: :meth:`~FairnessMethod.log_metrics` (training logs), :meth:`~FairnessMethod.card_fields`
  (the model card's training section);
* checkpoints: :meth:`~FairnessMethod.state_dict` / :meth:`~FairnessMethod.load_state_dict` (saved in
  every checkpoint's ``csr_state.pt``; tensors and plain containers only).

What a method needs from the run (the model, the class count, all-reduces across processes, a
validation split, class-wise validation statistics under attack, seeded generators) it gets from its
:class:`~hf_csr.fairness.FairnessContext`, never from the trainer's internals.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Optional, Type, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..regularizer import BatchStatistics
    from .context import FairnessContext

__all__ = ["FairnessConfig", "FairnessMethod", "LossInputs", "LossTerms", "NoFairness"]


@dataclass
class FairnessConfig:
    """Base of a method's settings.

    Every field is one command-line flag (and YAML key, and ``CSRTrainingArguments`` keyword):
    ``--{prefix}_{field}`` with ``prefix`` the method's registered name (``flag_prefix`` overrides it),
    or ``metadata["flag"]`` when given (several methods may share a flag, e.g. ``fairness_val_size``).
    Give every field a ``metadata["help"]``; validate in ``__post_init__`` with errors that name the
    flag (so the message reads the same on the command line and in Python).
    """

    flag_prefix: ClassVar[Optional[str]] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LossInputs:
    """What :meth:`FairnessMethod.loss_terms` sees of one training micro-batch.

    ``ce`` and ``robust`` are the per-example base-loss terms *after* the method's example weights and
    per-example beta (``pgd``: ``ce`` = CE on the adversarial logits, ``robust`` = None; ``trades``:
    ``ce`` = CE on the clean logits, ``robust`` = beta * KL). The base loss is ``mean(ce) + mean(robust)``.
    ``stats`` holds the micro-batch's class-wise counts summed over all processes.
    """

    labels: torch.Tensor
    logits_adv: torch.Tensor
    logits_nat: Optional[torch.Tensor]
    ce: torch.Tensor
    robust: Optional[torch.Tensor]
    stats: "BatchStatistics"


@dataclass
class LossTerms:
    """Returned by :meth:`FairnessMethod.loss_terms`: the loss becomes
    ``ce_scale * mean(ce) + mean(robust) + sum(terms.values())``. Under data parallelism the trainer's
    loss is each process's own; DDP averages gradients over processes (scale a global sum accordingly)."""

    terms: Dict[str, torch.Tensor] = field(default_factory=dict)
    ce_scale: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.ce_scale):
            raise ValueError(f"LossTerms.ce_scale must be finite; got {self.ce_scale}.")


class FairnessMethod:
    """Base class: every hook is a no-op, so the subclass overrides only what its method changes.

    Subclasses set ``config_class`` (their settings dataclass) and are built by the trainer as
    ``cls(config, context)``; ``self.config`` and ``self.context`` are then available to every hook,
    and ``self.args`` is the trainer's :class:`~hf_csr.CSRTrainingArguments` (base loss, attack, seed).
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[Type[FairnessConfig]] = FairnessConfig

    def __init__(self, config: FairnessConfig, context: "FairnessContext") -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"fairness method {self.name!r} takes a {self.config_class.__name__}; got {type(config).__name__}."
            )
        self.config = config
        self.context = context

    @property
    def args(self):
        return self.context.args

    @property
    def num_classes(self) -> int:
        return self.context.num_classes

    # ------------------------------------------------------------------ per step
    def attack_budget(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-example attack eps (N,), or None for ``args.attack_eps``. The step size scales with it."""
        return None

    def attack_step_size(self, labels: torch.Tensor, eps) -> Optional[Union[float, torch.Tensor]]:
        """The attack's step size (a float or per example (N,)) given the budget ``eps`` in use, or None
        for ``eps * attack_step_size / attack_eps`` (e.g. CFA keeps the step fixed whatever the budget)."""
        return None

    def trades_beta(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-example TRADES beta (N,), or None for ``args.trades_beta``."""
        return None

    def example_weights(self, labels: torch.Tensor, losses: torch.Tensor) -> Optional[torch.Tensor]:
        """Weights (N,) of the per-example base losses (the loss is ``mean(weights * losses)``), or None.

        ``losses`` are the detached per-example base losses (``pgd``: adversarial CE; ``trades``:
        clean CE + beta * KL, with the method's per-example beta)."""
        return None

    def on_batch_statistics(self, stats: "BatchStatistics") -> None:
        """Every micro-batch's class-wise counts of the adversarial training logits (``correct``,
        ``class_counts``; summed across processes), e.g. CFA's class-wise training robust accuracy."""

    def loss_terms(self, inputs: LossInputs) -> Optional[LossTerms]:
        """Extra loss terms for this micro-batch (and a factor on the CE part), or None for the base loss."""
        return None

    def on_optimizer_step(self) -> None:
        """After every optimizer step (e.g. weight averaging)."""

    # ------------------------------------------------------------------ per epoch / run
    def on_train_begin(self) -> None:
        """Before the first step (also after a resume)."""

    def on_epoch_begin(self, epoch: int) -> None:
        """Before each epoch (``epoch`` counts from 0; e.g. multipliers updated from a validation split).
        Called again for the current epoch after a mid-epoch resume: keep it idempotent per epoch."""

    def on_epoch_end(self, epoch: int) -> None:
        """After each epoch (``epoch`` counts from 0)."""

    def on_train_end(self) -> None:
        """After the last step, before the model is saved (e.g. CFA swaps in its weight average)."""

    # ------------------------------------------------------------------ reporting
    def log_metrics(self) -> Dict[str, float]:
        """Extra values for the training logs (called at every logging step)."""
        return {}

    def card_fields(self) -> Dict[str, Any]:
        """The method's settings as the model card's training section shows them (default: every
        config field under its flag name)."""
        from .registry import config_flags

        return {flag: getattr(self.config, name) for name, flag in config_flags(type(self)).items()}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@dataclass
class NoFairnessConfig(FairnessConfig):
    """``fairness_method="none"`` has no settings."""


class NoFairness(FairnessMethod):
    """``fairness_method="none"``: plain PGD-AT / TRADES (every hook a no-op)."""

    config_class = NoFairnessConfig


# Kept for code written against the first version of this module.
from .registry import FAIRNESS_REGISTRY, register_fairness_method  # noqa: E402

register_fairness_method("none")(NoFairness)
