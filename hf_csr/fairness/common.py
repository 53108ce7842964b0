"""Shared pieces of the fairness baselines: class-to-example weights, the validation split and its
class-wise clean / robust / boundary errors under PGD.

The validation split is ``trainer.fairness_validation_dataset`` when the caller set one (a held-out
split, as FRL and WAT use), otherwise a fixed class-balanced subset of ``args.fairness_val_size``
training examples (documented as not held out). Its statistics are computed identically on every
process (same examples, generators keyed by the seed and the epoch), so data-parallel replicas take
identical decisions without any communication.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks import attack_mode, pgd_attack
from ..data import RobustImageCollator
from ..utils import as_logits, derived_seed, inputs_prevalidated

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import CSRTrainer

__all__ = ["ClassStatistics", "class_to_example_weights", "validation_tensors", "class_statistics", "per_class_mean"]

logger = logging.getLogger(__name__)


def class_to_example_weights(class_weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``class_weights[labels]`` as float32 on the labels' device."""
    return class_weights.to(device=labels.device, dtype=torch.float32)[labels]


def per_class_mean(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean of ``values`` per class, count per class) with one scatter (classes absent: mean 0)."""
    counts = torch.bincount(labels, minlength=num_classes).to(values.dtype)
    sums = torch.zeros(num_classes, dtype=values.dtype, device=values.device).index_add_(0, labels, values)
    return sums / counts.clamp_min(1), counts


def validation_tensors(trainer: "CSRTrainer", size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1], labels) of the validation split (see the module docstring), on the CPU."""
    dataset = getattr(trainer, "fairness_validation_dataset", None)
    held_out = dataset is not None
    if dataset is None:
        dataset = trainer.train_dataset
        dataset = getattr(dataset, "real", dataset)  # mixed real/generated data: validate on real images
    labels = getattr(dataset, "labels", None)
    if held_out or labels is None or len(dataset) <= size:
        indices = np.arange(len(dataset)) if held_out or len(dataset) <= size else np.arange(size)
    else:
        from ..data import balanced_subset

        indices = balanced_subset(np.asarray(labels), size, seed=trainer.args.seed)
    if hasattr(dataset, "tensors"):
        return dataset.tensors(indices)
    batch = RobustImageCollator(augment=False)([dataset[int(i)] for i in indices])
    x = batch["pixel_values"]
    return (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()), batch["labels"].long()


@dataclass
class ClassStatistics:
    """Class-wise errors of a validation pass (each a float64 tensor of shape (K,))."""

    clean_error: torch.Tensor
    robust_error: torch.Tensor
    boundary_error: torch.Tensor  # correct on the clean image, wrong on its adversarial version
    robust_loss: torch.Tensor  # mean cross-entropy on the adversarial images
    counts: torch.Tensor

    @property
    def robust_accuracy(self) -> torch.Tensor:
        return 1.0 - self.robust_error


def class_statistics(
    trainer: "CSRTrainer",
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    tag,
    eps: Optional[torch.Tensor] = None,
) -> ClassStatistics:
    """Clean and PGD (the training attack's settings, CE loss, eval-mode BatchNorm) statistics per class.

    ``eps`` may give a budget per class (K,) (FRL's remargined budgets); random starts come from a
    generator keyed by (seed, ``tag``, batch), so every process computes the same numbers."""
    args, k = trainer.args, trainer.num_classes
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    device = args.device
    batch = max(1, int(args.per_device_eval_batch_size))
    clean_wrong, adv_wrong, boundary, loss_sum = (torch.zeros(k, dtype=torch.float64) for _ in range(4))
    counts = torch.bincount(labels, minlength=k).double()
    was_training = model.training
    ratio = float(args.attack_step_size) / float(args.attack_eps)
    for start in range(0, len(labels), batch):
        x = images[start : start + batch].to(device)
        y = labels[start : start + batch].to(device)
        budget = float(args.attack_eps) if eps is None else eps.to(device=device, dtype=x.dtype)[y]
        generator = torch.Generator(device=x.device)
        generator.manual_seed(derived_seed(args.seed, "fairness-validation", tag, start))
        x_adv = pgd_attack(
            model, x, y, eps=budget, step_size=budget * ratio, steps=args.attack_steps, norm=args.attack_norm,
            loss="ce", random_start="uniform", bn_mode="eval", generator=generator, validate=False,
        )
        with torch.no_grad(), attack_mode(model, "eval"), inputs_prevalidated():
            logits_nat = as_logits(model(pixel_values=x)).float()
            logits_adv = as_logits(model(pixel_values=x_adv)).float()
        nat_ok = logits_nat.argmax(1) == y
        adv_ok = logits_adv.argmax(1) == y
        yc = y.cpu()
        clean_wrong.index_add_(0, yc, (~nat_ok).double().cpu())
        adv_wrong.index_add_(0, yc, (~adv_ok).double().cpu())
        boundary.index_add_(0, yc, (nat_ok & ~adv_ok).double().cpu())
        loss_sum.index_add_(0, yc, F.cross_entropy(logits_adv, y, reduction="none").double().cpu())
    model.train(was_training)
    n = counts.clamp_min(1)
    return ClassStatistics(clean_wrong / n, adv_wrong / n, boundary / n, loss_sum / n, counts)
