"""Image-classification datasets in hf_csr's convention, and the batched augmenting collator.

Every dataset yields ``{"pixel_values": uint8 or float (C, H, W), "labels": int}``; the collator turns a
list of such items into float ``pixel_values`` in [0, 1] (no normalisation: the model does that) and,
for training, applies the standard augmentation -- random crop with zero padding and horizontal flip --
to the whole batch at once, without a Python loop over examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..validation import check_labels_in_range

__all__ = ["TensorImageDataset", "RobustImageCollator", "to_unit_float", "check_labels_in_range"]


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images are returned as float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.float()
    raise ValueError(
        f"images must be uint8 (0..255) or floating point in [0, 1]; got dtype {images.dtype}."
    )


class TensorImageDataset(Dataset):
    """Images held as one (N, C, H, W) uint8 or float tensor (or numpy array / memmap) plus labels.

    Args:
        images: (N, C, H, W) channels-first, or (N, H, W, C) with ``channels_last_input=True``.
        labels: (N,) integer class indices.
        class_names: one name per class (defines ``num_classes``).
    """

    def __init__(
        self,
        images,
        labels,
        class_names: Sequence[str],
        *,
        channels_last_input: bool = False,
        name: str = "dataset",
    ) -> None:
        self.name = name
        self.class_names = [str(c) for c in class_names]
        labels = torch.as_tensor(np.asarray(labels))
        if labels.is_floating_point() and labels.numel() and not bool(torch.equal(labels, labels.round())):
            raise ValueError(
                f"{name}: labels must be integer class indices; got {labels.dtype} values such as "
                f"{labels[labels != labels.round()][:3].tolist()}. Float labels are never truncated."
            )
        labels = labels.long().reshape(-1)
        if len(images) != len(labels):
            raise ValueError(
                f"{name}: {len(images)} images but {len(labels)} labels; the two must have the same length."
            )
        if images.ndim != 4:
            raise ValueError(f"{name}: images must be 4-dimensional (N, C, H, W); got shape {tuple(images.shape)}.")
        self.images = images
        self.channels_last_input = channels_last_input
        self.labels = labels
        if len(self.class_names) < 2:
            raise ValueError(f"{name}: at least 2 class names are needed; got {self.class_names}.")
        check_labels_in_range(labels, len(self.class_names), what=name)
        if isinstance(images, torch.Tensor):
            valid = images.dtype == torch.uint8 or images.is_floating_point()
        else:
            valid = images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)
        if not valid:
            raise ValueError(f"{name}: images must be uint8 or floating point in [0, 1]; got dtype {images.dtype}.")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self):
        shape = tuple(self.images.shape[1:])
        return (shape[2], shape[0], shape[1]) if self.channels_last_input else shape

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, index) -> torch.Tensor:
        image = self.images[index]
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.ascontiguousarray(image))
        if self.channels_last_input:
            # canonical strides: .contiguous() keeps movedim's strides for 1-channel images (size-1 dims
            # count as contiguous), and a model that flattens with .view then fails
            image = image.movedim(-1, -3).clone(memory_format=torch.contiguous_format)
        return image

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"pixel_values": self._image(index), "labels": self.labels[index]}

    def tensors(self, indices: Optional[Sequence[int]] = None):
        """All (or some) images as float [0, 1] tensors with their labels, for evaluation."""
        index = slice(None) if indices is None else torch.as_tensor(indices)
        images = self.images[index] if isinstance(self.images, torch.Tensor) else self.images[np.asarray(index)]
        images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if self.channels_last_input:
            images = images.movedim(-1, -3).clone(memory_format=torch.contiguous_format)  # canonical strides
        return to_unit_float(images), self.labels[index]

    def subset(self, indices: Sequence[int], name: Optional[str] = None) -> "TensorImageDataset":
        index = np.asarray(indices)
        images = self.images[torch.as_tensor(index)] if isinstance(self.images, torch.Tensor) else self.images[index]
        return TensorImageDataset(
            images, self.labels[torch.as_tensor(index)], self.class_names,
            channels_last_input=self.channels_last_input, name=name or self.name,
        )


@dataclass
class RobustImageCollator:
    """Stack examples into a batch of float ``pixel_values`` in [0, 1]; optionally augment it.

    ``crop_padding``: zero-pad by this many pixels and crop back at a random offset (0 disables).
    ``horizontal_flip``: flip half of the images left-right (leave off for digits and text).
    Randomness comes from torch's global generator. (:class:`~hf_csr.CSRTrainer` augments on the
    device itself instead, from generators keyed by the step, so that resumed and data-parallel runs
    see exactly the same augmented images.)
    """

    augment: bool = False
    crop_padding: int = 4
    horizontal_flip: bool = True

    def __call__(self, examples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        images = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
        labels = torch.as_tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        pixels = to_unit_float(images)
        if self.augment:
            pixels = augment_batch(pixels, self.crop_padding, self.horizontal_flip)
        return {"pixel_values": pixels, "labels": labels}


def augment_batch(
    pixels: torch.Tensor,
    crop_padding: int,
    horizontal_flip: bool,
    *,
    generator: Optional[torch.Generator] = None,
    global_size: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip for a whole (N, C, H, W) batch.

    The random offsets and flips are drawn for ``global_size`` examples (default N) from ``generator``
    (default: torch's global generator) and rows ``offset:offset + N`` are used, so a batch split
    across processes is augmented exactly as the whole batch would be.
    """
    n, _, h, w = pixels.shape
    total = n if global_size is None else global_size
    device = pixels.device
    if crop_padding > 0:
        p = crop_padding
        shifts = torch.randint(0, 2 * p + 1, (2, total), generator=generator, device=device)[:, offset : offset + n]
        padded = torch.nn.functional.pad(pixels, (p, p, p, p))
        rows = (shifts[0][:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None]  # (N, 1, H, 1)
        cols = (shifts[1][:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :]  # (N, 1, 1, W)
        batch = torch.arange(n, device=device)[:, None, None, None]
        chans = torch.arange(pixels.shape[1], device=device)[None, :, None, None]
        pixels = padded[batch, chans, rows, cols]
    if horizontal_flip:
        flip = (torch.rand(total, generator=generator, device=device) < 0.5)[offset : offset + n]
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    return pixels.contiguous()
