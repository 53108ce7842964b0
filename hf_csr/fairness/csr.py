"""CSR -- Confusional Spectral Regularization, as a fairness method (``fairness_method="csr"``).

Per training step (docs/method.md sections 1-5): the adversarial logits' confusion counts are summed
across processes and folded into the estimate ``C`` (:class:`~hf_csr.regularizer.ConfusionEstimator`;
source ``ema`` or ``batch``), and ``alpha * Psi`` with the spectral weights ``W = u v^T`` of ``C`` is
added to the loss (``reference``: the CE part of the base loss is scaled by ``1 - alpha``).

Source ``epoch`` (the released algorithm): before every epoch, one pass over the whole training set
with the training augmentation (random crop + flip, drawn from generators keyed by the seed, the
epoch and the batch), the model in eval mode, PGD (the training attack's norm, eps, step and steps:
PGD-10 8/255 with step 2/255 by default; CE loss, uniform random start, eval BatchNorm); ``C`` is
then fixed for the epoch. Counts are summed across processes, so every process holds the same ``C``.

Settings (:class:`CSRConfig`, flags ``--csr_*``): ``alpha`` (0.3), ``gamma`` (0.0; the paper also uses
0.1), ``variant`` (``reference`` / ``paper``), ``confusion_source`` (``ema`` / ``batch`` / ``epoch``),
``ema_momentum`` (0.99). ``alpha = 0`` is exactly the base method. The math (counts, weights, penalty)
is :mod:`hf_csr.regularizer`; this module holds CSR's state and its place in training.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from ..attacks import attack_mode
from ..data import RobustImageCollator
from ..regularizer import CONFUSION_SOURCES, VARIANTS, ConfusionEstimator, check_gamma, csr_penalty
from ..utils import as_logits, inputs_prevalidated
from ..validation import check_choice
from .base import FairnessConfig, FairnessMethod, LossInputs, LossTerms
from .registry import register_fairness_method

__all__ = ["CSR", "CSRConfig"]

logger = logging.getLogger(__name__)


@dataclass
class CSRConfig(FairnessConfig):
    """CSR's settings (docs/method.md sections 1-5, paper defaults)."""

    alpha: float = field(default=0.3, metadata={"help": "CSR: weight alpha of the penalty Psi (0 = the base method; paper 0.3)."})
    gamma: float = field(
        default=0.0,
        metadata={"help": "CSR: margin gamma of the confusion estimate (paper: additive logit margin >= 0; reference: "
                          "true-logit shrink factor in [0, 1)). The paper uses 0.0 and 0.1."},
    )
    variant: str = field(
        default="reference",
        metadata={"help": "CSR: 'reference' follows the authors' released code (raw counts, min-max scaled weights, "
                          "(1 - alpha) on the CE term); 'paper' follows eq. 10-12. Choices: reference, paper.",
                  "choices": list(VARIANTS)},
    )
    confusion_source: str = field(
        default="ema",
        metadata={"help": "CSR: where C comes from: 'ema' of every step's counts (no extra cost), 'batch' (this step "
                          "only) or 'epoch' (the released algorithm: an eval-mode PGD pass over the augmented training "
                          "set before each epoch). Choices: epoch, ema, batch.",
                  "choices": list(CONFUSION_SOURCES)},
    )
    ema_momentum: float = field(default=0.99, metadata={"help": "CSR: EMA decay mu of the 'ema' confusion source, in [0, 1)."})

    def __post_init__(self) -> None:
        check_choice("csr_variant", self.variant, VARIANTS)
        check_choice("csr_confusion_source", self.confusion_source, CONFUSION_SOURCES)
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"csr_alpha must be >= 0; got {self.alpha}.")
        if self.variant == "reference" and self.alpha > 1:
            raise ValueError(
                f"csr_alpha must lie in [0, 1] for csr_variant='reference', which scales the CE term by (1 - alpha); "
                f"got {self.alpha}."
            )
        check_gamma(self.gamma, self.variant, "csr_gamma", "csr_variant")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"csr_ema_momentum must lie in [0, 1); got {self.ema_momentum}.")

    @property
    def enabled(self) -> bool:
        return self.alpha > 0


