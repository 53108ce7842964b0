"""Published robust checkpoints -> :class:`~hf_csr.RobustImageClassifier`.

Loads, from the Hub (through ``huggingface_hub.hf_hub_download``, so the HF cache, ``HF_ENDPOINT`` and
offline mode apply) or from a local file:

* the DDPM-data WideResNets of Wang et al. (2023), Hub repo ``wzekai99/DM-Improves-AT``: pickles
  ``{"model_state_dict": ...}`` holding the EMA weights under the ``module.0.`` prefix;
* RobustBench-style state dicts of the same architectures (plain or ``{"state_dict": ...}``);
* TRADES / TRADES-AWP WideResNet-34-10 state dicts (``conv1``, ``block{1,2,3}.layer.{k}``, ``fc``);
* CIFAR PreAct-ResNet-18 state dicts (``conv1``, ``layer{1..4}``, ``linear``).

Pickles are only ever read with ``torch.load(..., weights_only=True)``. The layout is recognised from
the keys; a checkpoint matching none is refused with the closest layout and its missing / unexpected keys.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..data.registry import IDENTITY_MEAN, IDENTITY_STD, dataset_info
from ..utils import hub_file
from ..validation import is_repo_id
from .modeling_robust import RobustClassifierConfig, RobustImageClassifier, check_backbone_name
from .wide_resnet import map_trades_keys, strip_wrapper_prefix, unwrap_checkpoint

__all__ = [
    "LAYOUTS",
    "PUBLISHED_CHECKPOINTS",
    "ConvertedCheckpoint",
    "PublishedCheckpoint",
    "convert_checkpoint",
    "load_published",
    "read_checkpoint",
    "resolve_source",
    "state_dict_of",
]

logger = logging.getLogger(__name__)

LINF = {"norm": "Linf", "eps": 8 / 255}
L2 = {"norm": "L2", "eps": 128 / 255}


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A known published checkpoint: where it lives and what it was trained for."""

    name: str
    repo_id: str
    filename: str
    backbone: str
    dataset: str
    threat_model: Dict[str, Any] = field(hash=False)
    paper: str = ""


def _from_timm(tag: str, dataset: str, threat_model: Dict[str, Any]) -> PublishedCheckpoint:
    # The Hub location lives in one place: the timm pretrained tag (hf_csr/models/wide_resnet.py).
    cfg = timm.models.get_pretrained_cfg(tag)
    return PublishedCheckpoint(
        tag, cfg.hf_hub_id, cfg.hf_hub_filename, tag.split(".")[0], dataset, dict(threat_model), cfg.paper_name or ""
    )


#: The DDPM-data checkpoints of ``wzekai99/DM-Improves-AT``, by timm pretrained tag.
PUBLISHED_CHECKPOINTS: Dict[str, PublishedCheckpoint] = {
    entry.name: entry
    for entry in (
        _from_timm("wrn28_10_ddpm.dm_cifar10_linf", "cifar10", LINF),
        _from_timm("wrn28_10_ddpm.dm_cifar10_l2", "cifar10", L2),
        _from_timm("wrn28_10_ddpm.dm_cifar100_linf", "cifar100", LINF),
        _from_timm("wrn70_16_ddpm.dm_cifar10_linf", "cifar10", LINF),
        _from_timm("wrn70_16_ddpm.dm_cifar10_l2", "cifar10", L2),
        _from_timm("wrn70_16_ddpm.dm_cifar100_linf", "cifar100", LINF),
    )
}


