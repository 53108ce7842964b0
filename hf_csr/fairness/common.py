"""Shared pieces of the fairness methods: class-to-example weights, per-class means, the validation split
and its class-wise clean / robust / boundary errors and losses under PGD.

The validation split comes from :meth:`hf_csr.fairness.FairnessContext.validation_split` (a user-given
split, a split held out of the training set, or a fixed class-balanced subset of the training set).
Its statistics are global under data parallelism: the batches are sharded across processes, each
batch's class-wise sums are placed in its own row and the rows summed across processes (exact: every
row has one contributor), then added up in batch order -- so 1 and N processes give the same numbers
bit for bit. Random starts come from generators keyed by (seed, tag, batch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..attacks import attack_mode, pgd_attack
from ..utils import as_logits, inputs_prevalidated

if TYPE_CHECKING:  # pragma: no cover
    from .context import FairnessContext

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


def validation_tensors(context: "FairnessContext", size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1], labels) of the validation split, on the CPU (:meth:`FairnessContext.validation_split`)."""
    return context.validation_split(size)


@dataclass
class ClassStatistics:
    """Class-wise errors of a validation pass (each a float64 tensor of shape (K,))."""

    clean_error: torch.Tensor
    robust_error: torch.Tensor
    boundary_error: torch.Tensor  # correct on the clean image, wrong on its adversarial version
    robust_loss: torch.Tensor  # mean cross-entropy on the adversarial images
    counts: torch.Tensor
    trades_loss: Optional[torch.Tensor] = None  # mean CE(clean) + beta * KL(clean || adversarial)

    @property
    def robust_accuracy(self) -> torch.Tensor:
        return 1.0 - self.robust_error


def class_statistics(
    context: "FairnessContext",
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    tag,
    eps: Optional[Union[float, torch.Tensor]] = None,
    steps: Optional[int] = None,
    step_size: Optional[Union[float, torch.Tensor]] = None,
    attack_loss: str = "ce",
    random_start: str = "uniform",
    trades_beta: Optional[float] = None,
) -> ClassStatistics:
    """Clean and PGD statistics per class of the current model (eval-mode BatchNorm), global over processes.

    The attack defaults to the training attack's norm, eps, step size and steps with the CE loss and a
    uniform random start; ``eps`` may be a float or a budget per class (K,) (the step size then scales
    with it unless ``step_size`` is given), ``attack_loss`` ``"kl"`` is TRADES' attack. ``trades_beta``
    (default ``args.trades_beta``) weighs the KL term of ``trades_loss``."""
    args, k = context.args, context.num_classes
    model = context.model
    device = context.device
    batch = max(1, int(args.per_device_eval_batch_size))
    steps = int(args.attack_steps if steps is None else steps)
    beta = float(args.trades_beta if trades_beta is None else trades_beta)
    ratio = float(args.attack_step_size) / float(args.attack_eps)
    labels = labels.long()
    starts = list(range(0, len(labels), batch))
    world, rank = context.num_processes, context.process_index
    # one row per batch: clean wrong, adv wrong, boundary, adv CE, TRADES loss, counts
    rows = torch.zeros(len(starts), 6, k, dtype=torch.float64, device=device)
    was_training = model.training
    for row in range(rank, len(starts), world):
        start = starts[row]
        x = images[start : start + batch].to(device)
        y = labels[start : start + batch].to(device)
        if eps is None:
            budget = float(args.attack_eps)
        elif isinstance(eps, torch.Tensor):
            budget = eps.to(device=device, dtype=x.dtype)[y]
        else:
            budget = float(eps)
        step = budget * ratio if step_size is None else (
            step_size.to(device=device, dtype=x.dtype)[y] if isinstance(step_size, torch.Tensor) else float(step_size))
        generator = context.generator("fairness-validation", tag, start, device=x.device)
        x_adv = pgd_attack(
            model, x, y, eps=budget, step_size=step, steps=steps, norm=args.attack_norm,
            loss=attack_loss, random_start=random_start, bn_mode="eval", generator=generator, validate=False,
        )
        with torch.no_grad(), attack_mode(model, "eval"), inputs_prevalidated():
            logits_nat = as_logits(model(pixel_values=x)).float()
            logits_adv = as_logits(model(pixel_values=x_adv)).float()
        nat_ok = logits_nat.argmax(1) == y
        adv_ok = logits_adv.argmax(1) == y
        ce_adv = F.cross_entropy(logits_adv, y, reduction="none")
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="none").sum(1)
        trades = F.cross_entropy(logits_nat, y, reduction="none") + beta * kl
        values = torch.stack([(~nat_ok).double(), (~adv_ok).double(), (nat_ok & ~adv_ok).double(), ce_adv.double(),
                              trades.double(), torch.ones_like(ce_adv, dtype=torch.float64)])
        rows[row].index_add_(1, y, values)
    model.train(was_training)
    rows = context.sum_across_processes(rows).cpu()
    totals = rows.new_zeros(6, k)
    for row in range(len(starts)):  # fixed order: the same sums whatever the number of processes
        totals += rows[row]
    counts = totals[5]
    n = counts.clamp_min(1)
    return ClassStatistics(totals[0] / n, totals[1] / n, totals[2] / n, totals[3] / n, counts, trades_loss=totals[4] / n)
