"""Datasets in hf_csr's convention (uint8 or [0, 1] images, integer labels) and the training collator."""

from .core import RobustImageCollator, TensorImageDataset, augment_batch, check_labels_in_range, to_unit_float
from .mixing import MixedBatchOrderSampler, MixedImageDataset
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    balanced_subset,
    fashion_mnist_dir,
    load_fashion_mnist,
)
from .sources import BUILTIN_DATASETS, load_image_dataset, stratified_subset

__all__ = [
    "BUILTIN_DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MixedBatchOrderSampler",
    "MixedImageDataset",
    "RobustImageCollator",
    "TensorImageDataset",
    "augment_batch",
    "balanced_subset",
    "check_labels_in_range",
    "fashion_mnist_dir",
    "load_fashion_mnist",
    "load_image_dataset",
    "stratified_subset",
    "to_unit_float",
]
