"""Real + generated data in fixed proportions per batch (the DDPM-data recipes: 30% real, 70% generated).

:class:`MixedImageDataset` concatenates the two datasets; :class:`MixedBatchOrderSampler` yields
indices so that every consecutive block of ``batch_size`` holds ``round(real_fraction * batch_size)``
real images and the rest generated ones. The Trainer's DataLoader cuts exactly those blocks (and
Accelerate hands whole blocks to each process), so every per-device batch has the proportions.
An epoch visits every generated image once; real images are drawn without replacement and
reshuffled whenever they run out.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["MixedImageDataset", "MixedBatchOrderSampler"]


class MixedImageDataset(Dataset):
    """Indices ``[0, len(real))`` are real images, the rest generated ones (same classes)."""

    def __init__(self, real: Dataset, generated: Dataset, *, real_fraction: float = 0.3) -> None:
        if not 0.0 < real_fraction < 1.0:
            raise ValueError(f"real_fraction must lie in (0, 1) (the DDPM recipes use 0.3); got {real_fraction}.")
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
        return MixedBatchOrderSampler(len(self.real), len(self.generated), batch_size, self.real_fraction, seed)


class MixedBatchOrderSampler(Sampler[int]):
    """Index order with ``real_per_batch`` real images at the start of every block of ``batch_size``.

    Deterministic for a given ``seed`` and epoch (``set_epoch``), so all processes agree.
    """

    def __init__(self, num_real: int, num_generated: int, batch_size: int, real_fraction: float, seed: int = 0) -> None:
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 to mix real and generated images; got {batch_size}.")
        self.num_real, self.num_generated = num_real, num_generated
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.real_per_batch = min(batch_size - 1, max(1, round(real_fraction * batch_size)))
        self.generated_per_batch = batch_size - self.real_per_batch
        self.num_batches = math.ceil(num_generated / self.generated_per_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        generated = rng.permutation(self.num_generated)
        generated = np.concatenate([generated, rng.permutation(self.num_generated)])  # tops up the last batch
        real_needed = self.num_batches * self.real_per_batch
        rounds = math.ceil(real_needed / self.num_real)
        real = np.concatenate([rng.permutation(self.num_real) for _ in range(rounds)])
        for b in range(self.num_batches):
            yield from real[b * self.real_per_batch : (b + 1) * self.real_per_batch].tolist()
            start = b * self.generated_per_batch
            yield from (self.num_real + generated[start : start + self.generated_per_batch]).tolist()

    def real_mask(self, indices: Optional[np.ndarray] = None) -> np.ndarray:
        """Helper for checks: which of the sampled indices are real images."""
        order = np.fromiter(iter(self), dtype=np.int64) if indices is None else np.asarray(indices)
        return order < self.num_real
