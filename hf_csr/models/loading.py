"""Load any image classifier for class-wise robust evaluation, in pixel space, in one line.

:func:`load_robust_model` returns a model that takes ``pixel_values`` as float (N, C, H, W) in [0, 1] -- the
images as they are, uint8 / 255 -- and returns logits, so attack budgets are in pixel units of the real
input (the AutoAttack / RobustBench convention). It accepts:

* an hf_csr model (a ``save_pretrained`` directory or Hub repo of a ``RobustImageClassifier``): loaded as
  it is, it already normalises inside;
* a published checkpoint name (``wrn28_10_ddpm.dm_cifar10_linf``, see ``hf_csr.models.published.PUBLISHED_CHECKPOINTS``)
  or a checkpoint file (``.pt``/``.pth``/``.safetensors`` in a known layout), as the recipes take them;
* any transformers image classifier (local directory or Hub repo) with its image processor: the
  processor's resize, centre crop, rescale and normalisation are *folded into the model*
  (:class:`PixelSpaceClassifier`), differentiably, so the attack perturbs the real input image;
* any timm model: ``timm/<name>`` Hub repos, ``hf-hub:...``, ``local-dir:<folder>``, a folder saved in timm's
  Hub format (``config.json`` with ``architecture`` + ``model.safetensors``), or a timm name with a pretrained
  tag; its ``pretrained_cfg`` input size, crop and mean/std are folded in likewise;
* any plain PyTorch classifier: from Python pass the ``nn.Module``; from the command line an importable
  ``package.module:factory`` plus a weights file, with the input size, classes and normalisation as options.

:func:`prepare_training_data` is what :class:`~hf_csr.CSRTrainer` does with its datasets: a raw
``datasets.Dataset`` with ``image``/``img`` and ``label``/``labels`` columns becomes an hf_csr dataset, and a
model whose channels, image size or classes do not match the data is refused when the trainer is built.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import read_json_object

__all__ = [
    "PixelSpaceClassifier",
    "load_model_from_args",
    "load_robust_model",
    "prepare_training_data",
]

logger = logging.getLogger(__name__)

#: PIL resampling filters (as image processors store them) -> torch interpolation modes.
_PIL_RESAMPLE = {0: "nearest", 1: "bilinear", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


class PixelSpaceClassifier(nn.Module):
    """Wrap a classifier so that it takes [0, 1] pixels of any size and returns logits.

    ``forward(pixel_values)``: resize to ``resize`` ((H, W), or an int: the shorter side), centre-crop to
    ``crop`` ((H, W)), multiply by ``scale`` (e.g. 255 for a model fed 0..255 values), normalise with
    ``mean`` / ``std``, run ``model`` and return its logits (a tensor). Every step is differentiable, so an
    attack on the wrapper perturbs the real input image within a pixel-unit budget.

    ``config`` carries what evaluation needs: ``id2label``, ``num_labels``, ``num_channels``, ``image_size``
    and, when known, ``threat_model``.
    """

    main_input_name = "pixel_values"

    def __init__(
        self,
        model: nn.Module,
        *,
        class_names: Sequence[str],
        num_channels: int,
        resize: Union[int, Tuple[int, int], None] = None,
        crop: Optional[Tuple[int, int]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        scale: float = 1.0,
        interpolation: str = "bilinear",
        threat_model: Optional[Dict[str, Any]] = None,
        source: Optional[str] = None,
    ) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.model = model
        self.resize = resize
        self.crop = tuple(crop) if crop is not None else None
        self.scale = float(scale)
        self.interpolation = interpolation
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (or neither).")
        if mean is not None:
            mean, std = [float(v) for v in mean], [float(v) for v in std]
            if len(mean) == 1 and num_channels > 1:
                mean, std = mean * num_channels, std * num_channels
            if len(mean) != num_channels or len(std) != num_channels or any(s <= 0 for s in std) or not all(
                    math.isfinite(v) for v in mean + std):
                raise ValueError(
                    f"mean / std must hold {num_channels} finite values (std > 0), one per channel; got {mean} / {std}."
                )
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        else:
            self.mean = self.std = None
        names = [str(n) for n in class_names]
        size = self.crop or (resize if isinstance(resize, tuple) else None)
        self.config = PretrainedConfig(
            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        )
        self.config.num_channels = int(num_channels)
        self.config.image_size = int(size[0]) if size is not None and size[0] == size[1] else None
        self.config.source = source
        if threat_model is not None:
            self.config.threat_model = dict(threat_model)

    def preprocess(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        if self.resize is not None:
            if isinstance(self.resize, int):  # shorter side
                h, w = x.shape[-2:]
                short = min(h, w)
                target = (max(1, round(h * self.resize / short)), max(1, round(w * self.resize / short)))
            else:
                target = tuple(self.resize)
            if tuple(x.shape[-2:]) != target:
                antialias = self.interpolation in ("bilinear", "bicubic")
                x = F.interpolate(x, size=target, mode=self.interpolation, antialias=antialias,
                                  **({} if self.interpolation == "nearest" else {"align_corners": False}))
        if self.crop is not None and tuple(x.shape[-2:]) != self.crop:
            h, w = x.shape[-2:]
            ch, cw = self.crop
            if ch > h or cw > w:
                x = F.pad(x, (max(0, (cw - w) // 2), max(0, cw - w - (cw - w) // 2),
                              max(0, (ch - h) // 2), max(0, ch - h - (ch - h) // 2)))
                h, w = x.shape[-2:]
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            x = x[..., top:top + ch, left:left + cw]
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        from ..utils import as_logits

        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (N, {self.config.num_channels}, H, W) in [0, 1]; got "
                f"{tuple(pixel_values.shape)}."
            )
        return as_logits(self.model(self.preprocess(pixel_values)))


# --------------------------------------------------------------------------- the loader
def load_robust_model(
    source: Union[str, os.PathLike, nn.Module],
    *,
    weights: Optional[Union[str, os.PathLike]] = None,
    class_names: Optional[Sequence[str]] = None,
    num_classes: Optional[int] = None,
    input_size: Optional[Sequence[int]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    factory_kwargs: Optional[Dict[str, Any]] = None,
    threat_model: Optional[Dict[str, Any]] = None,
    revision: Optional[str] = None,
) -> nn.Module:
    """A classifier taking [0, 1] pixels (N, C, H, W) and returning logits, from almost anything (see the module
    docstring); in eval mode, on the CPU.

    Args:
        source: an ``nn.Module``; an hf_csr / transformers model directory or Hub repo; a published checkpoint
            name or checkpoint file; a timm name (``timm/...``, ``hf-hub:...``, ``local-dir:...``, a timm-format
            folder, ``arch.tag``); or ``package.module:factory`` (with ``weights``).
        weights: for ``module:factory``: a state-dict file (safetensors, or a torch pickle read with
            ``weights_only=True``); for an ``nn.Module``: optional.
        class_names / num_classes: the classes (default: the model's ``id2label``, else ``0..K-1`` from the logits).
        input_size: ``(C, H, W)`` the model expects; for plain modules the input is resized to (H, W).
        mean / std: the normalisation the model expects on [0, 1] inputs (plain modules; default none).
        factory_kwargs: keyword arguments for ``factory``.
        threat_model: ``{"norm", "eps"}`` recorded on the wrapper's config (the evaluation's default budget).
        revision: Hub revision.
    """
    if isinstance(source, nn.Module):
        return _wrap_module(source, weights, class_names, num_classes, input_size, mean, std, threat_model,
                            type(source).__name__)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        config = read_json_object(path / "config.json") if (path / "config.json").is_file() else None
        if config is not None and "architecture" in config and "model_type" not in config:
            return _load_timm(f"local-dir:{path}", class_names, threat_model)
        return _load_transformers(str(path), revision, threat_model)
    if _is_factory(text):
        if weights is None:
            logger.warning("%s: no --weights given: the factory's own (possibly random) weights are evaluated.", text)
        module = _call_factory(text, factory_kwargs or {})
        return _wrap_module(module, weights, class_names, num_classes, input_size, mean, std, threat_model, text)
    from .published import PUBLISHED_CHECKPOINTS, load_published

    if text in PUBLISHED_CHECKPOINTS or (path.is_file() and path.suffix in _CHECKPOINT_SUFFIXES):
        return load_published(text, class_names=class_names, num_classes=num_classes, threat_model=threat_model,
                              mean=mean, std=std, revision=revision)
    if path.exists():
        raise ValueError(
            f"{text!r} is a file but not a checkpoint ({', '.join(_CHECKPOINT_SUFFIXES)}); pass a checkpoint file, a "
            "model directory, a Hub repo id, a timm name or package.module:factory with --weights."
        )
    if text.startswith(("timm/", "hf-hub:", "local-dir:")):
        name = f"hf-hub:{text}" if text.startswith("timm/") else text
        return _load_timm(name, class_names, threat_model)
    import timm

    if timm.is_model(text) and "/" not in text:
        return _load_timm(text, class_names, threat_model)
    if text.count("/") == 1:
        return _load_hub(text, revision, class_names, threat_model)
    raise ValueError(
        f"cannot load {text!r}: it is not an existing directory or checkpoint file, a published checkpoint "
        f"({', '.join(PUBLISHED_CHECKPOINTS)}), a timm model name (timm/..., hf-hub:..., local-dir:...), a Hub repo "
        "id (namespace/name) nor package.module:factory."
    )


def _is_factory(text: str) -> bool:
    module, sep, attr = text.partition(":")
    if not sep or text.startswith(("hf-hub:", "local-dir:")) or os.path.exists(text):
        return False
    parts = module.split(".") + [attr]
    return all(part.isidentifier() for part in parts)


def _call_factory(text: str, kwargs: Dict[str, Any]) -> nn.Module:
    module_name, _, attr = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `hf-csr` as a console script does not put the working directory first
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--model {text!r}: cannot import {module_name!r} ({error}); run from the folder that holds "
                         "it or add it to PYTHONPATH.") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {text!r}: {module_name} has no callable {attr!r}.")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {text!r}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _load_weights(model: nn.Module, weights: Union[str, os.PathLike]) -> None:
    from .published import read_checkpoint, state_dict_of

    state = state_dict_of(read_checkpoint(weights), f"weights {str(weights)!r}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0:4]
        raise ValueError(f"the weights {str(weights)!r} do not fit the model: {' '.join(first)}") from None


def _wrap_module(model, weights, class_names, num_classes, input_size, mean, std, threat_model, source) -> nn.Module:
    from .modeling_robust import RobustImageClassifier

    if weights is not None:
        _load_weights(model, weights)
    model.eval()
    if isinstance(model, (RobustImageClassifier, PixelSpaceClassifier)) and input_size is None and mean is None:
        return model
    if input_size is None:
        raise ValueError(
            f"{source}: give the input size the model expects, (C, H, W) such as 1,28,28 (--input_size), so that "
            "inputs can be checked and resized."
        )
    channels, height, width = (int(v) for v in input_size)
    if class_names is None:
        if num_classes is None:
            with torch.no_grad():
                from ..utils import as_logits

                num_classes = int(as_logits(model(torch.zeros(1, channels, height, width))).shape[-1])
        class_names = [str(i) for i in range(num_classes)]
    elif num_classes is not None and num_classes != len(class_names):
        raise ValueError(f"num_classes = {num_classes} but {len(class_names)} class names were given.")
    return PixelSpaceClassifier(model, class_names=class_names, num_channels=channels, resize=(height, width),
                                mean=mean, std=std, threat_model=threat_model, source=source).eval()


def _load_transformers(name_or_dir: str, revision: Optional[str], threat_model) -> nn.Module:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .modeling_robust import RobustImageClassifier

    try:
        model = AutoModelForImageClassification.from_pretrained(name_or_dir, revision=revision)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot load {name_or_dir!r} as a transformers image classifier: {error}") from error
    model.eval()
    if isinstance(model, RobustImageClassifier):
        return model  # takes [0, 1] pixels and normalises itself
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_dir, revision=revision)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{name_or_dir!r} is a {type(model).__name__} without a loadable image processor "
            f"(preprocessor_config.json): {error}. Without it the input resolution and normalisation are unknown; save "
            "the processor with the model (processor.save_pretrained) or wrap the model in Python with "
            "load_robust_model(module, input_size=..., mean=..., std=...)."
        ) from error
    return _fold_processor(model, processor, name_or_dir, threat_model)


def _size_of(size: Any) -> Tuple[Optional[Union[int, Tuple[int, int]]], bool]:
    """An image processor's ``size`` -> (resize target, is_shortest_edge)."""
    if size is None:
        return None, False
    if isinstance(size, int):
        return (size, size), False
    get = size.get if isinstance(size, dict) else (lambda key, default=None: getattr(size, key, default))
    if get("height") is not None and get("width") is not None:
        return (int(get("height")), int(get("width"))), False
    if get("shortest_edge") is not None:
        return int(get("shortest_edge")), True
    raise ValueError(f"unsupported image processor size {size!r} (expected height/width or shortest_edge).")