@register_fairness_method("csr")
class CSR(FairnessMethod):
    """Confusional Spectral Regularization: ``alpha * Psi`` on top of PGD-AT / TRADES."""

    config_class = CSRConfig

    def __init__(self, config: CSRConfig, context) -> None:
        super().__init__(config, context)
        self.confusion = ConfusionEstimator(
            context.num_classes, variant=config.variant, gamma=config.gamma, source=config.confusion_source,
            momentum=config.ema_momentum, reduce_fn=context.sum_across_processes,
        )
        self._psi: List[torch.Tensor] = []

    # ------------------------------------------------------------------ per step
    def loss_terms(self, inputs: LossInputs) -> Optional[LossTerms]:
        config = self.config
        # counted even at alpha = 0, so that the logged ||C|| tracks the run
        stats = self.confusion.update(inputs.logits_adv, inputs.labels, validate=False)
        if not config.enabled:
            return None
        psi = csr_penalty(
            inputs.logits_adv, inputs.labels, self.confusion.weights(), variant=config.variant, gamma=config.gamma,
            class_counts=stats.class_counts, num_examples=stats.num_examples, validate=False,
        )
        # DDP averages gradients over processes; Psi is a sum over the *global* batch.
        psi = psi * self.context.num_processes
        self._psi.append(psi.detach().float())
        alpha = config.alpha
        return LossTerms({"csr": alpha * psi}, ce_scale=1.0 if config.variant == "paper" else 1.0 - alpha)

    # ------------------------------------------------------------------ the epoch source
    def on_epoch_begin(self, epoch: int) -> None:
        if not (self.config.enabled and self.confusion.source == "epoch"):
            return
        if self.confusion.pass_tag == epoch:
            return  # resumed mid-epoch: the pass for this epoch is in the restored state
        self.run_confusion_pass(epoch)

    def run_confusion_pass(self, epoch: int) -> None:
        """The ``epoch`` source (the released algorithm): PGD over the whole training set *with the training
        augmentation*, model in eval mode; batches sharded across processes, counts summed; C then fixed.

        Augmentation and random starts come from generators keyed by (seed, epoch, batch): the pass does
        not touch the global RNG and gives the same C whatever the number of processes."""
        context = self.context
        args, dataset = context.args, context.train_dataset
        model = context.model
        batch = args.per_device_eval_batch_size
        num_batches = math.ceil(len(dataset) / batch)
        world, rank = context.num_processes, context.process_index
        collate = RobustImageCollator(augment=False)
        device = context.device
        self.confusion.start_pass()
        mine = range(rank, num_batches, world)
        was_training = model.training
        model.eval()
        try:
            for b in tqdm(mine, desc=f"CSR confusion pass (epoch {epoch})", disable=not context.show_progress):
                indices = range(b * batch, min((b + 1) * batch, len(dataset)))
                inputs = collate([dataset[i] for i in indices])
                x, y = inputs["pixel_values"].to(device), inputs["labels"].to(device)
                x = context.augment(x, context.generator("pass-augment", epoch, b, device=x.device))
                generator = context.generator("pass", epoch, b, device=x.device)
                with context.autocast():
                    x_adv = context.attack(x, y, loss="ce", bn_mode="eval", random_start="uniform", generator=generator)
                    with torch.no_grad(), attack_mode(model, "eval"), inputs_prevalidated():
                        logits = as_logits(model(pixel_values=x_adv))
                self.confusion.accumulate(logits, y, validate=False)
        finally:
            model.train(was_training)
        self.confusion.finish_pass(tag=epoch)
        logger.info("CSR epoch %d: confusion pass done, ||C||_2 = %.4f", epoch, self.confusion.spectral_norm())

    # ------------------------------------------------------------------ reporting
    def log_metrics(self) -> Dict[str, float]:
        logs: Dict[str, float] = {}
        if self._psi:
            local = torch.stack(self._psi).mean().reshape(1).to(self.context.device)
            logs["csr_psi"] = round(float(self.context.mean_across_processes(local)[0]), 6)
            self._psi = []
        logs["csr_spectral_norm"] = round(self.confusion.normalized_spectral_norm(), 6)
        return logs

    def card_fields(self) -> Dict[str, Any]:
        config = self.config
        return {"csr_variant": config.variant, "csr_alpha": config.alpha, "csr_gamma": config.gamma,
                "csr_confusion_source": config.confusion_source}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"confusion": self.confusion.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.confusion.load_state_dict(state["confusion"])
