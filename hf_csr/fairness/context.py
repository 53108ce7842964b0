"""What a fairness method may use of the run: :class:`FairnessContext`.

The trainer hands one context to its method. Everything a method needs from the run goes through it
(so a method never reaches into the trainer's internals):

* the run: ``args``, ``num_classes``, ``class_names``, ``model`` (unwrapped), ``device``, ``epoch``,
  ``global_step``, ``train_dataset``;
* data parallelism: ``num_processes``, ``process_index``, ``is_main_process``,
  :meth:`~FairnessContext.sum_across_processes`, :meth:`~FairnessContext.class_sums` (per-class sums
  and counts over the *global* batch: every process gets the same numbers);
* randomness: :meth:`~FairnessContext.generator` (seeded by ``args.seed`` and the keys given, never the
  global RNG, so resumed and data-parallel runs draw the same numbers);
* the training set's augmentation (:meth:`~FairnessContext.augment`) and attack (:meth:`~FairnessContext.attack`);
* validation: :meth:`~FairnessContext.validation_split` (a user-given split, a held-out split taken
  out of the training set with :meth:`~FairnessContext.hold_out_validation`, or a fixed class-balanced
  subset of the training set) and :meth:`~FairnessContext.class_statistics` (class-wise clean / robust /
  boundary errors and losses under an attack, sharded across processes and summed: global).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import augment_batch
from ..utils import derived_seed

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import CSRTrainer
    from .common import ClassStatistics

__all__ = ["FairnessContext"]

logger = logging.getLogger(__name__)


class FairnessContext:
    """The run as a fairness method sees it (built by :class:`~hf_csr.CSRTrainer`)."""

    def __init__(self, trainer: "CSRTrainer") -> None:
        self._trainer = trainer
        self._held_out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._training_started = False

    # ------------------------------------------------------------------ the run
    @property
    def args(self):
        """The trainer's :class:`~hf_csr.CSRTrainingArguments` (base loss, attack, seed, batch sizes)."""
        return self._trainer.args

    @property
    def num_classes(self) -> int:
        return self._trainer.num_classes

    @property
    def class_names(self):
        return self._trainer.class_names

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained, unwrapped (never the DDP wrapper)."""
        trainer = self._trainer
        return trainer.accelerator.unwrap_model(trainer.model_wrapped)

    @property
    def device(self) -> torch.device:
        return self._trainer.args.device

    @property
    def epoch(self) -> float:
        """Epochs done so far (fractional within an epoch)."""
        return float(self._trainer.state.epoch or 0.0)

    @property
    def global_step(self) -> int:
        return int(self._trainer.state.global_step)

    @property
    def train_dataset(self) -> Dataset:
        return self._trainer.train_dataset

    def autocast(self):
        """The run's mixed-precision context (for extra forward passes)."""
        return self._trainer.accelerator.autocast()

    @property
    def show_progress(self) -> bool:
        return not self.args.disable_tqdm and self.is_main_process

    # ------------------------------------------------------------------ data parallelism
    @property
    def num_processes(self) -> int:
        return int(self._trainer.accelerator.num_processes)

    @property
    def process_index(self) -> int:
        return int(self._trainer.accelerator.process_index)

    @property
    def is_main_process(self) -> bool:
        return bool(self._trainer.is_world_process_zero())

    def sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes (itself with one process). Every process must call it."""
        if self.num_processes == 1:
            return tensor
        return self._trainer.accelerator.reduce(tensor, reduction="sum")

    def mean_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        return self._trainer.accelerator.reduce(tensor, reduction="mean")

    def class_sums(self, values: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(per-class sums of ``values``, per-class counts), float64, over the *global* batch (one all-reduce).

        ``values`` (N,) or (N, D) on this process; the sums have shape (K,) or (K, D). Divide for
        per-class means that every process shares (absent classes: count 0)."""
        k = self.num_classes
        values = values.detach().double()
        flat = values.reshape(values.shape[0], -1)
        sums = torch.zeros(k, flat.shape[1], dtype=torch.float64, device=values.device).index_add_(0, labels, flat)
        counts = torch.bincount(labels, minlength=k).double().to(values.device)
        packed = self.sum_across_processes(torch.cat([sums.reshape(-1), counts]))
        sums, counts = packed[: sums.numel()].view_as(sums), packed[sums.numel():]
        return sums.reshape((k,) + tuple(values.shape[1:])), counts

    # ------------------------------------------------------------------ randomness, augmentation, attack
    def generator(self, *keys: Any, device: Optional[torch.device] = None) -> torch.Generator:
        """A torch generator seeded by ``(args.seed, *keys)``: the same on every process and after a resume."""
        generator = torch.Generator(device=self.device if device is None else device)
        generator.manual_seed(derived_seed(self.args.seed, *keys))
        return generator

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training augmentation (``args.augment``: random crop with ``crop_padding`` + horizontal flips)
        applied to a float batch, drawing from ``generator``; ``x`` unchanged when augmentation is off."""
        args = self.args
        if not args.augment:
            return x
        return augment_batch(x, args.crop_padding, args.horizontal_flip, generator=generator)

    def attack(self, x: torch.Tensor, y: torch.Tensor, **overrides) -> torch.Tensor:
        """The training attack (``args``' norm, eps, step, steps, loss of the base objective, BatchNorm mode)
        on the unwrapped model; ``overrides`` go to :func:`hf_csr.attacks.pgd_attack`."""
        return self._trainer._attack(self.model, x, y, **overrides)

    # ------------------------------------------------------------------ validation
    @property
    def user_validation_dataset(self) -> Optional[Dataset]:
        """The split the user passed as ``CSRTrainer(fairness_validation_dataset=...)``, if any."""
        return getattr(self._trainer, "fairness_validation_dataset", None)

    def hold_out_validation(self, per_class: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Take ``per_class`` images of every class out of the training set (a fixed draw keyed by the seed)
        and return them as (images in [0, 1], labels); the trainer then trains on the rest.

        Call it from the method's ``__init__`` (before training starts). When the user gave a
        ``fairness_validation_dataset``, that split is returned instead and the training set is kept whole.
        With mixed real/generated data, the images are held out of the real part."""
        if self._held_out is not None:
            return self._held_out
        if self.user_validation_dataset is not None:
            self._held_out = _dataset_tensors(self.user_validation_dataset, None)
            return self._held_out
        if self._training_started:
            raise RuntimeError("hold_out_validation() must be called before training starts (in the method's __init__).")
        if not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"hold_out_validation needs a positive number of images per class; got {per_class!r}.")
        trainer = self._trainer
        dataset = trainer.train_dataset
        pool = getattr(dataset, "real", dataset)
        labels = _labels_of(pool)
        counts = np.bincount(labels, minlength=self.num_classes)
        short = [c for c in range(self.num_classes) if counts[c] <= per_class]
        if short:
            raise ValueError(
                f"holding out {per_class} validation images per class leaves no training images of class(es) {short} "
                f"(the training set has {counts.tolist()} per class); lower the validation size or pass "
                "CSRTrainer(fairness_validation_dataset=...)."
            )
        rng = np.random.default_rng(derived_seed(self.args.seed, "fairness-hold-out"))
        held = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(self.num_classes)]))
        keep = np.setdiff1d(np.arange(len(labels)), held)
        self._held_out = _dataset_tensors(pool, held)
        remaining = _subset(pool, keep)
        if pool is dataset:
            trainer.train_dataset = remaining
        else:
            mixed = copy.copy(dataset)
            mixed.real = remaining
            if isinstance(getattr(mixed, "labels", None), torch.Tensor):
                mixed.labels = torch.cat([torch.as_tensor(_labels_of(remaining)), torch.as_tensor(_labels_of(mixed.generated))])
            trainer.train_dataset = mixed
        logger.info("fairness validation: %d images held out of the training set (%d per class); %d left to train on",
                    len(held), per_class, len(keep))
        return self._held_out

    def validation_split(self, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(images in [0, 1], labels) on the CPU: the user's ``fairness_validation_dataset``, else the split
        held out by :meth:`hold_out_validation`, else a fixed class-balanced subset of ``size`` training
        images (NOT held out: they are trained on too)."""
        if self.user_validation_dataset is not None or self._held_out is not None:
            return self.hold_out_validation(1)
        dataset = self.train_dataset
        dataset = getattr(dataset, "real", dataset)  # mixed real/generated data: validate on real images
        labels = getattr(dataset, "labels", None)
        if labels is None or len(dataset) <= size:
            indices = np.arange(min(size, len(dataset)))
        else:
            from ..data import stratified_subset

            indices = stratified_subset(np.asarray(labels), size, seed=self.args.seed)
        return _dataset_tensors(dataset, indices)

    def class_statistics(self, images: torch.Tensor, labels: torch.Tensor, *, tag: Any, **attack) -> "ClassStatistics":
        """Class-wise statistics of the current model on (images, labels) under an attack
        (:func:`hf_csr.fairness.common.class_statistics`; global: sharded across processes and summed)."""
        from .common import class_statistics

        return class_statistics(self, images, labels, tag=tag, **attack)

    # ------------------------------------------------------------------ trainer side
    def _mark_training_started(self) -> None:
        self._training_started = True


def _labels_of(dataset: Dataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(torch.as_tensor(labels).cpu().numpy()).astype(np.int64)
    return np.asarray([int(dataset[i]["labels"]) for i in range(len(dataset))], dtype=np.int64)


def _subset(dataset: Dataset, indices: np.ndarray) -> Dataset:
    if hasattr(dataset, "subset"):
        return dataset.subset(indices)
    from torch.utils.data import Subset

    subset = Subset(dataset, indices.tolist())
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        subset.labels = torch.as_tensor(labels)[torch.as_tensor(indices)]
    return subset


def _dataset_tensors(dataset: Dataset, indices: Optional[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images as float [0, 1], labels) of some (or all) examples, on the CPU."""
    from ..data import RobustImageCollator

    if indices is None:
        indices = np.arange(len(dataset))
    if hasattr(dataset, "tensors"):
        images, labels = dataset.tensors(indices)
        return images.float(), torch.as_tensor(labels).long()
    batch = RobustImageCollator(augment=False)([dataset[int(i)] for i in indices])
    return batch["pixel_values"].float(), batch["labels"].long()