def _fold_processor(model: nn.Module, processor: Any, source: str, threat_model) -> nn.Module:
    """Fold a transformers image processor's resize / crop / rescale / normalise into the model."""
    get = lambda key, default=None: getattr(processor, key, default)  # noqa: E731
    resize = None
    if get("do_resize", False):
        resize, _ = _size_of(get("size"))
    crop = None
    if get("do_center_crop", False) and get("crop_size") is not None:
        crop_size, _ = _size_of(get("crop_size"))
        crop = crop_size if isinstance(crop_size, tuple) else (crop_size, crop_size)
    rescale = float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 1.0
    mean = std = None
    if get("do_normalize", False):
        mean, std = list(get("image_mean")), list(get("image_std"))
    config = model.config
    channels = int(getattr(config, "num_channels", 3) or 3)
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)] or [str(i) for i in range(config.num_labels)]
    resample = get("resample", 2)
    interpolation = _PIL_RESAMPLE.get(int(getattr(resample, "value", resample)) if resample is not None else 2, "bilinear")
    logger.info("%s: folding the image processor into the model (resize %s, crop %s, x %.6g, mean %s, std %s)",
                source, resize, crop, 255 * rescale, mean, std)
    return PixelSpaceClassifier(model, class_names=names, num_channels=channels, resize=resize, crop=crop, mean=mean,
                                std=std, scale=255 * rescale, interpolation=interpolation, threat_model=threat_model,
                                source=_public(source)).eval()


