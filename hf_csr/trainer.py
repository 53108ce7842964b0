"""``CSRTrainer``: adversarial training (PGD-AT or TRADES) + a fairness method (CSR by default) as a
transformers Trainer.

The Trainer does what it always does -- data loading and sharding, the optimiser, schedules, gradient
accumulation, mixed precision, DDP, logging integrations, checkpoints. This class only adds, per step
(docs/method.md section 5):

1. a PGD attack on the *unwrapped* model (never through the DDP wrapper), its random start drawn for
   the whole global batch so that results do not depend on how the batch is split across processes;
2. the base loss (``pgd``: CE on adversarial logits; ``trades``: CE on clean + beta * KL);
3. the fairness method's hooks (:class:`hf_csr.fairness.FairnessMethod`, found by name in the
   registry: per-example budgets, betas and weights, extra loss terms such as CSR's ``alpha * Psi``,
   epoch and optimizer-step hooks);
4. optionally AWP on top.

The method's state is saved in every checkpoint (``csr_state.pt``) and restored on resume;
checkpoints are written to a staging folder and renamed into place, so a run killed mid-save never
leaves a half-written ``checkpoint-N`` behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy, TrainOutput, get_last_checkpoint, rotate_checkpoints

from .attacks import attack_mode, pgd_attack, random_init
from .awp import apply_perturbation, awp_perturbation, perturbable_parameters
from .configuration import CSRTrainingArguments
from .data import RobustImageCollator, augment_batch
from .validation import check_labels_in_range
from .fairness.base import FairnessMethod, LossInputs
from .fairness.context import FairnessContext
from .fairness.registry import get_fairness_method
from . import safety
from .regularizer import BatchStatistics, confusion_counts
from .models import RobustImageClassifier
from .utils import (apply_umask, as_logits, atomic_write_text, check_pixel_values, derived_seed, ensure_writable_dir,
                    inputs_prevalidated, process_log_level, set_library_log_level)

__all__ = ["CSRTrainer", "CSR_STATE_NAME", "validate_training_data"]

logger = logging.getLogger(__name__)

CSR_STATE_NAME = "csr_state.pt"
#: Per-class accuracies of the evaluations during training, one JSON object per line (the logs keep the averages).
EVAL_PER_CLASS_NAME = "eval_per_class.jsonl"
_STAGING_DIR = ".incomplete"


def validate_training_data(dataset: Optional[Dataset], num_classes: int, name: str, *, require_every_class: bool) -> None:
    """Check a dataset against the model before any long work starts (clear errors, no surprises).

    Uses the dataset's ``labels`` tensor and ``images`` when it has them (hf_csr datasets do); other
    datasets are checked through their first example.
    """
    if dataset is None:
        return
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: it has no examples.")
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        check_labels_in_range(labels, num_classes, what=name)
        if require_every_class:
            missing = torch.nonzero(torch.bincount(labels, minlength=num_classes) == 0).flatten().tolist()
            if missing:
                names = getattr(dataset, "class_names", None)
                shown = [names[i] if names else i for i in missing]
                raise ValueError(
                    f"{name} has no examples of class(es) {shown} (indices {missing}) out of num_classes = "
                    f"{num_classes}; robust fairness needs every class in the training set -- check the label "
                    "mapping or drop those classes from the model."
                )
    else:
        first = dataset[0]
        check_labels_in_range(torch.as_tensor([int(first["labels"])]), num_classes, what=name)
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        check_pixel_values(images, name=f"{name} images")
    elif not isinstance(images, torch.Tensor):
        sample = torch.as_tensor(dataset[0]["pixel_values"])
        if sample.is_floating_point():
            check_pixel_values(sample[None], name=f"{name} images")


def _apply_log_levels(args: CSRTrainingArguments) -> None:
    """hf_csr's loggers follow ``log_level`` / ``log_level_replica`` as transformers' do: INFO on the main
    process (unless the application chose another level for ``hf_csr``), WARNING on the others."""
    library = logging.getLogger(__name__.split(".")[0])
    if args.should_log and str(args.log_level).lower() == "passive" and library.level != logging.NOTSET:
        set_library_log_level(library.level)  # the application's choice stays
    else:
        set_library_log_level(process_log_level(args))


class _CSRCallback(TrainerCallback):
    """Hooks the trainer needs at epoch / step boundaries (kept out of the public API)."""

    def __init__(self, trainer: "CSRTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.fairness_context._mark_training_started()
        self.trainer.fairness.on_train_begin()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.fairness.on_epoch_begin(int(math.floor((state.epoch or 0.0) + 1e-9)))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.fairness.on_epoch_end(max(0, int(math.ceil((state.epoch or 0.0) - 1e-9)) - 1))

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.fairness.on_train_end()

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._micro_step = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._restore_awp()
        self.trainer.fairness.on_optimizer_step()


class CSRTrainer(Trainer):
    """A ``transformers.Trainer`` for adversarial training with Confusional Spectral Regularization.

    Args:
        model: a :class:`~hf_csr.RobustImageClassifier` (or any model taking ``pixel_values`` in [0, 1]
            and returning logits, with ``config.num_labels`` or ``num_classes`` given).
        args: :class:`~hf_csr.CSRTrainingArguments`.
        train_dataset / eval_dataset: datasets yielding ``{"pixel_values", "labels"}``.
        data_collator: defaults to :class:`~hf_csr.data.RobustImageCollator` with the args' augmentation.
        num_classes: only needed when the model has no ``config.num_labels``.
        fairness_validation_dataset: a held-out split for the fairness methods that validate (FRL, WAT,
            CFA); without it they take their split from the training set (see :mod:`hf_csr.fairness`).

    The fairness method (``args.fairness_method``, built from ``args.fairness_config``) is ``trainer.fairness``.
    Logged every ``logging_steps``: ``base_loss``, ``adv_accuracy`` and ``adv_worst_class_accuracy`` (over
    the adversarial training examples of the logging window) and the method's own values (CSR:
    ``csr_psi``, ``csr_spectral_norm``, the ||C||_2 of its estimate normalised as in eq. 1).
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Optional[CSRTrainingArguments] = None,
        data_collator=None,
        train_dataset: Optional[Dataset] = None,
        eval_dataset: Optional[Dataset] = None,
        *,
        num_classes: Optional[int] = None,
        callbacks: Optional[List[TrainerCallback]] = None,
        fairness_validation_dataset: Optional[Dataset] = None,
        **kwargs,
    ) -> None:
        if not isinstance(args, CSRTrainingArguments):
            raise ValueError(
                f"CSRTrainer needs args=CSRTrainingArguments(...); got {type(args).__name__}. The CSR, attack and "
                "AWP settings live there."
            )
        if model is None:
            raise ValueError("CSRTrainer needs a model (e.g. hf_csr.create_robust_classifier(...)).")
        if data_collator is None:
            # Augmentation happens in compute_loss, on the device, from step-keyed generators.
            data_collator = RobustImageCollator(augment=False)
        self.num_classes = self._resolve_num_classes(model, num_classes)
        _apply_log_levels(args)
        if args.ddp_find_unused_parameters is None and isinstance(model, RobustImageClassifier):
            # Every parameter of an hf_csr classifier takes part in each forward pass: DDP need not search the
            # graph for unused ones (transformers' default for a PreTrainedModel would, and warn at each run).
            args.ddp_find_unused_parameters = False
        if args.should_save:
            # not after hours of training, at the first checkpoint
            ensure_writable_dir(args.output_dir, "output_dir",
                                " Checkpoints and the final model go there: pass a directory you can write to.")
        from .models.loading import prepare_training_data

        # raw datasets.Dataset -> hf_csr dataset; channels / image size checked against the model, now
        train_dataset = prepare_training_data(model, train_dataset, "train_dataset")
        eval_dataset = prepare_training_data(model, eval_dataset, "eval_dataset")
        if args.should_save and os.path.isdir(args.output_dir):
            from .hub.cards import check_card_inputs

            check_card_inputs(args.output_dir)  # the card is written there at the end: a malformed input fails now
        validate_training_data(train_dataset, self.num_classes, "train_dataset", require_every_class=True)
        eval_sets = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        for dataset in eval_sets:
            validate_training_data(dataset, self.num_classes, "eval_dataset", require_every_class=False)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, callbacks=callbacks, **kwargs,
        )
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "CSRTrainer supports data parallelism with DDP only (accelerate's MULTI_GPU, e.g. "
                "recipes/accelerate_configs/multi_gpu.yaml); FSDP and DeepSpeed are not supported: the attacks "
                "run on the unwrapped model, which under parameter sharding holds only a shard of the weights. "
                "Unset --fsdp / --deepspeed (a WRN-70-16 fits on one GPU per process)."
            )
        validate_training_data(fairness_validation_dataset, self.num_classes, "fairness_validation_dataset",
                               require_every_class=True)
        self.fairness_validation_dataset = fairness_validation_dataset
        self.fairness_context = FairnessContext(self)
        self.fairness = self._create_fairness_method()
        self._awp_params = perturbable_parameters(model) if args.awp_gamma > 0 else []
        self._awp_delta = None
        self._micro_step = 0
        self._staging_root: Optional[str] = None
        self._reset_metrics()
        safety.preflight(self, train_dataset, eval_dataset)  # fail before the work (hf_csr.safety)
        safety.attach(self)  # divergence guard + SIGTERM checkpoint, ahead of _CSRCallback's train-end hooks
        self.add_callback(_CSRCallback(self))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _resolve_num_classes(model: nn.Module, num_classes: Optional[int]) -> int:
        config_classes = getattr(getattr(model, "config", None), "num_labels", None)
        if num_classes is None:
            num_classes = config_classes
        elif config_classes is not None and config_classes != num_classes:
            raise ValueError(f"num_classes = {num_classes} but the model's config has num_labels = {config_classes}.")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError("cannot tell the number of classes: pass num_classes= or a model with config.num_labels >= 2.")
        return num_classes

    def _create_fairness_method(self) -> FairnessMethod:
        """The method named by ``args.fairness_method`` (from the registry), built with ``args.fairness_config``."""
        method_class = get_fairness_method(self.args.fairness_method)
        return method_class(self.args.fairness_config, self.fairness_context)

    @property
    def class_names(self) -> List[str]:
        config = getattr(self.model, "config", None)
        id2label = getattr(config, "id2label", None) or {}
        return [str(id2label.get(i, i)) for i in range(self.num_classes)]

    def _sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def _mean_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="mean")

    def _step_generator(self, purpose: str, device: torch.device) -> torch.Generator:
        """A generator keyed by (seed, purpose, optimizer step): the randomness of a training step does
        not depend on the global RNG, so a resumed run draws exactly what the uninterrupted run drew."""
        generator = torch.Generator(device=device)
        generator.manual_seed(derived_seed(self.args.seed, purpose, self.state.global_step))
        return generator

    def _slice_of_step(self, n: int):
        """(examples drawn for the whole optimizer step, offset of this micro-batch on this process).

        The step's examples are all processes' micro-batches of all accumulation rounds; drawing the
        randomness for all of them and slicing makes a run independent of how its global batch is
        split across processes and accumulation rounds."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        rounds = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), self._micro_step + 1)
        return n * world * rounds, (self._micro_step * world + rank) * n

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop + flip (``args.augment``), drawn for the whole global batch, this process's rows."""
        args = self.args
        if not args.augment:
            return x
        total, offset = self._slice_of_step(x.shape[0])
        return augment_batch(
            x, args.crop_padding, args.horizontal_flip, generator=self._step_generator("augment", x.device),
            global_size=total, offset=offset,
        )

    def _attack_noise(self, x: torch.Tensor, eps) -> torch.Tensor:
        """PGD's random start for this micro-batch: drawn for the whole optimizer step (for a unit budget,
        then scaled by the -- possibly per-example -- eps) and sliced, so that data-parallel and
        accumulated runs attack exactly as a single large-batch run would."""
        args = self.args
        n = x.shape[0]
        total, offset = self._slice_of_step(n)
        generator = self._step_generator("attack", x.device)
        noise = random_init(
            (total,) + tuple(x.shape[1:]), eps=1.0, norm=args.attack_norm,
            random_start=args.random_start, generator=generator, device=x.device, dtype=x.dtype,
        )[offset : offset + n]
        if args.random_start == "gaussian":
            return noise  # TRADES' start does not scale with eps
        return noise * (eps.view(-1, *([1] * (x.dim() - 1))) if isinstance(eps, torch.Tensor) else eps)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **overrides) -> torch.Tensor:
        args = self.args
        settings = dict(
            eps=args.attack_eps, step_size=args.attack_step_size, steps=args.attack_steps, norm=args.attack_norm,
            loss="kl" if args.base_loss == "trades" else "ce", bn_mode=args.attack_bn_mode, validate=False,
        )
        settings.update(overrides)
        return pgd_attack(model, x, y, **settings)

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        x, y = inputs["pixel_values"], inputs["labels"]
        if not model.training:
            # transformers calls compute_loss during evaluation/prediction: the clean loss and logits.
            outputs = model(pixel_values=x, labels=y)
            return (outputs.loss, {"logits": outputs.logits}) if return_outputs else outputs.loss
        args = self.args
        check_pixel_values(x, name="pixel_values (training batch)")
        check_labels_in_range(y, self.num_classes, what="training batch")
        raw = self.accelerator.unwrap_model(model)
        method = self.fairness
        x = self._augment(x)
        eps = method.attack_budget(y)
        if eps is None:
            eps = float(args.attack_eps)
        step_size = method.attack_step_size(y, eps)
        if step_size is None:
            step_size = eps * (float(args.attack_step_size) / float(args.attack_eps))
        x_adv = self._attack(raw, x, y, eps=eps, step_size=step_size, noise=self._attack_noise(x, eps))
        self._maybe_perturb_weights(raw, x, x_adv, y)
        with inputs_prevalidated():
            logits_adv = as_logits(model(pixel_values=x_adv))
            logits_nat = as_logits(model(pixel_values=x)) if args.base_loss == "trades" else None
        ce, robust = self._base_losses(logits_nat, logits_adv, y, method=method)
        ce_term = ce.mean()
        robust_term = ce.new_zeros(()) if robust is None else robust.mean()
        base = ce_term + robust_term
        stats = self._batch_statistics(logits_adv, y)
        method.on_batch_statistics(stats)
        extra = method.loss_terms(LossInputs(y, logits_adv, logits_nat, ce, robust, stats))
        if extra is None:
            loss = base
        else:
            loss = extra.ce_scale * ce_term + robust_term
            for term in extra.terms.values():
                loss = loss + term
        self._record_step(base, stats)
        self._micro_step += 1
        return (loss, {"logits": logits_adv}) if return_outputs else loss

    def _base_losses(self, logits_nat, logits_adv, y, method: Optional[FairnessMethod] = None):
        """Per-example (cross-entropy part, the rest or None) of the base loss; with a ``method``, its
        per-example TRADES beta and example weights are applied."""
        if self.args.base_loss == "pgd":
            ce = F.cross_entropy(logits_adv.float(), y, reduction="none", label_smoothing=self.args.label_smoothing_factor)
            robust = None
        else:
            # label smoothing on the cross-entropy term only, never the KL (as DM-Improves-AT's TRADES loss)
            ce = F.cross_entropy(logits_nat.float(), y, reduction="none", label_smoothing=self.args.label_smoothing_factor)
            kl = F.kl_div(
                F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_nat.float(), dim=1), reduction="none"
            ).sum(dim=1)
            beta = method.trades_beta(y) if method is not None else None
            robust = (self.args.trades_beta if beta is None else beta) * kl
        if method is not None:
            weights = method.example_weights(y, ce.detach() if robust is None else (ce + robust).detach())
            if weights is not None:
                ce = weights * ce
                robust = None if robust is None else weights * robust
        return ce, robust

    def _base_terms(self, logits_nat, logits_adv, y):
        """(mean cross-entropy part, mean of the rest) of the unweighted base loss."""
        ce, robust = self._base_losses(logits_nat, logits_adv, y)
        return ce.mean(), (ce.new_zeros(()) if robust is None else robust.mean())

    def _batch_statistics(self, logits: torch.Tensor, y: torch.Tensor) -> BatchStatistics:
        """The micro-batch's class-wise counts (misclassification confusion counts, class counts, correct),
        summed across processes with one all-reduce, on the CPU."""
        k = self.num_classes
        counts, class_counts = confusion_counts(logits, y, variant="paper", gamma=0.0, validate=False)
        hit = (logits.detach().argmax(dim=1) == y).long()
        correct = torch.zeros(k, dtype=torch.long, device=y.device).index_add_(0, y, hit)
        flat = self._sum_across_processes(torch.cat([counts.reshape(-1).long(), class_counts.long(), correct]))
        return BatchStatistics(flat[: k * k].view(k, k).cpu(), flat[k * k : k * k + k].cpu(), flat[k * k + k :].cpu())

    # ------------------------------------------------------------------ AWP
    def _awp_active(self) -> bool:
        epoch = self.state.epoch or 0.0
        # The released loop counts epochs from 1 and perturbs when ``epoch >= awp_warmup``: with epochs
        # counted from 0 here, AWP starts in epoch ``awp_warmup - 1`` (0 and 1 both mean from the start).
        return bool(self._awp_params) and math.floor(epoch + 1e-9) + 1 >= self.args.awp_warmup

    def _maybe_perturb_weights(self, raw: nn.Module, x, x_adv, y) -> None:
        """AWP: perturb the weights once per optimizer step (first micro-batch), removed after the step."""
        if self._awp_delta is not None or not self._awp_active():
            return
        with attack_mode(raw, "train"), inputs_prevalidated(), torch.enable_grad():
            logits_adv = as_logits(raw(x_adv))
            logits_nat = as_logits(raw(x)) if self.args.base_loss == "trades" else None
            ce_term, robust_term = self._base_terms(logits_nat, logits_adv, y)
            loss = ce_term + robust_term
        self._awp_delta = awp_perturbation(loss, self._awp_params, self.args.awp_gamma, self._mean_across_processes)
        apply_perturbation(self._awp_delta, +1.0)

    def _restore_awp(self) -> None:
        if self._awp_delta is not None:
            apply_perturbation(self._awp_delta, -1.0)
            self._awp_delta = None

    # ------------------------------------------------------------------ logging
    def _reset_metrics(self) -> None:
        self._metrics: Dict[str, List[torch.Tensor]] = defaultdict(list)
        self._window_correct = torch.zeros(self.num_classes, dtype=torch.long)
        self._window_counts = torch.zeros(self.num_classes, dtype=torch.long)

    def _record_step(self, base: torch.Tensor, stats: BatchStatistics) -> None:
        self._metrics["base_loss"].append(base.detach().float())
        self._window_correct += stats.correct
        self._window_counts += stats.class_counts

    def _drain_metrics(self) -> Dict[str, float]:
        logs: Dict[str, float] = {}
        names = sorted(self._metrics)
        if names:
            local = torch.stack([torch.stack(self._metrics[n]).mean() for n in names])
            values = self._mean_across_processes(local.to(self.args.device)).tolist()
            logs.update({n: round(v, 6) for n, v in zip(names, values)})
        counts = self._window_counts
        if int(counts.sum()) > 0:
            present = counts > 0
            per_class = self._window_correct[present].double() / counts[present].double()
            logs["adv_accuracy"] = round(float(self._window_correct.sum()) / float(counts.sum()), 6)
            logs["adv_worst_class_accuracy"] = round(float(per_class.min()), 6)
        logs.update(self.fairness.log_metrics())
        self._reset_metrics()
        return logs

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            logs = {**logs, **self._drain_metrics()}
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset: Optional[Dataset] = None):
        """Datasets that define their own batch composition (``make_sampler``, e.g. 30% real / 70%
        generated images) get their sampler, built for the *global* batch of one optimizer step (its
        index stream is cut into per-device batches and dealt to the processes in order, so the
        composition holds per global batch whatever the number of processes); everything else the
        Trainer's default."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if hasattr(dataset, "make_sampler"):
            global_batch = self._train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            return dataset.make_sampler(global_batch, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ schedule and optimiser
    def get_decay_parameter_names(self, model: nn.Module) -> List[str]:
        """Weight decay on every parameter, as in the paper's (and PGD-AT/TRADES') SGD set-up."""
        return [name for name, _ in model.named_parameters()]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        milestones = self.args.milestone_epochs()
        if not milestones or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = self.optimizer if optimizer is None else optimizer
        epochs = max(float(self.state.num_train_epochs or self.args.num_train_epochs), 1e-12)
        steps_per_epoch = num_training_steps / epochs
        boundaries = [m * steps_per_epoch for m in milestones]
        factor = self.args.lr_decay_factor

        def multiplier(step: int) -> float:
            return factor ** sum(step >= b for b in boundaries)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """``Trainer.train``; resuming from a checkpoint that already reached ``max_steps`` (a run killed
        after its last checkpoint, e.g. during the final save or evaluation) restores that checkpoint and
        trains no further -- ``Trainer.train`` would otherwise take one extra optimizer step."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} has no checkpoint-N folder.")
        state_file = os.path.join(checkpoint, "trainer_state.json") if isinstance(checkpoint, str) else None
        if state_file and self.args.max_steps > 0 and os.path.isfile(state_file):
            state = safety.read_trainer_state(state_file)
            if state.global_step >= self.args.max_steps:
                logger.info("%s already reached max_steps = %d: restoring it, no further training",
                            checkpoint, self.args.max_steps)
                self._load_from_checkpoint(checkpoint)
                self.state = state
                return TrainOutput(state.global_step, 0.0, {"train_resumed_finished": 1.0})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def csr_state_dict(self) -> Dict[str, Any]:
        """What ``csr_state.pt`` holds: the fairness method's name and state, and the settings that decide a
        training step (compared on resume: :func:`hf_csr.safety.restore_csr_state`)."""
        return {"fairness": {"name": self.fairness.name, "state": self.fairness.state_dict()},
                "settings": safety.resume_settings(self.args)}

    def load_csr_state_dict(self, state: Dict[str, Any]) -> None:
        saved = state.get("fairness")
        if saved is None and "confusion" in state:
            # written before methods were plug-ins: CSR's estimator sat at the top level
            saved = {"name": "csr", "state": {"confusion": state["confusion"]}} if self.fairness.name == "csr" else {
                "name": "none", "state": {}}
        saved = saved or {}
        if saved.get("name") != self.fairness.name:
            raise ValueError(
                f"the checkpoint was trained with fairness_method {saved.get('name')!r}, not "
                f"{self.fairness.name!r}; resume with the same method."
            )
        self.fairness.load_state_dict(saved.get("state") or {})

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into ``<output_dir>/.incomplete/checkpoint-N``, add ``csr_state.pt``,
        then rename it to ``<output_dir>/checkpoint-N``: a kill during the save leaves the previous
        checkpoint as the latest complete one, and no half-written folder is ever resumed from."""
        run_dir = super()._get_output_dir(trial)
        staging_root = os.path.join(run_dir, _STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left by a run killed mid-save
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        if self.args.should_save:
            torch.save(self.csr_state_dict(), os.path.join(staged, CSR_STATE_NAME))
            apply_umask(staged)  # safetensors writes 0600: the checkpoint gets the user's umask
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            with contextlib.suppress(OSError):
                os.rmdir(staging_root)  # only when empty
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging_root):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(self.state.best_model_checkpoint))
                self.state.save_to_json(os.path.join(final, "trainer_state.json"))
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)  # once complete and in place: one push per save
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Files are checked (and named when broken) before anything is loaded; a resume that cannot
        # continue exactly is reported, a changed fairness method refused (hf_csr.safety).
        safety.check_checkpoint_files(self, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        safety.restore_csr_state(self, resume_from_checkpoint, CSR_STATE_NAME)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save the final model atomically: into a staging folder first, then file by file with
        ``os.replace`` (a kill never leaves a truncated ``model.safetensors`` in ``output_dir``). With
        ``push_to_hub=True``, a call by the user then pushes (after the files are in place, once)."""
        if self._staging_root is not None:  # inside _save_checkpoint: already a staging folder
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir or self.args.output_dir
        staged = os.path.join(output_dir, _STAGING_DIR, "final-model")
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)
        super().save_model(staged, _internal_call=True)  # the base class must not push the half-moved folder
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            apply_umask(staged)  # safetensors writes 0600: the files get the user's umask
            for entry in sorted(os.listdir(staged)):
                os.replace(os.path.join(staged, entry), os.path.join(output_dir, entry))
            shutil.rmtree(staged, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(staged))
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call and output_dir == self.args.output_dir:
            self._push_output_dir(commit_message="Model save", revision=self.args.hub_revision)

    # ------------------------------------------------------------------ the Hub
    def create_model_card(
        self,
        language: Optional[str] = None,
        license: Optional[str] = None,
        tags=None,
        model_name: Optional[str] = None,
        finetuned_from: Optional[str] = None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
        *,
        repo_id: Optional[str] = None,
        output_dir: Optional[str] = None,
        training: Optional[Dict[str, Any]] = None,
        dataset_name: Optional[str] = None,
    ):
        """The robust model card (``README.md`` in ``output_dir``, default ``args.output_dir``), replacing
        ``Trainer.create_model_card``'s generic one, as TRL's trainers do: YAML metadata with ``base_model``,
        ``datasets``, ``license``, tags and a model-index (average and worst-class accuracy per attack, from
        ``results.json``), the class-wise table and plots, the training set-up read from this trainer's args
        and state (:func:`hf_csr.hub.cards.training_setup`), framework versions, intended uses and limitations
        and the citation. ``training`` adds to (and overrides) the set-up read from the args; ``repo_id`` is
        the target repo (``push_to_hub`` passes it). Returns the card's path (None on other processes)."""
        from .hub.cards import base_model_of, dataset_card_info, training_setup, write_model_card

        if not self.is_world_process_zero():
            return None
        setup = training_setup(self)
        setup.update(training or {})
        data = dataset_card_info(self.train_dataset, self.eval_dataset)
        if dataset_name in ("cifar10", "cifar100", "fashion_mnist"):  # a known dataset's key, not a display name
            data["dataset"], dataset_name = dataset_name, None
        if isinstance(dataset, str):
            data["dataset"] = dataset if dataset in ("cifar10", "cifar100", "fashion_mnist") else data.get("dataset")
            if dataset.count("/") == 1:
                data["datasets"] = [dataset] + [d for d in data.get("datasets", []) if d != dataset]
        elif isinstance(dataset, (list, tuple)):
            data["datasets"] = list(dataset) + [d for d in data.get("datasets", []) if d not in dataset]
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        base_model = finetuned_from or base_model_of(model)
        licence = {"license": license}
        if license is None and base_model:  # weights derived from another repo keep its licence
            licence = {"license": "other", "license_name": "same-as-base-model",
                       "license_link": f"https://huggingface.co/{base_model}"}
        return write_model_card(
            output_dir or self.args.output_dir,
            config=config.to_dict() if hasattr(config, "to_dict") else None,
            repo_id=repo_id or self.args.hub_model_id,
            base_model=base_model,
            training=setup,
            **licence,
            tags=extra_tags or None,
            model_name=model_name,
            dataset_name=dataset_name,
            **data,
        )

    def _hub_repo_id(self) -> str:
        return getattr(self, "hub_model_id", None) or self.args.hub_model_id or os.path.basename(
            os.path.abspath(self.args.output_dir))

    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        private: Optional[bool] = None,
        **kwargs,
    ):
        """Save the model (atomically), render the card for the target repo (``args.hub_model_id``), then upload
        the safe files of ``args.output_dir`` with :func:`hf_csr.hub.push_checkpoint`: safetensors weights,
        ``config.json``, ``preprocessor_config.json``, the card, ``results.json`` and plots -- never a pickle
        (``training_args.bin``, optimizer states) and never a ``checkpoint-*`` folder. Call it on every process
        (the save is collective); only the main process uploads. The upload is always blocking; ``kwargs`` go to
        :meth:`create_model_card`. Returns the ``CommitInfo`` (None on other processes)."""
        self.save_model(_internal_call=True)
        return self._push_output_dir(commit_message, token=token, revision=revision, private=private, **kwargs)

    def _push_output_dir(self, commit_message, *, token=None, revision=None, private=None, extra_files=None, **card_kwargs):
        from .hub.push import push_checkpoint

        if not self.is_world_process_zero():
            return None
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        repo_id = self._hub_repo_id()
        self.create_model_card(repo_id=repo_id, **card_kwargs)
        return push_checkpoint(
            self.args.output_dir, repo_id, token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo, commit_message=commit_message,
            revision=revision or self.args.hub_revision, extra_files=extra_files,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``push_to_hub=True`` at each save (``hub_strategy`` ``every_save``, ``checkpoint``,
        ``all_checkpoints``; ``end`` pushes only in :meth:`push_to_hub`): once the checkpoint is complete and
        renamed into place, its model files are copied (atomically) to ``output_dir``, the card is refreshed and
        the safe files are committed in one blocking commit -- with ``checkpoint`` / ``all_checkpoints`` also
        the checkpoint's safe files under ``last-checkpoint/`` / ``checkpoint-N/`` (weights, config,
        ``trainer_state.json``; the optimizer, scheduler, RNG and CSR states are pickles and stay local).
        Called by ``Trainer._save_checkpoint`` while the checkpoint is still staged: then it does nothing.
        A failed push is logged and retried at the next save; training goes on."""
        from .hub.push import HubPushError, safe_checkpoint_files

        if self._staging_root is not None or not self.args.should_save or not self.is_world_process_zero():
            return
        if self.args.hub_strategy == HubStrategy.END:
            return
        output_dir = self.args.output_dir
        for name in safe_checkpoint_files(checkpoint_folder, model_only=True):
            temporary = os.path.join(output_dir, f".{name}.partial")
            shutil.copyfile(os.path.join(checkpoint_folder, name), temporary)
            os.replace(temporary, os.path.join(output_dir, name))
        extra = None
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            prefix = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else os.path.basename(checkpoint_folder)
            extra = {f"{prefix}/{name}": os.path.join(checkpoint_folder, name)
                     for name in safe_checkpoint_files(checkpoint_folder)}
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        try:
            self._push_output_dir(message, extra_files=extra)
        except HubPushError as error:
            logger.warning("push of %s failed (training goes on; the next save pushes again): %s", checkpoint_folder, error)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        eval_dataset: Optional[Dataset] = None,
        ignore_keys: Optional[List[str]] = None,
        metric_key_prefix: str = "eval",
    ) -> Dict[str, float]:
        """Clean and adversarial accuracy per class, average and worst class (``args.eval_attacks``).

        Runs :func:`hf_csr.evaluation.evaluate_robustness` sharded across the processes (each attacks its
        share; the outcomes are gathered). Returns ``{prefix}_{attack}_accuracy``, ``_worst_class_accuracy``,
        ``_spectral_norm`` and ``{prefix}_{attack}_class/{name}``; only the aggregate numbers are logged (progress
        bar, ``log_history``, integrations), the per-class ones go to the logger at INFO and to
        ``<output_dir>/eval_per_class.jsonl``. The full report is kept as ``trainer.last_evaluation``."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (pass it to CSRTrainer or to evaluate()).")
        if isinstance(dataset, dict):
            metrics: Dict[str, float] = {}
            for name, subset in dataset.items():
                metrics.update(self.evaluate(subset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        report = self.robustness_report(dataset, self.args.eval_attacks, limit=self.args.eval_max_examples)
        metrics = _flatten_report(report.to_dict(), metric_key_prefix) if report is not None else {}
        metrics = self._broadcast(metrics)
        if report is not None:
            self._record_per_class(metrics, metric_key_prefix)
        # the progress bar, log_history and the integrations get the aggregate numbers only
        self.log({key: value for key, value in metrics.items() if not _is_per_class_key(key)})
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _record_per_class(self, metrics: Dict[str, float], prefix: str) -> None:
        """The per-class accuracies of an evaluation (main process): one INFO line per attack, and a line
        of ``<output_dir>/eval_per_class.jsonl`` (step, epoch and the per-class metrics) when saving."""
        per_class = {key: value for key, value in metrics.items() if _is_per_class_key(key)}
        if not per_class or not self.is_world_process_zero():
            return
        by_attack: Dict[str, List[str]] = defaultdict(list)
        for key, value in per_class.items():
            attack, name = key.split("_class/", 1)
            by_attack[attack].append(f"{name} {value:.4f}")
        for attack, cells in by_attack.items():
            logger.info("step %d, %s accuracy per class: %s", self.state.global_step, attack, ", ".join(cells))
        if self.args.should_save:
            path = os.path.join(self.args.output_dir, EVAL_PER_CLASS_NAME)
            line = json.dumps({"step": self.state.global_step, "epoch": self.state.epoch, **per_class})
            previous = ""
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    previous = handle.read()
            atomic_write_text(path, previous + line + "\n")

    def robustness_report(self, dataset: Dataset, attacks, *, limit: Optional[int] = None, batch_size: Optional[int] = None,
                          resume_dir: Optional[str] = None):
        """The class-wise robustness report of the current model on ``dataset`` (main process; None elsewhere).

        Under DDP every process attacks its share of the examples (``evaluate_robustness(distributed=True)``:
        per-example keyed randomness, so the numbers are those of one process); the outcomes are gathered.
        ``resume_dir``: per-attack, per-batch progress kept there, so that an interrupted evaluation of the same
        weights continues where it stopped (``evaluate_robustness(resume_dir=...)``)."""
        from .evaluation import evaluate_robustness  # local import: evaluation pulls in AutoAttack

        args = self.args
        images, labels = dataset, None
        if limit is not None and limit < len(dataset) and hasattr(dataset, "subset"):
            from .data import stratified_subset

            images = dataset.subset(stratified_subset(dataset.labels.numpy(), limit, args.seed))
        elif not hasattr(dataset, "tensors"):
            items = [dataset[i] for i in range(min(len(dataset), limit or len(dataset)))]
            batch = RobustImageCollator(augment=False)(items)
            images, labels = batch["pixel_values"], batch["labels"]
        model = self.accelerator.unwrap_model(self.model_wrapped)
        was_training = model.training
        report = evaluate_robustness(
            model, images, labels, attacks=attacks, norm=args.attack_norm,
            eps=float(args.attack_eps), batch_size=batch_size or args.per_device_eval_batch_size, seed=args.seed,
            class_names=self.class_names, device=args.device, progress=not args.disable_tqdm,
            distributed=self.accelerator.num_processes > 1, resume_dir=resume_dir,
        )
        model.train(was_training)
        self.last_evaluation = report
        self.accelerator.wait_for_everyone()
        return report if self.is_world_process_zero() else None

    def evaluate_and_report(
        self,
        eval_dataset: Optional[Dataset] = None,
        *,
        attacks="clean,pgd20,cw20,autoattack",
        batch_size: Optional[int] = None,
        output_dir: Optional[str] = None,
        training: Optional[Dict[str, Any]] = None,
        dataset_name: Optional[str] = None,
        max_examples: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Final evaluation: ``results.json``, ``results.md``, the plots and the model card (README.md)
        in ``output_dir`` (default ``args.output_dir``); returns the results dict on every process.

        ``max_examples`` (default ``args.eval_max_examples``; None evaluates the whole set) limits the
        evaluation to a class-balanced subset. ``results.json`` is merged with an earlier one in
        ``output_dir`` per attack and number of examples (an earlier, larger evaluation of an attack is kept).
        The card is :meth:`create_model_card`'s: the training set-up, classes, backbone and input shape come
        from this trainer's args and model, so no argument is needed; ``training`` adds to the set-up."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        output_dir = output_dir or self.args.output_dir
        limit = self.args.eval_max_examples if max_examples is None else max_examples
        # An interrupted final evaluation (a long AutoAttack run killed at a session's end) resumes from its
        # finished batches when the same weights are evaluated again; the folder goes once the results are saved.
        from .evaluation.robustness import PROGRESS_DIR

        progress = os.path.join(output_dir, PROGRESS_DIR)
        report = self.robustness_report(dataset, attacks, batch_size=batch_size, limit=limit, resume_dir=progress)
        results: Dict[str, Any] = {}
        if report is not None:
            os.makedirs(output_dir, exist_ok=True)
            report.save(output_dir)
            from .hub.cards import read_results

            results = read_results(os.path.join(output_dir, "results.json"))  # merged with earlier evaluations
            self.create_model_card(output_dir=output_dir, training=training, dataset_name=dataset_name)
            logger.info("evaluation of %s:\n%s", output_dir, report.markdown_table(per_class=False))
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            shutil.rmtree(progress, ignore_errors=True)
        return self._broadcast(results)

    def _broadcast(self, value):
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]


def _is_per_class_key(key: str) -> bool:
    return "_class/" in key


def _flatten_report(results: Dict[str, Any], prefix: str) -> Dict[str, float]:
    """Flat, loggable metrics: ``{prefix}_{attack}_accuracy``, ``_worst_class_accuracy``, per class."""
    metrics: Dict[str, float] = {}
    names: Sequence[str] = results.get("class_names", [])
    for attack, entry in results.get("attacks", {}).items():
        key = f"{prefix}_{attack}"
        metrics[f"{key}_accuracy"] = entry["accuracy"]
        metrics[f"{key}_worst_class_accuracy"] = entry["worst_class"]["accuracy"]
        if "spectral_norm" in entry:
            metrics[f"{key}_spectral_norm"] = entry["spectral_norm"]
        for name, value in zip(names, entry.get("per_class_accuracy", [])):
            metrics[f"{key}_class/{name}"] = value
    return metrics
