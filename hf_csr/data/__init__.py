"""Datasets in hf_csr's convention (uint8 or [0, 1] images, integer labels) and the training collator."""

from ..lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "RobustImageCollator": ".core",
    "TensorImageDataset": ".core",
    "augment_batch": ".core",
    "check_labels_in_range": ".core",
    "to_unit_float": ".core",
    "MixedBatchOrderSampler": ".mixing",
    "MixedImageDataset": ".mixing",
    "FASHION_MNIST_CLASSES": ".fashion_mnist",
    "FASHION_MNIST_MEAN": ".fashion_mnist",
    "FASHION_MNIST_STD": ".fashion_mnist",
    "balanced_subset": ".fashion_mnist",
    "fashion_mnist_dir": ".fashion_mnist",
    "load_fashion_mnist": ".fashion_mnist",
    "BUILTIN_DATASETS": ".sources",
    "load_image_dataset": ".sources",
    "stratified_subset": ".sources",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