def _load_timm(name: str, class_names, threat_model) -> nn.Module:
    import timm

    from .modeling_robust import RobustImageClassifier  # noqa: F401  (registers hf_csr's timm models)

    try:
        model = timm.create_model(name, pretrained=True)
    except (RuntimeError, OSError, ValueError) as error:
        raise ValueError(f"cannot create the timm model {name!r}: {error}") from error
    model.eval()
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    crop_mode = cfg.get("crop_mode", "center")
    if crop_pct < 1.0 and crop_mode == "center":
        resize: Union[int, Tuple[int, int]] = int(math.floor(min(height, width) / crop_pct))
        crop: Optional[Tuple[int, int]] = (height, width)
    else:
        resize, crop = (height, width), None
    names = list(class_names) if class_names is not None else [
        str(label) for label in (cfg.get("label_names") or range(model.num_classes))]
    if len(names) != model.num_classes:
        raise ValueError(f"{name}: {len(names)} class names for a {model.num_classes}-class model.")
    interpolation = {"bicubic": "bicubic", "nearest": "nearest"}.get(cfg.get("interpolation"), "bilinear")
    return PixelSpaceClassifier(model, class_names=names, num_channels=channels, resize=resize, crop=crop,
                                mean=cfg.get("mean"), std=cfg.get("std"), interpolation=interpolation,
                                threat_model=threat_model, source=_public(name)).eval()


