"""DDPM-generated training data (Wang et al. 2023) as memory-mapped shards.

The generated CIFAR images of the Hub dataset repo ``P2333/DM-Improves-AT`` come as ``.npz`` files
(``cifar10/1m.npz``, and 5M ... 50M images in several parts) holding ``image`` (uint8, N x 32 x 32 x 3)
and ``label``. :func:`convert_generated_data` streams them, chunk by chunk, straight out of the zip
archive (decompressing on the fly, never a whole array in memory) into raw ``.npy`` shards;
:class:`GeneratedImageDataset` memory-maps the shards, so the trainer reads images from the page
cache without holding them in RAM (only the labels, 8 bytes per image, are loaded).

Output directory layout::

    metadata.json                    written last: its presence marks a complete conversion
    images-00000.npy, labels-00000.npy, images-00001.npy, ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from numpy.lib import format as npy_format
from tqdm.auto import tqdm

from ..utils import atomic_write_json, hub_file
from ..validation import check_positive_int
from .core import TensorImageDataset
from .registry import dataset_info

__all__ = [
    "DDPM_DATA_REPO",
    "GeneratedImageDataset",
    "ShardedArray",
    "convert_generated_data",
    "download_generated_data",
    "find_conversion",
]

logger = logging.getLogger(__name__)

DDPM_DATA_REPO = "P2333/DM-Improves-AT"
_FORMAT = "hf_csr.generated_images"
_METADATA = "metadata.json"
#: what zipfile / zlib raise on a truncated or corrupted archive
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)
PathLike = Union[str, os.PathLike]


def download_generated_data(
    filename: str = "cifar10/1m.npz",
    *,
    repo_id: str = DDPM_DATA_REPO,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Optional[Union[str, bool]] = None,
    local_files_only: bool = False,
) -> Path:
    """Download one ``.npz`` file of generated images from a Hub dataset repo into the HF cache."""
    return hub_file(
        repo_id, filename, repo_type="dataset", revision=revision, cache_dir=cache_dir, token=token,
        local_files_only=local_files_only,
    )


# --------------------------------------------------------------------------- reading npz members as streams
@contextlib.contextmanager
def _npz_member(archive: zipfile.ZipFile, key: str, path: Path) -> Iterator[Tuple[Any, tuple, np.dtype]]:
    """An open stream positioned at the data of array ``key``, with its shape and dtype."""
    member = f"{key}.npy"
    if member not in archive.namelist():
        keys = sorted(name[:-4] for name in archive.namelist() if name.endswith(".npy"))
        raise ValueError(f"{str(path)!r} has no {key!r} array (it holds {keys}); expected 'image' and 'label'.")
    with archive.open(member) as stream:
        try:
            version = npy_format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(stream)
        except ValueError as error:
            raise ValueError(f"{str(path)!r}: array {key!r} has an invalid .npy header ({error}).") from error
        if fortran_order:
            raise ValueError(f"{str(path)!r}: array {key!r} is stored in Fortran order; save it C-contiguous.")
        yield stream, shape, dtype


def _inspect(path: Path) -> Tuple[tuple, np.dtype]:
    """Validate an npz's headers (no data read): -> (image shape, label dtype)."""
    try:
        with zipfile.ZipFile(path) as archive:
            with _npz_member(archive, "image", path) as (_, image_shape, image_dtype):
                pass
            with _npz_member(archive, "label", path) as (_, label_shape, label_dtype):
                pass
    except _ARCHIVE_ERRORS as error:
        raise ValueError(f"cannot read {str(path)!r} as an npz archive: {error}. Is it truncated or corrupted?") from error
    if image_dtype != np.uint8 or len(image_shape) != 4 or image_shape[3] not in (1, 3):
        raise ValueError(
            f"{str(path)!r}: 'image' must be uint8 of shape (N, H, W, C) with C = 1 or 3 (channels last); "
            f"got {image_dtype} {image_shape}."
        )
    if len(label_shape) != 1 or label_dtype.kind not in "iu":
        raise ValueError(f"{str(path)!r}: 'label' must be a 1-D integer array; got {label_dtype} {label_shape}.")
    if label_shape[0] != image_shape[0]:
        raise ValueError(
            f"{str(path)!r}: {image_shape[0]} images but {label_shape[0]} labels; the two must have the same length."
        )
    return tuple(image_shape), label_dtype


