"""Datasets in hf_csr's convention (uint8 or [0, 1] images, integer labels), the dataset registry, subsets and
the training collator."""

from .core import RobustImageCollator, TensorImageDataset, augment_batch, check_labels_in_range, to_unit_float
from .mixing import MixedBatchOrderSampler, MixedImageDataset
from .registry import DATASETS, FASHION_MNIST_CLASSES, DatasetInfo, dataset_info, dataset_keys, register_dataset
from .fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_dir, load_fashion_mnist
from .sampling import long_tail_counts, long_tail_indices, stratified_subset
from .sources import load_image_dataset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MixedBatchOrderSampler",
    "MixedImageDataset",
    "RobustImageCollator",
    "TensorImageDataset",
    "augment_batch",
    "check_labels_in_range",
    "dataset_info",
    "dataset_keys",
    "fashion_mnist_dir",
    "load_fashion_mnist",
    "load_image_dataset",
    "long_tail_counts",
    "long_tail_indices",
    "register_dataset",
    "stratified_subset",
    "to_unit_float",
]
