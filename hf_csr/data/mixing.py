"""Real + generated data in fixed proportions per batch (the DDPM-data recipes: 30% real, 70% generated).

The schedule is DM-Improves-AT's (Wang et al. 2023, whose checkpoints and generated data the Table 2
recipe fine-tunes), as its batch sampler does it:

- a batch of ``B`` images holds ``int((1 - real_fraction) * B)`` generated images, drawn uniformly *with
  replacement* from the whole generated set, and ``B - int((1 - real_fraction) * B)`` real images (38 of
  128), taken as successive slices of a fresh shuffle of the real set; when a shuffle runs out mid-batch,
  the batch takes what is left and fills up with generated images, and the next batch starts a new shuffle;
- an *epoch* is ``ceil(n_real / B)`` batches (391 for CIFAR-10 at B = 128) whatever the size of the
  generated set, unless ``batches_per_epoch`` says otherwise: two epochs of fine-tuning are 782 steps,
  not a pass over 1M (or 50M) generated images.

``B`` is the *global* batch of one optimizer step (per-device batch x processes x accumulation steps):
:class:`MixedBatchOrderSampler` yields one flat index stream, global batch after global batch, and the
Trainer's DataLoader cuts it into per-device batches that Accelerate deals to the processes in order. The
stream does not depend on the number of processes, so one process with ``B`` per device and two with
``B / 2`` see the same global batches. Inside a global batch the real images are spread evenly
(position ``floor(k * B / r)`` for the ``k``-th of ``r`` real images), so every per-device batch, of any
size dividing ``B``, holds its share (``floor`` or ``ceil`` of ``r * b / B``).

All randomness comes from ``numpy.random.default_rng([seed, epoch])``: the order is a pure function of
(seed, epoch), so a resumed run (which replays the epoch and skips the batches already trained) and every
process see the same batches.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..validation import check_positive_int

__all__ = ["MixedImageDataset", "MixedBatchOrderSampler"]


class MixedImageDataset(Dataset):
    """Indices ``[0, len(real))`` are real images, the rest generated ones (same classes).

    Args:
        real / generated: the two datasets (same label space).
        real_fraction: share of real images per batch (DM-Improves-AT: 0.3).
        batches_per_epoch: global batches per epoch; ``None`` = ``ceil(len(real) / B)`` (DM-Improves-AT).
    """

    def __init__(
        self, real: Dataset, generated: Dataset, *, real_fraction: float = 0.3, batches_per_epoch: Optional[int] = None
    ) -> None:
        if not 0.0 < real_fraction < 1.0:
            raise ValueError(f"real_fraction must lie in (0, 1) (the DDPM recipes use 0.3); got {real_fraction}.")
        check_positive_int(batches_per_epoch, "batches_per_epoch", allow_none=True)
        real_names = list(getattr(real, "class_names", []))
        generated_names = list(getattr(generated, "class_names", []))
        if real_names and generated_names and len(real_names) != len(generated_names):
            raise ValueError(
                f"the real data has {len(real_names)} classes but the generated data {len(generated_names)}; "
                "they must share the label space."
            )
        if len(real) == 0 or len(generated) == 0:
            raise ValueError("both the real and the generated dataset must be non-empty.")
        self.real, self.generated, self.real_fraction = real, generated, real_fraction
        self.batches_per_epoch = batches_per_epoch
        self.class_names = real_names or generated_names
        self.labels = torch.cat([torch.as_tensor(getattr(d, "labels")) for d in (real, generated)]) if all(
            isinstance(getattr(d, "labels", None), torch.Tensor) for d in (real, generated)
        ) else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.real) + len(self.generated)

    def __getitem__(self, index: int):
        n_real = len(self.real)
        return self.real[index] if index < n_real else self.generated[index - n_real]

    def make_sampler(self, batch_size: int, seed: int = 0) -> "MixedBatchOrderSampler":
        """The index order for global batches of ``batch_size`` (all processes and accumulation rounds)."""
        return MixedBatchOrderSampler(
            len(self.real), len(self.generated), batch_size, self.real_fraction, seed, num_batches=self.batches_per_epoch
        )


def spread_positions(count: int, size: int) -> np.ndarray:
    """``count`` positions in ``range(size)`` spread evenly: ``floor(k * size / count)``. Any block of
    ``b`` consecutive positions (``b`` dividing ``size``) holds ``floor`` or ``ceil`` of ``count * b / size``."""
    return (np.arange(count, dtype=np.int64) * size) // max(count, 1)


class MixedBatchOrderSampler(Sampler[int]):
    """DM-Improves-AT's batch schedule as a flat index stream of ``num_batches`` global batches.

    Args:
        num_real / num_generated: sizes of the two sets (generated indices follow the real ones).
        batch_size: the global batch ``B`` of one optimizer step.
        real_fraction: share of real images (``B - int((1 - real_fraction) * B)`` per batch).
        seed: with the epoch (``set_epoch``), fixes every draw.
        num_batches: batches per epoch; ``None`` = ``ceil(num_real / B)``.
    """

    def __init__(
        self,
        num_real: int,
        num_generated: int,
        batch_size: int,
        real_fraction: float,
        seed: int = 0,
        *,
        num_batches: Optional[int] = None,
    ) -> None:
        if num_real < 1 or num_generated < 1:
            raise ValueError(f"both sets must be non-empty; got {num_real} real and {num_generated} generated images.")
        self.num_real, self.num_generated = int(num_real), int(num_generated)
        self.batch_size, self.seed, self.epoch = int(batch_size), int(seed), 0
        self.generated_per_batch = int(self.batch_size * (1.0 - real_fraction))
        self.real_per_batch = self.batch_size - self.generated_per_batch
        if self.generated_per_batch < 1:
            raise ValueError(
                f"a global batch of {batch_size} holds int({batch_size} * {1 - real_fraction:g}) = 0 generated images; "
                "use a larger batch (the DDPM recipes use 128) or a smaller real_fraction."
            )
        check_positive_int(num_batches, "num_batches", allow_none=True)
        self.num_batches = math.ceil(self.num_real / self.batch_size) if num_batches is None else num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def batches(self) -> List[np.ndarray]:
        """This epoch's global batches (index arrays of length ``batch_size``)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        out: List[np.ndarray] = []
        while len(out) < self.num_batches:
            shuffled = rng.permutation(self.num_real)  # a fresh shuffle of the real set
            for start in range(0, self.num_real, self.real_per_batch):
                if len(out) == self.num_batches:
                    break
                real = shuffled[start : start + self.real_per_batch]
                generated = self.num_real + rng.integers(0, self.num_generated, size=self.batch_size - len(real))
                batch = np.empty(self.batch_size, dtype=np.int64)
                is_real = np.zeros(self.batch_size, dtype=bool)
                is_real[spread_positions(len(real), self.batch_size)] = True
                batch[is_real], batch[~is_real] = real, generated
                out.append(batch)
        return out

    def __iter__(self) -> Iterator[int]:
        batches = self.batches()
        yield from np.concatenate(batches).tolist()

    def real_mask(self, indices: Optional[np.ndarray] = None) -> np.ndarray:
        """Helper for checks: which of the sampled indices are real images."""
        order = np.fromiter(iter(self), dtype=np.int64) if indices is None else np.asarray(indices)
        return order < self.num_real