def _read_rows(stream, rows: int, row_shape: tuple, dtype: np.dtype, path: Path, key: str) -> np.ndarray:
    size = rows * int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"{str(path)!r}: array {key!r} ends early (truncated file); re-download it.")
    return np.frombuffer(data, dtype=dtype).reshape((rows,) + row_shape)


def _write_npy_header(handle, dtype: np.dtype, shape: tuple) -> None:
    header = {"descr": npy_format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    npy_format.write_array_header_2_0(handle, header)


# --------------------------------------------------------------------------- conversion
def find_conversion(
    output_dir: PathLike, sources: Optional[Sequence[PathLike]] = None, *, num_classes: Optional[int] = None
) -> Optional["GeneratedImageDataset"]:
    """The finished conversion in ``output_dir``, or ``None`` when there is none to reuse.

    A conversion is finished when its ``metadata.json`` (written last, atomically) is there and its shards
    open; with ``sources`` it must have been made from files of the same names and sizes, in the same
    order, and with ``num_classes`` hold that many classes. An interrupted conversion (no metadata), a
    damaged one or one of other files gives ``None`` (and a log line saying why): convert again.
    """
    output = Path(output_dir)
    if not (output / _METADATA).is_file():
        if output.is_dir() and any(output.iterdir()):
            logger.info("%s holds no finished conversion (no %s): converting again", output, _METADATA)
        return None
    try:
        dataset = GeneratedImageDataset(output)
        recorded = json.loads((output / _METADATA).read_text(encoding="utf-8")).get("sources", [])
    except (ValueError, OSError) as error:
        logger.warning("the conversion in %s cannot be used (%s): converting again", output, error)
        return None
    if sources is not None:
        wanted = [{"name": Path(p).name, "bytes": Path(p).stat().st_size} for p in sources]
        found = [{"name": r.get("name"), "bytes": r.get("bytes")} for r in recorded]
        if wanted != found:
            logger.warning("the conversion in %s was made from %s, not %s: converting again", output, found, wanted)
            return None
    if num_classes is not None and dataset.num_classes != num_classes:
        logger.warning("the conversion in %s has %d classes, not %d: converting again", output, dataset.num_classes, num_classes)
        return None
    return dataset


def convert_generated_data(
    sources: Union[PathLike, Sequence[PathLike]],
    output_dir: PathLike,
    *,
    dataset: str = "cifar10",
    class_names: Optional[Sequence[str]] = None,
    shard_size: int = 1_000_000,
    chunk_size: int = 4096,
    overwrite: bool = False,
) -> "GeneratedImageDataset":
    """Stream generated-image ``.npz`` files into memory-mapped ``.npy`` shards.

    Memory stays at about ``chunk_size`` images (4096 x 3 KiB = 12 MiB for CIFAR) whatever the file sizes.

    Args:
        sources: one or several ``.npz`` files (e.g. the parts of the 50M set), concatenated in this order.
        output_dir: where the shards and ``metadata.json`` go (created).
        dataset / class_names: the classes the labels index (``"cifar10"`` or ``"cifar100"``, or explicit names).
        shard_size: images per shard file (1M CIFAR images = 3 GiB).
        chunk_size: images decompressed and written at a time.
        overwrite: replace an existing conversion in ``output_dir``.

    Returns:
        the converted data as a :class:`GeneratedImageDataset`.
    """
    paths = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(s) for s in sources]
    if not paths:
        raise ValueError("sources must name at least one .npz file.")
    if class_names is None:
        info = dataset_info(dataset, "dataset (or pass class_names)")
        if info is None or not info.class_names:
            raise ValueError(f"pass class_names=[...]: the dataset {dataset!r} does not name its classes.")
        class_names = info.class_names
    class_names = [str(name) for name in class_names]
    check_positive_int(shard_size, "shard_size")
    check_positive_int(chunk_size, "chunk_size")
    output = Path(output_dir)
    if (output / _METADATA).exists() and not overwrite:
        raise FileExistsError(f"{str(output)!r} already holds converted data; pass overwrite=True to replace it.")

    # Validate every file's headers before writing anything.
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"npz file {str(path)!r} does not exist.")
    headers = [_inspect(path) for path in paths]
    row_shape = headers[0][0][1:]
    for path, (shape, _) in zip(paths, headers):
        if shape[1:] != row_shape:
            raise ValueError(f"{str(path)!r} holds {shape[1:]} images but {str(paths[0])!r} holds {row_shape}.")
    total = sum(shape[0] for shape, _ in headers)
    if total == 0:
        raise ValueError(f"the npz files {[str(p) for p in paths]} hold no images.")

    output.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (output / _METADATA).unlink()  # an interrupted overwrite must not look complete
    # shards and half-written temporary files of an earlier (interrupted) conversion: redone from scratch
    for stale in [*output.glob("images-*.npy"), *output.glob("labels-*.npy"), *output.glob(".*.npy.tmp")]:
        stale.unlink()
    num_shards = -(-total // shard_size)
    shards = [
        {"images": f"images-{i:05d}.npy", "labels": f"labels-{i:05d}.npy", "num_examples": min(shard_size, total - i * shard_size)}
        for i in range(num_shards)
    ]
    writer = _ShardWriter(output, shards, row_shape)
    with tqdm(total=total, unit="img", desc="converting generated images", disable=None) as progress:
        try:
            for path, (shape, label_dtype) in zip(paths, headers):
                _stream_npz(path, shape, label_dtype, len(class_names), chunk_size, writer, progress)
        except BaseException:
            writer.abort()
            raise
    writer.close()
    atomic_write_json(
        output / _METADATA,
        {
            "format": _FORMAT,
            "version": 1,
            "num_examples": total,
            "image_shape": list(row_shape),
            "class_names": class_names,
            "sources": [{"name": p.name, "num_examples": s[0], "bytes": p.stat().st_size} for p, (s, _) in zip(paths, headers)],
            "shards": shards,
        },
    )
    logger.info("Converted %d generated images from %d file(s) into %d shard(s) in %s.", total, len(paths), num_shards, output)
    return GeneratedImageDataset(output)


def _stream_npz(path, shape, label_dtype, num_classes, chunk_size, writer, progress) -> None:
    try:
        _copy_npz(path, shape, label_dtype, num_classes, chunk_size, writer, progress)
    except _ARCHIVE_ERRORS as error:
        raise ValueError(f"cannot read {str(path)!r}: {error}. The file is truncated or corrupted; re-download it.") from error


def _copy_npz(path, shape, label_dtype, num_classes, chunk_size, writer, progress) -> None:
    """Copy one npz's arrays into the shards, ``chunk_size`` rows at a time."""
    count, row_shape = shape[0], shape[1:]
    with zipfile.ZipFile(path) as archive, contextlib.ExitStack() as stack:
        images, _, image_dtype = stack.enter_context(_npz_member(archive, "image", path))
        labels, _, _ = stack.enter_context(_npz_member(archive, "label", path))
        for start in range(0, count, chunk_size):
            rows = min(chunk_size, count - start)
            image_chunk = _read_rows(images, rows, row_shape, image_dtype, path, "image")
            label_chunk = _read_rows(labels, rows, (), label_dtype, path, "label")
            lo, hi = int(label_chunk.min()), int(label_chunk.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"{str(path)!r}: labels in [{lo}, {hi}] near image {start}, but there are {num_classes} classes; "
                    "pass the right dataset= or class_names=."
                )
            writer.write(image_chunk, label_chunk)
            progress.update(rows)
        # Reading to the end lets zipfile check the CRC of what was read.
        if images.read(1) or labels.read(1):
            raise ValueError(f"{str(path)!r}: trailing data after the arrays; the file is corrupted.")


class _ShardWriter:
    """Writes rows into consecutive ``.npy`` shards with plain file writes (not through a memory map,
    so written pages never count towards this process's resident memory); each shard appears under its
    final name only once complete."""

    def __init__(self, directory: Path, shards: List[Dict[str, Any]], row_shape: tuple) -> None:
        self.directory, self.shards, self.row_shape = directory, shards, row_shape
        self.index, self.filled, self.handles = -1, 0, None
        self.completed: List[Path] = []

    def _open_next(self) -> None:
        self._finish()
        self.index += 1
        shard = self.shards[self.index]
        self.filled = 0
        self.handles = []
        for key, dtype, shape in (("images", np.uint8, self.row_shape), ("labels", np.int64, ())):
            handle = open(self.directory / f".{shard[key]}.tmp", "wb")
            _write_npy_header(handle, dtype, (shard["num_examples"],) + shape)
            self.handles.append(handle)

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        start = 0
        while start < len(images):
            if self.handles is None or self.filled == self.shards[self.index]["num_examples"]:
                self._open_next()
            take = min(len(images) - start, self.shards[self.index]["num_examples"] - self.filled)
            self.handles[0].write(np.ascontiguousarray(images[start : start + take]).data)  # no copy
            self.handles[1].write(labels[start : start + take].astype("<i8").data)
            self.filled += take
            start += take

    def _finish(self) -> None:
        if self.handles is None:
            return
        shard = self.shards[self.index]
        for key, handle in zip(("images", "labels"), self.handles):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(self.directory / f".{shard[key]}.tmp", self.directory / shard[key])
            self.completed.append(self.directory / shard[key])
        self.handles = None

    def close(self) -> None:
        self._finish()

    def abort(self) -> None:
        """Remove everything written so far: a failed conversion leaves no shard behind."""
        for handle in self.handles or ():
            handle.close()
        for path in [*(Path(h.name) for h in self.handles or ()), *self.completed]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.handles, self.completed = None, []


# --------------------------------------------------------------------------- reading shards
def _map_npy(path: str) -> np.ndarray:
    """A read-only memory map of an ``.npy`` file, advised for random access: training reads shuffled
    rows, so the kernel's readahead would only pull unneeded neighbours into memory."""
    with open(path, "rb") as handle:
        version = npy_format.read_magic(handle)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order:
            raise ValueError("the array is stored in Fortran order")
        offset = handle.tell()
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)