# --------------------------------------------------------------------------- reading files
def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping[str, Any]:
    """The object stored in a checkpoint file: safetensors, or a torch pickle read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"cannot read the safetensors file {str(path)!r}: {error}. The file is truncated or corrupted; "
                "download or save it again."
            ) from error
    _check_expanded_size(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "Unsupported" in line), "")
        raise ValueError(
            f"refusing to load {str(path)!r}: torch.load(weights_only=True) rejected it{f' ({detail})' if detail else ''}. "
            "Either it is not a torch checkpoint (truncated or corrupted download) or it is a pickle holding Python "
            "objects beyond tensors and plain containers, which hf_csr never unpickles. Re-download it, or, if you "
            "trust its author, extract the state dict yourself and save it with safetensors."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"cannot read the checkpoint {str(path)!r}: {str(error).splitlines()[0]}. The file is truncated or "
            "corrupted; download or save it again."
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a state dict (a mapping from "
            "parameter names to tensors, possibly inside {'model_state_dict': ...} or {'state_dict': ...})."
        )
    return checkpoint


#: A checkpoint whose records would expand beyond this is refused before anything is allocated (8 GiB:
#: a 2-billion-parameter float32 network, the largest config hf_csr accepts).
MAX_CHECKPOINT_BYTES = 8 * 1024**3
#: torch.save stores records uncompressed; a deflated record expanding more than this is a decompression bomb.
_MAX_COMPRESSION_RATIO = 50


def _check_expanded_size(path: Path) -> None:
    """Refuse a torch zip checkpoint whose records would expand to more than :data:`MAX_CHECKPOINT_BYTES`
    (read from the zip directory: nothing is decompressed), or holds a deflated record that expands more than
    50-fold beyond 1 MiB -- torch never writes those, so a small file that unpacks to gigabytes is refused."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # legacy (pre-1.6) format: its size is the file's
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"cannot read the checkpoint {str(path)!r}: {error}. It is truncated or corrupted.") from error
    total = sum(entry.file_size for entry in entries)
    if total > MAX_CHECKPOINT_BYTES:
        raise ValueError(
            f"refusing to load {str(path)!r}: its records would expand to {total / 1024**3:.1f} GiB, more than the "
            f"{MAX_CHECKPOINT_BYTES / 1024**3:.3g} GiB limit (a 2-billion-parameter network). It is not a robust "
            "image classifier checkpoint, or it is a decompression bomb."
        )
    for entry in entries:
        if (entry.compress_type != zipfile.ZIP_STORED and entry.file_size > 1024**2
                and entry.file_size > _MAX_COMPRESSION_RATIO * max(entry.compress_size, 1)):
            raise ValueError(
                f"refusing to load {str(path)!r}: its record {entry.filename!r} is compressed {entry.compress_size:,} "
                f"bytes that expand to {entry.file_size:,} (torch.save never compresses); a decompression bomb."
            )


def state_dict_of(checkpoint: Mapping[str, Any], source: str) -> Dict[str, torch.Tensor]:
    state = strip_wrapper_prefix(unwrap_checkpoint(checkpoint))
    state.pop("n_averaged", None)  # torch.optim.swa_utils.AveragedModel's counter (EMA checkpoints)
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors or not state:
        raise ValueError(
            f"{source} is not a state dict: expected parameter names mapped to tensors (possibly inside "
            f"'model_state_dict' or 'state_dict'); found non-tensor entries {not_tensors[:10] or '(it is empty)'}."
        )
    return state


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Layout:
    name: str
    description: str
    convert: Callable[[Mapping[str, torch.Tensor]], Dict[str, torch.Tensor]]
    family: Optional[str]  # WideResNet layout ("ddpm" / "trades"); None: a fixed backbone
    backbone: str  # the default backbone of this layout


#: The checkpoint layouts hf_csr recognises, tried in this order.
LAYOUTS: Tuple[_Layout, ...] = (
    _Layout("ddpm", "DDPM-data / RobustBench WideResNet (init_conv, layer.{g}.block.{k}.*, batchnorm, logits)",
            dict, "ddpm", "wrn28_10_ddpm"),
    _Layout("trades", "TRADES / TRADES-AWP WideResNet (conv1, block{1,2,3}.layer.{k}.*, bn1, fc)",
            map_trades_keys, "trades", "wrn34_10_trades"),
    _Layout("preact", "CIFAR PreAct-ResNet-18 (conv1, layer{1..4}.{k}.*, bn, linear)", dict, None, "preact_resnet18"),
)
_WRN_NAME = re.compile(r"^wrn(\d+)_(\d+)_(ddpm|trades)$")
_WRN_BLOCK = re.compile(r"^layer\.0\.block\.(\d+)\.conv_0\.weight$")