def _load_hub(repo_id: str, revision: Optional[str], class_names, threat_model) -> nn.Module:
    """A Hub repo: transformers (``model_type`` in config.json) or timm (``architecture``)."""
    from ..utils import hub_file

    try:
        config = read_json_object(hub_file(repo_id, "config.json", revision=revision))
    except FileNotFoundError as error:
        raise ValueError(f"cannot load the Hub repo {repo_id!r}: {error}") from error
    if "architecture" in config and "model_type" not in config:
        return _load_timm(f"hf-hub:{repo_id}", class_names, threat_model)
    return _load_transformers(repo_id, revision, threat_model)


def _public(name: str) -> str:
    from ..utils import public_path

    return public_path(name.replace("local-dir:", "")) if name.startswith("local-dir:") else public_path(name)


# --------------------------------------------------------------------------- the command line
def _floats(text: Optional[str], option: str) -> Optional[list]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers; got {text!r}.") from None


def load_model_from_args(args, device) -> nn.Module:
    """The model of ``hf-csr evaluate``'s arguments, on ``device``, in eval mode."""
    input_size = None
    if getattr(args, "input_size", None):
        try:
            input_size = [int(v) for v in args.input_size.split(",")]
        except ValueError:
            input_size = []
        if len(input_size) != 3 or min(input_size) < 1:
            raise ValueError(f"--input_size must be C,H,W (e.g. 1,28,28); got {args.input_size!r}.")
    kwargs = None
    if getattr(args, "factory_kwargs", None):
        try:
            kwargs = json.loads(args.factory_kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(f"--factory_kwargs must be a JSON object: {error}") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--factory_kwargs must be a JSON object such as '{\"width\": 4}'.")
    names = args.class_names.split(",") if getattr(args, "class_names", None) else None
    plain_options = [o for o in ("weights", "input_size", "factory_kwargs") if getattr(args, o, None)]
    if plain_options and not _is_factory(args.model):
        raise ValueError(
            f"--{plain_options[0]} is for --model package.module:factory; {args.model!r} is not one."
        )
    try:
        model = load_robust_model(
            args.model, weights=getattr(args, "weights", None), class_names=names,
            num_classes=getattr(args, "num_classes", None), input_size=input_size,
            mean=_floats(getattr(args, "mean", None), "--mean"), std=_floats(getattr(args, "std", None), "--std"),
            factory_kwargs=kwargs,
        )
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
        if not message.startswith("--model"):
            message = f"--model {args.model!r}: {message}"
        raise type(error)(message) from error
    return model.to(device).eval()


# --------------------------------------------------------------------------- training data
def prepare_training_data(model: nn.Module, dataset: Any, name: str) -> Any:
    """A training / evaluation dataset as :class:`~hf_csr.CSRTrainer` needs it, checked against ``model``.

    A raw ``datasets.Dataset`` with an image column (``image``/``img``, or an ``Image`` feature) and a label column
    (``label``/``labels``, or a ``ClassLabel``) is converted to an hf_csr dataset (uint8 images, CHW); one without
    them is refused with what to do. The images' channels and size must match the model's ``num_channels`` /
    ``image_size`` (hf_csr models), checked here, before any training.
    """
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {key: prepare_training_data(model, value, f"{name}[{key!r}]") for key, value in dataset.items()}
    try:
        import datasets as hf_datasets
    except ImportError:  # pragma: no cover
        hf_datasets = None
    if hf_datasets is not None and isinstance(dataset, hf_datasets.IterableDataset):
        raise ValueError(f"{name} is a streaming datasets.IterableDataset; load it as a datasets.Dataset (no streaming) "
                         "or with hf_csr.data.load_image_dataset.")
    if hf_datasets is not None and isinstance(dataset, hf_datasets.Dataset):
        dataset = _from_hf_dataset(model, dataset, name)
    _check_geometry(model, dataset, name)
    return dataset


def _from_hf_dataset(model, dataset, name: str):
    import datasets as hf_datasets

    from ..data.sources import dataset_from_arrays, hf_images, hf_labels, pick_column

    columns = list(dataset.column_names)
    if "pixel_values" in columns and ("labels" in columns or "label" in columns):
        raise ValueError(
            f"{name} is a datasets.Dataset of pixel_values: give hf_csr the images instead (columns 'image' and "
            "'label'), or set its format to torch and rename the label column to 'labels'."
        )
    try:
        image_column = pick_column(dataset, None, hf_datasets.Image, ("image", "img", "images"), "image", "image_column")
        label_column = pick_column(dataset, None, hf_datasets.ClassLabel, ("label", "labels"), "label", "label_column")
    except ValueError as error:
        raise ValueError(
            f"{name}: {error}. CSRTrainer takes a datasets.Dataset with an 'image' (or 'img') column and a 'label' (or "
            "'labels') column, e.g. dataset.rename_columns({...}); or use hf_csr.data.load_image_dataset(...)."
        ) from None
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    model_names = [str(id2label[k]) for k in sorted(id2label, key=int)] or None
    labels, names = hf_labels(dataset, label_column, model_names)
    channels = getattr(config, "num_channels", None)
    images = hf_images(dataset, image_column, channels if channels in (1, 3) else None)
    if model_names is not None and len(names) < len(model_names):
        names = list(model_names)
    logger.info("%s: converted the datasets.Dataset (%d images, columns %r / %r)", name, len(labels), image_column,
                label_column)
    return dataset_from_arrays(images, labels, names, name)


def _check_geometry(model, dataset, name: str) -> None:
    config = getattr(model, "config", None)
    channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
    if channels is None and size is None:
        return
    shape = getattr(dataset, "image_shape", None)
    if shape is None:
        try:
            first = dataset[0]
        except Exception as error:  # noqa: BLE001 - any failure here is the dataset's
            raise ValueError(f"{name}: reading its first example failed ({type(error).__name__}: {error}).") from None
        if not isinstance(first, dict) or "pixel_values" not in first:
            keys = list(first) if isinstance(first, dict) else type(first).__name__
            raise ValueError(
                f"{name} yields {keys}, not {{'pixel_values', 'labels'}}: use hf_csr.data.load_image_dataset(...), a "
                "datasets.Dataset with 'image' and 'label' columns, or a dataset yielding pixel_values (C, H, W) in "
                "[0, 1] and labels."
            )
        shape = tuple(torch.as_tensor(first["pixel_values"]).shape)
    if len(shape) != 3:
        raise ValueError(f"{name}: images must be (C, H, W); got shape {tuple(shape)}.")
    from ..validation import check_dataset_geometry

    check_dataset_geometry(dataset, name, num_channels=channels, image_size=size, shape=tuple(shape))