class ShardedArray:
    """Read-only, row-indexed concatenation of memory-mapped ``.npy`` shards, looking like one array.

    Supports ``len``, ``shape``, ``ndim``, ``dtype`` and indexing by an integer, a slice or an index
    array (what :class:`~hf_csr.data.TensorImageDataset` uses). Pickles as its file names, so
    DataLoader workers re-open the memory maps instead of copying the data.
    """

    def __init__(self, paths: Sequence[PathLike]) -> None:
        self.paths = [str(p) for p in paths]
        self.arrays = []
        for path in self.paths:
            try:
                self.arrays.append(_map_npy(path))
            except (ValueError, OSError, EOFError) as error:
                raise ValueError(f"cannot memory-map the shard {path!r}: {error}. Convert the data again.") from error
        first = self.arrays[0]
        for path, array in zip(self.paths, self.arrays):
            if array.shape[1:] != first.shape[1:] or array.dtype != first.dtype:
                raise ValueError(f"shard {path!r} holds {array.dtype} {array.shape[1:]}, unlike {self.paths[0]!r}.")
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.shape = (int(self.offsets[-1]),) + tuple(first.shape[1:])
        self.dtype = first.dtype
        self.ndim = len(self.shape)

    def __reduce__(self):
        return ShardedArray, (self.paths,)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, np.ndarray) and index.dtype == object and index.ndim == 0:
            index = index.item()
        if isinstance(index, (int, np.integer)):
            position = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"index {index} is out of range for {len(self)} rows.")
            shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
            return self.arrays[shard][position - self.offsets[shard]]
        rows = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} rows.")
        out = np.empty((len(rows),) + self.shape[1:], self.dtype)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self.arrays[shard][rows[mask] - self.offsets[shard]]
        return out