def _wrn_architecture(state: Mapping[str, torch.Tensor]) -> Optional[Tuple[int, int]]:
    """(depth, width) of a WideResNet state dict in hf_csr's key names, or None if it is not one."""
    blocks = [int(m.group(1)) for m in map(_WRN_BLOCK.match, state) if m]
    first = state.get("layer.0.block.0.conv_0.weight")
    if not blocks or first is None or first.dim() != 4 or first.shape[0] % 16:
        return None
    return 6 * (max(blocks) + 1) + 4, first.shape[0] // 16


def _wrn_depth_width(name: str) -> Tuple[int, int]:
    match = _WRN_NAME.match(name)
    return int(match.group(1)), int(match.group(2))


def _backbone_for(layout: _Layout, state: Mapping[str, torch.Tensor], requested: Optional[str]) -> Tuple[str, dict]:
    """The timm backbone (and depth/width overrides) a converted state dict should load into."""
    if requested is not None and not _WRN_NAME.match(requested):
        return requested, {}  # any other timm backbone is used as it is
    if requested is None and layout.family is None:
        return layout.backbone, {}
    architecture = _wrn_architecture(state)
    if requested is None:  # the registered name of the inferred architecture, if there is one
        depth, width = architecture or _wrn_depth_width(layout.backbone)
        requested = f"wrn{depth}_{width}_{layout.family}"
        requested = requested if timm.is_model(requested) else f"wrn28_10_{layout.family}"
    if architecture is None or architecture == _wrn_depth_width(requested):
        return requested, {}
    return requested, {"depth": architecture[0], "width": architecture[1]}


@functools.lru_cache(maxsize=32)
def _expected_shapes(backbone: str, kwargs: Tuple[Tuple[str, int], ...], num_classes: int) -> Dict[str, tuple]:
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, **dict(kwargs))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _classifier_key(backbone: str) -> str:
    return f"{timm.models.get_pretrained_cfg_value(timm.models.get_arch_name(backbone), 'classifier') or 'fc'}.weight"


@dataclass
class _Match:
    layout: _Layout
    backbone: str
    backbone_kwargs: dict
    state: Dict[str, torch.Tensor]
    missing: List[str]
    unexpected: List[str]
    mismatched: List[str]
    matched: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def score(self) -> float:
        return self.matched / max(1, self.matched + len(self.missing) + len(self.unexpected) + len(self.mismatched))


def _match(layout: _Layout, state: Mapping[str, torch.Tensor], backbone: Optional[str]) -> _Match:
    converted = layout.convert(state)
    name, kwargs = _backbone_for(layout, converted, backbone)
    head = converted.get(_classifier_key(name))
    classes = head.shape[0] if head is not None and head.dim() == 2 else 10
    expected = _expected_shapes(name, tuple(sorted(kwargs.items())), classes)
    # Old checkpoints may lack BatchNorm's num_batches_tracked counters; the model's own are kept then.
    missing = [k for k in expected if k not in converted and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in converted and tuple(converted[k].shape) != expected[k]
    ]
    matched = sum(1 for k in expected if k in converted and tuple(converted[k].shape) == expected[k])
    return _Match(layout, name, kwargs, converted, missing, unexpected, mismatched, matched)


def _listing(label: str, items: Sequence[str], limit: int = 8) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {label} ({len(items)}): {', '.join(items[:limit])}{more}"


@dataclass
class ConvertedCheckpoint:
    """A checkpoint's state dict in hf_csr's key names and the backbone it loads into."""

    state_dict: Dict[str, torch.Tensor]
    backbone: str
    backbone_kwargs: Dict[str, int]
    layout: str
    num_classes: int


