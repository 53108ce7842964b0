"""``CSRTrainer``: adversarial training (PGD-AT or TRADES) + the CSR penalty as a transformers Trainer.

The Trainer does what it always does -- data loading and sharding, the optimiser, schedules, gradient
accumulation, mixed precision, DDP, logging integrations, checkpoints. This class only adds, per step
(METHOD.md section 5):

1. a PGD attack on the *unwrapped* model (never through the DDP wrapper), its random start drawn for
   the whole global batch so that results do not depend on how the batch is split across processes;
2. the base loss (``pgd``: CE on adversarial logits; ``trades``: CE on clean + beta * KL);
3. the confusion counts of the adversarial logits, summed across processes, folded into the
   estimate ``C`` (``ema``/``batch``; ``epoch`` runs its own pass at each epoch start), and
   ``csr_alpha * Psi`` with the spectral weights of ``C``;
4. optionally AWP on top.

The estimator state is saved in every checkpoint (``csr_state.pt``) and restored on resume;
checkpoints are written to a staging folder and renamed into place, so a run killed mid-save never
leaves a half-written ``checkpoint-N`` behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, rotate_checkpoints

from .attacks import attack_mode, pgd_attack, random_init
from .awp import apply_perturbation, awp_perturbation, perturbable_parameters
from .configuration import CSRTrainingArguments
from .data import RobustImageCollator, augment_batch
from .data.core import check_labels_in_range
from . import baselines  # noqa: F401  (registers frl, faal, cfa, wat)
from . import safety
from .fairness import FAIRNESS_REGISTRY, FairnessMethod
from .regularizer import BatchStatistics, ConfusionEstimator, csr_penalty
from .utils import as_logits, check_pixel_values, derived_seed, ensure_writable_dir, inputs_prevalidated

__all__ = ["CSRTrainer", "CSR_STATE_NAME", "validate_training_data"]

logger = logging.getLogger(__name__)

CSR_STATE_NAME = "csr_state.pt"
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


class _CSRCallback(TrainerCallback):
    """Hooks the trainer needs at epoch / step boundaries (kept out of the public API)."""

    def __init__(self, trainer: "CSRTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.fairness is not None:
            self.trainer.fairness.on_train_begin()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._maybe_run_confusion_pass()
        if self.trainer.fairness is not None:
            self.trainer.fairness.on_epoch_begin(int(math.floor((state.epoch or 0.0) + 1e-9)))

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.fairness is not None:
            self.trainer.fairness.on_epoch_end(max(0, int(math.ceil((state.epoch or 0.0) - 1e-9)) - 1))

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.fairness is not None:
            self.trainer.fairness.on_train_end()

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._micro_step = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._restore_awp()
        if self.trainer.fairness is not None:
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

    Logged every ``logging_steps``: ``base_loss``, ``csr_psi``, ``csr_spectral_norm`` (||C||_2 of the
    estimate in use, normalised as in eq. 1), ``adv_accuracy`` and ``adv_worst_class_accuracy`` (over
    the adversarial training examples of the logging window).
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
        if args.should_save:
            # not after hours of training, at the first checkpoint
            ensure_writable_dir(args.output_dir, "output_dir",
                                " Checkpoints and the final model go there: pass a directory you can write to.")
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
        source = args.csr_confusion_source if args.fairness_method == "csr" else "batch"
        self.confusion = ConfusionEstimator(
            self.num_classes, variant=args.csr_variant, gamma=args.csr_gamma, source=source,
            momentum=args.csr_ema_momentum, reduce_fn=self._sum_across_processes,
        )
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

    def _create_fairness_method(self) -> Optional[FairnessMethod]:
        name = self.args.fairness_method
        if name in ("none", "csr"):
            return None
        if name not in FAIRNESS_REGISTRY:
            raise ValueError(f"fairness_method {name!r} is not registered; known: {sorted(FAIRNESS_REGISTRY)}.")
        return FAIRNESS_REGISTRY[name](self)

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
        x = self._augment(x)
        eps = self.fairness.attack_budget(y) if self.fairness is not None else None
        if eps is None:
            eps = float(args.attack_eps)
        step_size = eps * (float(args.attack_step_size) / float(args.attack_eps))
        x_adv = self._attack(raw, x, y, eps=eps, step_size=step_size, noise=self._attack_noise(x, eps))
        self._maybe_perturb_weights(raw, x, x_adv, y)
        with inputs_prevalidated():
            logits_adv = as_logits(model(pixel_values=x_adv))
            logits_nat = as_logits(model(pixel_values=x)) if args.base_loss == "trades" else None
        ce_term, robust_term = self._base_terms(logits_nat, logits_adv, y, weighted=True)
        base = ce_term + robust_term
        stats = self.confusion.update(logits_adv, y, validate=False)
        if self.fairness is not None:
            self.fairness.on_batch_statistics(stats)
        psi = None
        if args.csr_enabled:
            psi = csr_penalty(
                logits_adv, y, self.confusion.weights(), variant=args.csr_variant, gamma=args.csr_gamma,
                class_counts=stats.class_counts, num_examples=stats.num_examples, validate=False,
            )
            # DDP averages gradients over processes; Psi is a sum over the *global* batch.
            psi = psi * self.accelerator.num_processes
            alpha = args.csr_alpha
            if args.csr_variant == "paper":
                loss = base + alpha * psi
            else:
                loss = (1.0 - alpha) * ce_term + robust_term + alpha * psi
        else:
            loss = base
        self._record_step(base, psi, stats)
        self._micro_step += 1
        return (loss, {"logits": logits_adv}) if return_outputs else loss

    def _base_terms(self, logits_nat, logits_adv, y, weighted: bool = False):
        """(cross-entropy part, the rest) of the base loss, as means of per-example terms; with
        ``weighted``, a fairness method may reweight the examples and change TRADES' beta per example.
        ``reference`` CSR scales the first part by (1 - alpha)."""
        if self.args.base_loss == "pgd":
            ce = F.cross_entropy(logits_adv.float(), y, reduction="none")
            robust = None
        else:
            ce = F.cross_entropy(logits_nat.float(), y, reduction="none")
            kl = F.kl_div(
                F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_nat.float(), dim=1), reduction="none"
            ).sum(dim=1)
            beta = self.fairness.trades_beta(y) if (weighted and self.fairness is not None) else None
            robust = (self.args.trades_beta if beta is None else beta) * kl
        weights = None
        if weighted and self.fairness is not None:
            total = ce.detach() if robust is None else (ce + robust).detach()
            weights = self.fairness.example_weights(y, total)
        if weights is not None:
            ce = weights * ce
            robust = None if robust is None else weights * robust
        return ce.mean(), (ce.new_zeros(()) if robust is None else robust.mean())

    # ------------------------------------------------------------------ AWP
    def _awp_active(self) -> bool:
        epoch = self.state.epoch or 0.0
        return bool(self._awp_params) and math.floor(epoch + 1e-9) >= self.args.awp_warmup

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

    # ------------------------------------------------------------------ the epoch source
    def _maybe_run_confusion_pass(self) -> None:
        if not (self.args.csr_enabled and self.confusion.source == "epoch"):
            return
        epoch = int(math.floor((self.state.epoch or 0.0) + 1e-9))
        if self.confusion.pass_tag == epoch:
            return  # resumed mid-epoch: the pass for this epoch is in the restored state
        self.run_confusion_pass(epoch)

    def run_confusion_pass(self, epoch: int) -> None:
        """The ``epoch`` source: PGD over the whole training set (model in eval mode), sharded across
        processes by global batch, counts summed across processes; C is then fixed for the epoch.

        The random starts come from generators keyed by (seed, epoch, batch), so the pass does not
        touch the global RNG and gives the same C whatever the number of processes."""
        args, dataset = self.args, self.train_dataset
        raw = self.accelerator.unwrap_model(self.model_wrapped)
        batch = args.per_device_eval_batch_size
        num_batches = math.ceil(len(dataset) / batch)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = list(range(rank, num_batches, world))
        collate = RobustImageCollator(augment=False)
        self.confusion.start_pass()
        device = args.device
        bar = tqdm(mine, desc=f"CSR confusion pass (epoch {epoch})", disable=args.disable_tqdm or not self.is_world_process_zero())
        for b in bar:
            indices = range(b * batch, min((b + 1) * batch, len(dataset)))
            inputs = collate([dataset[i] for i in indices])
            x, y = inputs["pixel_values"].to(device), inputs["labels"].to(device)
            generator = torch.Generator(device=x.device)
            generator.manual_seed(derived_seed(args.seed, "pass", epoch, b))
            with self.accelerator.autocast():
                x_adv = self._attack(raw, x, y, loss="ce", bn_mode="eval", random_start="uniform", generator=generator)
                with torch.no_grad(), attack_mode(raw, "eval"), inputs_prevalidated():
                    logits = as_logits(raw(x_adv))
            self.confusion.accumulate(logits, y, validate=False)
        self.confusion.finish_pass(tag=epoch)
        logger.info("CSR epoch %d: confusion pass done, ||C||_2 = %.4f", epoch, self.confusion.spectral_norm())

    # ------------------------------------------------------------------ logging
    def _reset_metrics(self) -> None:
        self._metrics: Dict[str, List[torch.Tensor]] = defaultdict(list)
        self._window_correct = torch.zeros(self.num_classes, dtype=torch.long)
        self._window_counts = torch.zeros(self.num_classes, dtype=torch.long)

    def _record_step(self, base: torch.Tensor, psi: Optional[torch.Tensor], stats: BatchStatistics) -> None:
        self._metrics["base_loss"].append(base.detach().float())
        if psi is not None:
            self._metrics["csr_psi"].append(psi.detach().float())
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
        if self.args.fairness_method == "csr":
            logs["csr_spectral_norm"] = round(self.confusion.normalized_spectral_norm(), 6)
        if self.fairness is not None:
            logs.update(self.fairness.log_metrics())
        self._reset_metrics()
        return logs

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            logs = {**logs, **self._drain_metrics()}
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset: Optional[Dataset] = None):
        """Datasets that define their own batch composition (``make_sampler``, e.g. 30% real / 70%
        generated images) get their sampler; everything else the Trainer's default."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if hasattr(dataset, "make_sampler"):
            return dataset.make_sampler(self.args.per_device_train_batch_size, seed=self.args.seed)
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
        state: Dict[str, Any] = {"confusion": self.confusion.state_dict(), "settings": safety.resume_settings(self.args)}
        if self.fairness is not None:
            state["fairness"] = {"name": self.fairness.name, "state": self.fairness.state_dict()}
        return state

    def load_csr_state_dict(self, state: Dict[str, Any]) -> None:
        self.confusion.load_state_dict(state["confusion"])
        if self.fairness is not None:
            saved = state.get("fairness") or {}
            if saved.get("name") != self.fairness.name:
                raise ValueError(
                    f"the checkpoint was trained with fairness_method {saved.get('name')!r}, not "
                    f"{self.fairness.name!r}; resume with the same method."
                )
            self.fairness.load_state_dict(saved["state"])

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
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Files are checked (and named when broken) before anything is loaded; a resume that cannot
        # continue exactly is reported, a changed fairness method refused (hf_csr.safety).
        safety.check_checkpoint_files(self, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        safety.restore_csr_state(self, resume_from_checkpoint, CSR_STATE_NAME)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save the final model atomically: into a staging folder first, then file by file with
        ``os.replace`` (a kill never leaves a truncated ``model.safetensors`` in ``output_dir``)."""
        if _internal_call or self._staging_root is not None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        staged = os.path.join(output_dir, _STAGING_DIR, "final-model")
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)
        super().save_model(staged, _internal_call)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            for entry in sorted(os.listdir(staged)):
                os.replace(os.path.join(staged, entry), os.path.join(output_dir, entry))
            shutil.rmtree(staged, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(staged))
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        eval_dataset: Optional[Dataset] = None,
        ignore_keys: Optional[List[str]] = None,
        metric_key_prefix: str = "eval",
    ) -> Dict[str, float]:
        """Clean and adversarial accuracy per class, average and worst class (``args.eval_attacks``).

        Runs :func:`hf_csr.evaluation.evaluate_robustness` on the main process (the others wait) and
        logs ``{prefix}_{attack}_accuracy``, ``_worst_class_accuracy``, ``_spectral_norm`` and
        ``{prefix}_{attack}_class/{name}``; the full report is kept as ``trainer.last_evaluation``."""
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
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def robustness_report(self, dataset: Dataset, attacks, *, limit: Optional[int] = None, batch_size: Optional[int] = None):
        """The class-wise robustness report of the current model on ``dataset`` (main process; None elsewhere)."""
        from .evaluation import evaluate_robustness  # local import: evaluation pulls in AutoAttack

        report = None
        if self.is_world_process_zero():
            args = self.args
            images, labels = dataset, None
            if limit is not None and limit < len(dataset) and hasattr(dataset, "subset"):
                from .data import balanced_subset

                images = dataset.subset(balanced_subset(dataset.labels.numpy(), limit, args.seed))
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
            )
            model.train(was_training)
            self.last_evaluation = report
        self.accelerator.wait_for_everyone()
        return report

    def evaluate_and_report(
        self,
        eval_dataset: Optional[Dataset] = None,
        *,
        attacks="clean,pgd20,cw20,autoattack",
        batch_size: Optional[int] = None,
        output_dir: Optional[str] = None,
        training: Optional[Dict[str, Any]] = None,
        dataset_name: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Final evaluation: ``results.json``, ``results.md``, the plots and the model card (README.md)
        in ``output_dir`` (default ``args.output_dir``); returns the results dict on every process."""
        from .hub import write_model_card

        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        output_dir = output_dir or self.args.output_dir
        report = self.robustness_report(dataset, attacks, batch_size=batch_size)
        results: Dict[str, Any] = {}
        if report is not None:
            report.save(output_dir)
            results = report.to_dict()
            write_model_card(output_dir, results, training=training, dataset_name=dataset_name)
            logger.info("evaluation of %s:\n%s", output_dir, report.markdown_table(per_class=False))
        self.accelerator.wait_for_everyone()
        return self._broadcast(results)

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True, **kwargs):
        """Upload ``args.output_dir`` (safetensors weights, config, card, results.json, plots) to
        ``args.hub_model_id`` with :func:`hf_csr.hub.push_checkpoint`; the card is (re)written first."""
        from .hub import push_checkpoint, write_model_card

        if not self.is_world_process_zero():
            return None
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        write_model_card(self.args.output_dir, repo_id=repo_id)
        return push_checkpoint(
            self.args.output_dir, repo_id, token=self.args.hub_token, private=self.args.hub_private_repo,
            commit_message=commit_message, revision=kwargs.get("revision", self.args.hub_revision),
        )

    def _broadcast(self, value):
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]


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