class GeneratedImageDataset(TensorImageDataset):
    """Generated images converted by :func:`convert_generated_data`, memory-mapped.

    A :class:`~hf_csr.data.TensorImageDataset`: items are ``{"pixel_values": uint8 (C, H, W), "labels"}``,
    with ``class_names``, ``num_classes`` and ``len``; mix it with the real training set.
    """

    def __init__(self, directory: PathLike) -> None:
        directory = Path(directory)
        path = directory / _METADATA
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} holds no converted generated data ({_METADATA} is missing: the conversion "
                "never ran or was interrupted); run convert_generated_data / `hf-csr convert-data` first."
            )
        try:
            metadata = json.loads(path.read_text(encoding="utf-8"))
            shards = metadata["shards"]
            class_names = metadata["class_names"]
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"format is {metadata.get('format')!r}, not {_FORMAT!r}")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{str(path)!r} is not valid hf_csr generated-data metadata: {error}.") from error
        images = ShardedArray([directory / shard["images"] for shard in shards])
        labels = ShardedArray([directory / shard["labels"] for shard in shards])
        expected = [shard["num_examples"] for shard in shards]
        found = [len(a) for a in images.arrays], [len(a) for a in labels.arrays]
        if found != (expected, expected):
            raise ValueError(f"the shards in {str(directory)!r} do not match {_METADATA}; convert the data again.")
        self.directory = directory
        super().__init__(
            images, np.concatenate(labels.arrays), class_names, channels_last_input=True, name=f"generated images in {directory}"
        )

    def _image(self, index):
        # A copy: rows of a read-only memory map must not become (non-writable) tensors in user code.
        return torch.from_numpy(np.array(self.images[index])).movedim(-1, -3)