def convert_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    backbone: Optional[str] = None,
    num_classes: Optional[int] = None,
    source: str = "the checkpoint",
) -> ConvertedCheckpoint:
    """Recognise a checkpoint's layout and rename its keys to those of an hf_csr backbone.

    Args:
        checkpoint: a state dict, or a dict holding one (``model_state_dict`` / ``state_dict``); wrapper
            prefixes (``module.``, ``model.``, ``0.``) are removed.
        backbone: the timm backbone to load into; default: inferred from the keys (layout, depth, width).
        num_classes: the class count the caller expects; a checkpoint with another head is refused.
        source: how to name the checkpoint in error messages.

    Raises:
        ValueError: the keys match no known layout (the message names the closest layout and its missing /
            unexpected / mis-shaped keys), or the classifier head has another class count than ``num_classes``.
    """
    state = state_dict_of(checkpoint, source)
    if backbone is not None and not timm.is_model(backbone):
        raise ValueError(f"backbone {backbone!r} is not a timm model name (after `import hf_csr`).")
    if backbone is None:
        layouts = LAYOUTS
    elif _WRN_NAME.match(backbone):
        layouts = tuple(layout for layout in LAYOUTS if layout.family is not None)
    else:
        layouts = (LAYOUTS[-1],)  # any other backbone: keys are taken as they are
    matches = [_match(layout, state, backbone) for layout in layouts]
    best = next((m for m in matches if m.ok), None) or max(matches, key=lambda m: m.score)
    if not best.ok:
        known = "".join(f"\n  - {layout.name}: {layout.description}" for layout in LAYOUTS)
        raise ValueError(
            f"{source} matches no known checkpoint layout. Closest: {best.layout.name!r} as backbone "
            f"{best.backbone!r}{f' {best.backbone_kwargs}' if best.backbone_kwargs else ''}, with {best.matched} "
            f"keys matching (keys after renaming to hf_csr's names):"
            + _listing("missing keys", best.missing)
            + _listing("unexpected keys", best.unexpected)
            + _listing("shape mismatches", best.mismatched)
            + f"\nKnown layouts:{known}\nPass backbone=... if the architecture differs from the one inferred."
        )
    head_key = _classifier_key(best.backbone)
    classes = int(best.state[head_key].shape[0])
    if num_classes is not None and num_classes != classes:
        raise ValueError(
            f"{source} has a {classes}-class classifier ({head_key} of shape {tuple(best.state[head_key].shape)}) "
            f"but {num_classes} classes were requested (num_classes / class_names); pass num_classes={classes} "
            f"and {classes} class names, or fine-tune a new head instead."
        )
    return ConvertedCheckpoint(best.state, best.backbone, best.backbone_kwargs, best.layout.name, classes)


# --------------------------------------------------------------------------- loading
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def resolve_source(
    source: Union[str, os.PathLike], filename: Optional[str]
) -> Tuple[Optional[PublishedCheckpoint], Optional[Path], Optional[str], Optional[str]]:
    """-> (published entry, local path, repo id, filename)."""
    text = os.fspath(source)
    if text in PUBLISHED_CHECKPOINTS:
        entry = PUBLISHED_CHECKPOINTS[text]
        if filename not in (None, entry.filename):
            raise ValueError(f"{text!r} is the published file {entry.filename!r}; do not pass filename={filename!r}.")
        return entry, None, entry.repo_id, entry.filename
    path = Path(text).expanduser()
    if path.is_dir():
        raise ValueError(
            f"{text!r} is a directory. Pass a checkpoint file; a save_pretrained directory loads with "
            "AutoModelForImageClassification.from_pretrained after `import hf_csr`."
        )
    if path.is_file():
        return None, path, None, None
    if "/" not in text or path.suffix in _CHECKPOINT_SUFFIXES or not is_repo_id(text):
        raise FileNotFoundError(
            f"{text!r} is neither an existing file, a Hub repo id ('namespace/name') nor a known published "
            f"checkpoint ({', '.join(PUBLISHED_CHECKPOINTS)})."
        )
    known = [e for e in PUBLISHED_CHECKPOINTS.values() if e.repo_id == text]
    if filename is None:
        hint = f"; the known files of this repo are {[e.filename for e in known]}" if known else ""
        raise ValueError(f"loading from the Hub repo {text!r} needs filename=... (the checkpoint inside it){hint}.")
    entry = next((e for e in known if e.filename == filename), None)
    return entry, None, text, filename


