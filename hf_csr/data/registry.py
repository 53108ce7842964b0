"""The datasets hf_csr knows by name: what each one is (classes, channels, image size, normalisation) and
where it loads from. Everything else -- the loaders, the backbones' pretrained configs, the published
checkpoints, the model cards, the runner -- reads these entries instead of keeping its own copy.

``register_dataset`` adds a dataset of your own; ``load_image_dataset(name)`` then loads it by name::

    from hf_csr.data import register_dataset

    register_dataset("my_cifar", class_names=[...], num_channels=3, image_size=32,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), hub_id="me/my-cifar")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..validation import check_positive_int

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DATASETS",
    "DatasetInfo",
    "FASHION_MNIST_CLASSES",
    "IDENTITY_MEAN",
    "IDENTITY_STD",
    "dataset_info",
    "dataset_keys",
    "register_dataset",
]

#: Loader of a dataset that ``datasets`` cannot read: ``loader(split, *, limit, seed) -> TensorImageDataset``.
Loader = Callable[..., object]


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its key, display name, classes, image geometry, normalisation and source.

    ``hub_id`` is the Hub dataset model cards link to and ``load_image_dataset`` reads, unless ``loader``
    is set: then the loader loads the data (e.g. Fashion-MNIST's local idx files). ``class_names``
    may be empty when the data names its classes itself (``num_classes`` is known either way)."""

    key: str
    name: str
    num_classes: int
    num_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    hub_id: Optional[str] = None
    class_names: Tuple[str, ...] = ()
    loader: Optional[Loader] = None
    source: str = ""

    @property
    def input_size(self) -> Tuple[int, int, int]:
        return (self.num_channels, self.image_size, self.image_size)


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)
#: No normalisation: networks that see raw [0, 1] pixels (the TRADES checkpoints).
IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1.0, 1.0, 1.0)


def _load_fashion_mnist(split: str, *, limit: Optional[int] = None, seed: int = 0):
    from .fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(split, limit=limit, seed=seed)


DATASETS: Dict[str, DatasetInfo] = {}


def register_dataset(
    key: str,
    *,
    num_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] = (),
    num_classes: Optional[int] = None,
    name: Optional[str] = None,
    hub_id: Optional[str] = None,
    loader: Optional[Loader] = None,
    source: str = "",
    overwrite: bool = False,
) -> DatasetInfo:
    """Add a dataset under ``key`` (``load_image_dataset(key)``, ``--dataset key``) and return its entry.

    Give ``hub_id`` (a ``datasets`` Hub id or local path), ``loader`` (``loader(split, *, limit, seed)``
    returning a :class:`~hf_csr.data.TensorImageDataset`; used in place of ``hub_id``) or both. ``mean`` /
    ``std`` have one value per channel. Registering a key again raises unless ``overwrite=True``.
    """
    if not isinstance(key, str) or not key or "/" in key:
        raise ValueError(f"a dataset key is a non-empty name without '/'; got {key!r}.")
    if key in DATASETS and not overwrite:
        raise ValueError(f"the dataset {key!r} is registered already; pass overwrite=True to replace it.")
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3; got {num_channels!r}.")
    check_positive_int(image_size, "image_size")
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != num_channels or len(std) != num_channels or min(std) <= 0:
        raise ValueError(
            f"mean and std need one value per channel ({num_channels}) and a positive std; got mean {mean}, std {std}."
        )
    class_names = tuple(str(c) for c in class_names)
    num_classes = len(class_names) if num_classes is None else num_classes
    check_positive_int(num_classes, "num_classes")
    if class_names and len(class_names) != num_classes:
        raise ValueError(f"num_classes = {num_classes} but {len(class_names)} class_names were given.")
    if hub_id is None and loader is None:
        raise ValueError("give hub_id (where `datasets` loads the data from) or loader (a function), or both.")
    info = DatasetInfo(key, name or key, num_classes, num_channels, image_size, mean, std, hub_id, class_names,
                       loader, source or (f"the Hub dataset {hub_id}" if hub_id else "a custom loader"))
    DATASETS[key] = info
    return info


def dataset_info(key: Optional[str], name: str = "dataset") -> Optional[DatasetInfo]:
    """The registered dataset ``key`` (None for None); ``ValueError`` naming ``name`` and the registered keys
    for any other key."""
    if key is None:
        return None
    if key not in DATASETS:
        raise ValueError(
            f"{name} must be a registered dataset ({', '.join(sorted(DATASETS))}) or None; got {key!r}. "
            "hf_csr.data.register_dataset adds one."
        )
    return DATASETS[key]


def dataset_keys() -> List[str]:
    return sorted(DATASETS)


register_dataset(
    "fashion_mnist", name="Fashion-MNIST", class_names=FASHION_MNIST_CLASSES, num_channels=1, image_size=28,
    mean=(0.2860,), std=(0.3530,), hub_id="zalando-datasets/fashion_mnist", loader=_load_fashion_mnist,
    source="the idx files of the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, or "
           "HF_CSR_FASHION_MNIST_DIR)",
)
register_dataset(
    "cifar10", name="CIFAR-10", class_names=CIFAR10_CLASSES, num_channels=3, image_size=32,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616), hub_id="uoft-cs/cifar10",
)
register_dataset(
    "cifar100", name="CIFAR-100", class_names=CIFAR100_CLASSES, num_channels=3, image_size=32,
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), hub_id="uoft-cs/cifar100",
)
register_dataset(
    "tiny_imagenet", name="Tiny ImageNet", num_classes=200, num_channels=3, image_size=64,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), hub_id="zh-plus/tiny-imagenet",
)
