"""Image-classification datasets from anywhere, as :class:`TensorImageDataset` (uint8 images, int labels).

``load_image_dataset(name_or_path, split)`` accepts

* a name from the dataset registry (:mod:`hf_csr.data.registry`): ``fashion_mnist`` (the embedded
  default, from the Debian package ``dataset-fashion-mnist``), ``cifar10``, ``cifar100``,
  ``tiny_imagenet`` or one added with ``register_dataset``;
* a local ``.npz`` file with an ``image`` array (N, H, W, C) or (N, H, W) of uint8 and a ``label``
  array (N,), the layout of the DDPM-generated data of ``docs/method.md`` section 9;
* anything ``datasets`` loads: a Hub id (``uoft-cs/cifar10``, ``zh-plus/tiny-imagenet``), a local folder
  (imagefolder, parquet files, or a ``Dataset.save_to_disk`` folder) or a local ``.parquet`` file.
  The image column is the first ``Image`` feature (else one named ``image``/``img``), the label column
  the first ``ClassLabel`` (else one named ``label``/``labels``/...); both can be given.

Images are decoded once into one uint8 array, so this suits evaluation sets and small training sets.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..validation import check_channels_last_images, check_class_indices, check_positive_int
from .core import TensorImageDataset
from .registry import DATASETS
from .sampling import stratified_subset

__all__ = ["load_image_dataset", "dataset_from_arrays", "load_hf_dataset", "pick_column", "hf_images", "hf_labels"]

logger = logging.getLogger(__name__)

_IMAGE_COLUMNS = ("image", "img", "images", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")



def _names_for(labels: np.ndarray, class_names: Optional[Sequence[str]]) -> list:
    if class_names is not None:
        return [str(n) for n in class_names]
    return [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]


def _load_npz(path: Path, image_key: Optional[str], label_key: Optional[str], class_names, limit, seed):
    image_key, label_key = image_key or "image", label_key or "label"
    # A truncated or damaged archive fails in np.load (not a zip) or while an array is read (bad CRC,
    # short data): either way the error names the file. Pickled (object) arrays are never loaded.
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    try:
        archive = np.load(path, allow_pickle=False)
    except unreadable as error:
        raise ValueError(f"cannot read the npz file {path}: {error} (the file is truncated or corrupted, or not an npz)") from error
    with archive:
        missing = [key for key in (image_key, label_key) if key not in archive.files]
        if missing:
            raise ValueError(
                f"{path} has no {missing} array(s); it holds {archive.files}. Pass image_column/label_column "
                "to name the image and label arrays."
            )
        try:
            images, labels = archive[image_key], archive[label_key].reshape(-1)
        except unreadable as error:
            raise ValueError(f"cannot read the npz file {path}: {error} (the file is truncated or corrupted)") from error
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels; the two must have the same length.")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"{path}: '{image_key}' must be uint8 (N, H, W, C) or (N, H, W); got {images.dtype} {images.shape}."
        )
    # The same layout rule as `hf-csr convert-data`: channels last, 1 or 3 channels.
    check_channels_last_images(images.shape, f"{path}: '{image_key}'")
    # Integer dtype (float labels are refused, not truncated) and a bounded range, checked before
    # anything sized by the largest label (the class-name list) is allocated.
    labels = check_class_indices(labels, f"{path}: '{label_key}'",
                                 None if class_names is None else len(class_names))
    images = images[..., None] if images.ndim == 3 else images
    if limit is not None and limit < len(labels):
        keep = stratified_subset(labels, limit, seed)
        images, labels = images[keep], labels[keep]
    return dataset_from_arrays(images, labels, _names_for(labels, class_names), path.name)


def load_hf_dataset(name_or_path: str, split: str):
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} has no split {split!r}; it has {list(loaded)}. Pass split=...")
            loaded = loaded[split]
        return loaded
    try:
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)
        return datasets.load_dataset(name_or_path, split=split)
    except (ValueError, FileNotFoundError):
        raise  # datasets' own messages name the split / path
    except Exception as error:  # offline, unreachable Hub, unknown repo, broken files
        offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
        hint = (" HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and the dataset is not in the local cache: download it "
                "once with network access, or pass a local folder, .parquet or .npz file.") if offline else \
            " Check the name (a Hub dataset id, a local folder, a .parquet or .npz file) and the network."
        raise ValueError(
            f"cannot load the dataset {name_or_path!r} (split {split!r}): {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}.{hint}"
        ) from error


def pick_column(dataset, given: Optional[str], feature_type, names: Tuple[str, ...], what: str, option: str) -> str:
    columns = list(dataset.column_names)
    if given is not None:
        if given not in columns:
            raise ValueError(f"the dataset has no {what} column {given!r}; its columns are {columns}.")
        return given
    typed = [c for c in columns if isinstance(dataset.features[c], feature_type)]
    named = [c for c in columns if c.lower() in names]
    if typed or named:
        return (typed or named)[0]
    raise ValueError(f"cannot find a {what} column among {columns}; name it with {option}=...")


def hf_labels(dataset, column: str, class_names) -> Tuple[np.ndarray, list]:
    import datasets

    feature = dataset.features[column]
    values = np.asarray(dataset[column])
    if isinstance(feature, datasets.ClassLabel):
        return values.astype(np.int64), list(feature.names)
    if values.dtype.kind in "US":  # string labels: their order is class_names', else sorted
        names = [str(n) for n in class_names] if class_names is not None else sorted(set(values.tolist()))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(values.tolist()) - set(index))
        if unknown:
            raise ValueError(f"label column {column!r} has labels {unknown[:5]} that are not in class_names {names}.")
        return np.array([index[v] for v in values.tolist()], dtype=np.int64), names
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"label column {column!r} must hold class indices or names; got {feature}.")
    values = check_class_indices(values, f"label column {column!r}", None if class_names is None else len(class_names))
    return values, _names_for(values, class_names)


def hf_images(dataset, column: str, num_channels: Optional[int]) -> np.ndarray:
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        if num_channels is not None:
            mode = "L" if num_channels == 1 else "RGB"
        else:
            first = dataset.select([0]).cast_column(column, datasets.Image())[0][column]
            mode = "L" if first.mode in _GRAYSCALE_MODES else "RGB"
        dataset = dataset.cast_column(column, datasets.Image(mode=mode))
    images = dataset.select_columns([column]).with_format("numpy")[:][column]
    if images.dtype == object:
        raise ValueError(
            f"the images in column {column!r} differ in size; resize them to one size first "
            "(e.g. with dataset.map) before evaluating."
        )
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"image column {column!r} must decode to uint8 images; got {images.dtype} {images.shape}.")
    return images[..., None] if images.ndim == 3 else images


def load_image_dataset(
    name_or_path: Union[str, Path],
    split: str = "test",
    *,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
    num_channels: Optional[int] = None,
) -> TensorImageDataset:
    """Load an image-classification split as a :class:`TensorImageDataset` (uint8 images, CHW on access).

    Args:
        name_or_path: a registered dataset name (``fashion_mnist``, ``cifar10``, ...), a ``.npz`` file, a ``.parquet`` file, a local ``datasets`` folder
            or a Hub dataset id (see the module docstring).
        split: the split to load (ignored for ``.npz`` files, which hold one split).
        image_column / label_column: the columns (npz: the array names) to use; auto-detected by default.
        limit: keep a class-stratified random subset of this many examples (chosen with ``seed``).
        class_names: names for the classes when the source has none (npz files, integer label
            columns), or the order of string labels. Names from a ``ClassLabel`` feature take precedence.
        num_channels: decode images to 1 (grayscale) or 3 (RGB) channels; default: the first image's.
    """
    check_positive_int(limit, "limit", allow_none=True)
    if num_channels not in (None, 1, 3):
        raise ValueError(f"num_channels must be 1, 3 or None; got {num_channels!r}.")
    text = str(name_or_path)
    path = Path(text).expanduser()
    info = DATASETS.get(text) if not path.exists() else None
    if info is not None and info.loader is not None:
        return info.loader(split, limit=limit, seed=seed)
    if info is not None:
        text, path = info.hub_id, Path(info.hub_id)
        class_names = class_names if class_names is not None else (info.class_names or None)
        num_channels = num_channels or info.num_channels
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"no npz file at {path}.")
        return _load_npz(path, image_column, label_column, class_names, limit, seed)
    import datasets

    dataset = load_hf_dataset(str(path) if path.exists() else text, split)
    image_column = pick_column(dataset, image_column, datasets.Image, _IMAGE_COLUMNS, "image", "image_column")
    label_column = pick_column(dataset, label_column, datasets.ClassLabel, _LABEL_COLUMNS, "label", "label_column")
    if len(dataset) == 0:
        raise ValueError(f"the {split!r} split of {text} is empty.")
    labels, names = hf_labels(dataset, label_column, class_names)
    if limit is not None and limit < len(labels):
        keep = stratified_subset(labels, limit, seed)
        dataset, labels = dataset.select(keep), labels[keep]
    images = hf_images(dataset, image_column, num_channels)
    return dataset_from_arrays(images, labels, names, f"{path.name or text}[{split}]")


def dataset_from_arrays(images: np.ndarray, labels: np.ndarray, names: Sequence[str], name: str) -> TensorImageDataset:
    """(N, H, W, C) uint8 images as a dataset that yields (C, H, W)."""
    check_channels_last_images(images.shape, name)
    return TensorImageDataset(torch.from_numpy(np.ascontiguousarray(images)), labels, names, channels_last_input=True,
                              name=name)