def load_published(
    source: Union[str, os.PathLike],
    *,
    filename: Optional[str] = None,
    backbone: Optional[str] = None,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    dataset: Optional[str] = None,
    threat_model: Optional[Dict[str, Any]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    token: Optional[Union[str, bool]] = None,
    local_files_only: bool = False,
) -> RobustImageClassifier:
    """Load a published robust checkpoint as a :class:`RobustImageClassifier` (in eval mode).

    Args:
        source: a name from :data:`PUBLISHED_CHECKPOINTS` (e.g. ``"wrn28_10_ddpm.dm_cifar10_linf"``), a Hub
            model repo id (with ``filename``), or a local checkpoint file (``.pt``/``.pth``/``.safetensors``).
        filename: the file inside the Hub repo.
        backbone: the timm backbone; default: the published entry's, else inferred from the keys.
        num_classes / class_names: the classes; default: the checkpoint's head, named after ``dataset``.
        dataset: a registered dataset (``hf_csr.data.DATASETS``: ``"cifar10"``, ``"cifar100"``, ...) for the
            mean/std, class names and image geometry; default: the published entry's,
            else guessed from a 10- or 100-class head.
        threat_model: ``{"norm": "Linf" | "L2", "eps": float}``; default: the published entry's, else Linf 8/255.
        mean / std: override the normalisation (TRADES-layout models use none: mean 0, std 1).
        revision / cache_dir / token / local_files_only: passed to ``hf_hub_download``.
    """
    entry, path, repo_id, filename = resolve_source(source, filename)
    if backbone is not None and not timm.is_model(backbone):
        try:
            check_backbone_name(backbone)
        except ValueError as error:
            raise ValueError(
                f"{error} To evaluate your own architecture, no conversion is needed: `hf-csr evaluate --model "
                "package.module:factory --weights FILE --input_size C,H,W` (or hf_csr.load_robust_model(module))."
            ) from None
    if path is None:
        path = hub_file(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes = {num_classes} but {len(class_names)} class_names were given.")
        num_classes = len(class_names)
    dataset = dataset or (entry.dataset if entry is not None else None)
    if num_classes is None and dataset_info(dataset) is not None:
        num_classes = dataset_info(dataset).num_classes
    converted = convert_checkpoint(
        read_checkpoint(path),
        backbone=backbone or (entry.backbone if entry is not None else None),
        num_classes=num_classes,
        source=f"checkpoint {str(path)!r}",
    )
    if dataset is None and class_names is None:
        dataset = {10: "cifar10", 100: "cifar100"}.get(converted.num_classes)
        if dataset is not None:
            logger.info("Assuming %s classes and statistics (pass dataset= or class_names= otherwise).", dataset)
    info = dataset_info(dataset)
    if class_names is None:
        class_names = list(info.class_names) if info and info.class_names else [str(i) for i in range(converted.num_classes)]
    if mean is None and std is None:
        if converted.layout == "trades":
            mean, std = IDENTITY_MEAN, IDENTITY_STD  # TRADES networks see raw [0, 1] pixels
        elif info is not None:
            mean, std = info.mean, info.std
    config = RobustClassifierConfig(
        backbone=converted.backbone,
        backbone_kwargs=converted.backbone_kwargs,
        num_channels=info.num_channels if info is not None else 3,
        image_size=info.image_size if info is not None else 32,
        image_mean=list(mean) if mean is not None else None,
        image_std=list(std) if std is not None else None,
        threat_model=threat_model or (entry.threat_model if entry is not None else None),
        base_model=repo_id,
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
    )
    model = RobustImageClassifier(config)
    missing, unexpected = model.backbone.load_state_dict(converted.state_dict, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    logger.info(
        "Loaded %s (%s layout) as %s%s.", path.name, converted.layout, converted.backbone,
        f" {converted.backbone_kwargs}" if converted.backbone_kwargs else "",
    )
    return model.eval()
