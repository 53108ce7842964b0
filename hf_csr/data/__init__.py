"""Datasets in hf_csr's convention (uint8 or [0, 1] images, integer labels), the dataset registry, subsets and
the training collator."""

from ..lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "RobustImageCollator": ".core",
    "TensorImageDataset": ".core",
    "augment_batch": ".core",
    "check_labels_in_range": ".core",
    "to_unit_float": ".core",
    "MixedBatchOrderSampler": ".mixing",
    "MixedImageDataset": ".mixing",
    "DATASETS": ".registry",
    "DatasetInfo": ".registry",
    "FASHION_MNIST_CLASSES": ".registry",
    "dataset_info": ".registry",
    "dataset_keys": ".registry",
    "register_dataset": ".registry",
    "FASHION_MNIST_MEAN": ".fashion_mnist",
    "FASHION_MNIST_STD": ".fashion_mnist",
    "fashion_mnist_dir": ".fashion_mnist",
    "load_fashion_mnist": ".fashion_mnist",
    "long_tail_counts": ".sampling",
    "long_tail_indices": ".sampling",
    "stratified_subset": ".sampling",
    "load_image_dataset": ".sources",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
