"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` -- hf_csr's embedded default.

``apt-get install dataset-fashion-mnist`` puts the original idx files under
``/usr/share/datasets/fashion-mnist``; ``HF_CSR_FASHION_MNIST_DIR`` points elsewhere. Its shirt,
pullover and coat classes are hard to tell apart, so worst-class accuracy means something even for a
small model trained on a CPU.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .core import TensorImageDataset
from .registry import DATASETS, FASHION_MNIST_CLASSES
from .sampling import stratified_subset

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "fashion_mnist_dir", "load_fashion_mnist"]

#: Fashion-MNIST's normalisation, as the dataset registry holds it.
FASHION_MNIST_MEAN = DATASETS["fashion_mnist"].mean
FASHION_MNIST_STD = DATASETS["fashion_mnist"].std
_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_dir(root: Optional[Union[str, Path]] = None) -> Path:
    path = Path(root or os.environ.get("HF_CSR_FASHION_MNIST_DIR", _DEFAULT_DIR))
    if not (path / _FILES["train"][0]).exists():
        raise FileNotFoundError(
            f"Fashion-MNIST idx files not found in {path}. Install them with "
            "`sudo apt-get install dataset-fashion-mnist`, or set HF_CSR_FASHION_MNIST_DIR to a folder holding "
            f"{', '.join(_FILES['train'] + _FILES['test'])}."
        )
    return path


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read the idx file {path}: {error}") from error
    if len(data) < 4:
        raise ValueError(f"{path} is not an idx file (too short).")
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
        raise ValueError(f"{path} is not a uint8 idx file with {expected_dims} dimensions.")
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}.")
    return body.reshape(shape)


def load_fashion_mnist(
    split: str = "train", *, root: Optional[Union[str, Path]] = None, limit: Optional[int] = None, seed: int = 0
) -> TensorImageDataset:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as uint8 1 x 28 x 28 images.

    ``limit`` keeps a class-stratified random subset of that many examples (chosen with ``seed``; see
    :func:`~hf_csr.data.sampling.stratified_subset`).
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}; got {split!r}.")
    folder = fashion_mnist_dir(root)
    image_file, label_file = _FILES[split]
    images = _read_idx(folder / image_file, 3)[:, None]  # (N, 1, 28, 28)
    labels = _read_idx(folder / label_file, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split.")
    dataset = TensorImageDataset(
        torch.from_numpy(images.copy()), labels, FASHION_MNIST_CLASSES, name=f"fashion_mnist[{split}]"
    )
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(stratified_subset(labels, limit, seed), name=f"fashion_mnist[{split}][:{limit}]")
    return dataset
