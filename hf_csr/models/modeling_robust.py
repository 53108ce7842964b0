"""``RobustImageClassifier``: a transformers ``PreTrainedModel`` around any timm backbone.

Inputs are ``pixel_values`` in [0, 1]; the model normalises them with its own mean/std, so attack
budgets are in pixel units (the AutoAttack / RobustBench convention). ``save_pretrained`` also writes a
``preprocessor_config.json`` (:meth:`RobustImageClassifier.image_processor`: resize to the model's size and
rescale to [0, 1], *no* normalisation), so ``pipeline("image-classification", model=...)`` and
``AutoImageProcessor`` work after ``import hf_csr``.

A bare timm backbone from hf_csr's registry (``timm.create_model("wrn28_10_ddpm.dm_cifar10_linf",
pretrained=True)``) does *not* normalise: it expects inputs already normalised with its ``pretrained_cfg``
mean/std, so an attack budget on its input is not in pixel units. Use
``hf_csr.models.published.load_published("wrn28_10_ddpm.dm_cifar10_linf")`` (or ``hf_csr.load_robust_model``), which wraps
it in a :class:`RobustImageClassifier` that normalises inside. The config records the
backbone (name and arguments), mean/std, class names and the threat model the weights were trained
for. ``save_pretrained`` writes safetensors; ``AutoModelForImageClassification.from_pretrained``
loads it back after ``import hf_csr``.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
from safetensors import SafetensorError
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
    ViTImageProcessor,
)
from transformers.modeling_outputs import ImageClassifierOutput

from ..utils import apply_umask, check_pixel_values, input_checks_enabled
from ..validation import NORMS, check_budget, check_choice, check_labels_in_range
from .timm_format import TIMM_CONFIG_KEYS, write_timm_hub_files

__all__ = ["RobustClassifierConfig", "RobustImageClassifier", "RobustImageProcessor", "create_robust_classifier",
           "MAX_PARAMETERS"]

#: Configs describing a larger network are rejected before any memory is allocated.
MAX_PARAMETERS = 2_000_000_000
_MAX_IMAGE_SIZE = 4096
_MAX_CHANNELS = 64
_MAX_CLASSES = 100_000


def check_backbone_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a timm model name (str); got {name!r}.")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}: it is not in timm's registry (after `import hf_csr`).{hint} "
            "hf_csr registers preact_resnet18, preact_resnet_tiny, wrn28_10_ddpm, wrn34_10_ddpm, wrn70_16_ddpm, wrn28_10_trades, "
            "wrn34_10_trades and wrn70_16_trades; any timm model name also works."
        )


def _default_normalization(backbone: str, num_channels: int) -> tuple:
    cfg = timm.models.get_pretrained_cfg(timm.models.get_arch_name(backbone) if "." not in backbone else backbone)
    mean = getattr(cfg, "mean", None) if cfg is not None else None
    std = getattr(cfg, "std", None) if cfg is not None else None
    if mean is None or std is None or len(mean) != num_channels:
        return [0.5] * num_channels, [0.5] * num_channels
    return [float(m) for m in mean], [float(s) for s in std]


@strict(accept_kwargs=True)
class RobustClassifierConfig(PreTrainedConfig):
    r"""Configuration of a :class:`RobustImageClassifier`.

    Args:
        backbone: a timm model name (``preact_resnet18``, ``wrn28_10_ddpm``, ...).
        backbone_kwargs: extra arguments for ``timm.create_model`` (e.g. ``{"width": 8}`` for tests).
        num_channels: input channels (3 for CIFAR, 1 for Fashion-MNIST).
        image_size: input height/width the model was trained at.
        image_mean / image_std: per-channel normalisation applied inside ``forward``; default: the
            backbone's timm ``pretrained_cfg`` when its channel count matches, else 0.5 / 0.5.
        threat_model: ``{"norm": "Linf" | "L2", "eps": float}``, the budget the weights target.
        base_model: the Hub repo the weights come from (converted or fine-tuned), for the card's ``base_model``.
        id2label / label2id / num_labels: class names, as for every transformers classifier.
    """

    model_type = "robust_image_classifier"

    backbone: str = "preact_resnet18"
    backbone_kwargs: Optional[dict] = None
    num_channels: int = 3
    image_size: int = 32
    image_mean: Optional[list] = None
    image_std: Optional[list] = None
    threat_model: Optional[dict] = None
    base_model: Optional[str] = None

    def __post_init__(self, **kwargs):
        check_backbone_name(self.backbone)
        if self.backbone_kwargs is None:
            self.backbone_kwargs = {}
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"backbone_kwargs must be a dict; got {type(self.backbone_kwargs).__name__}.")
        for key in ("num_classes", "in_chans", "pretrained"):
            if key in self.backbone_kwargs:
                raise ValueError(
                    f"backbone_kwargs must not set {key!r}; use num_labels / num_channels / the Hub loaders instead."
                )
        if not isinstance(self.num_channels, int) or not 1 <= self.num_channels <= _MAX_CHANNELS:
            raise ValueError(f"num_channels must be an integer in [1, {_MAX_CHANNELS}]; got {self.num_channels!r}.")
        if not isinstance(self.image_size, int) or not 1 <= self.image_size <= _MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be an integer in [1, {_MAX_IMAGE_SIZE}]; got {self.image_size!r}.")
        default_mean, default_std = _default_normalization(self.backbone, self.num_channels)
        self.image_mean = [float(v) for v in (self.image_mean if self.image_mean is not None else default_mean)]
        self.image_std = [float(v) for v in (self.image_std if self.image_std is not None else default_std)]
        for name, values in (("image_mean", self.image_mean), ("image_std", self.image_std)):
            if len(values) != self.num_channels or not all(math.isfinite(v) for v in values):
                raise ValueError(
                    f"{name} must hold {self.num_channels} finite values (one per channel); got {values}."
                )
        if any(v <= 0 for v in self.image_std):
            raise ValueError(f"image_std must be positive; got {self.image_std}.")
        self.threat_model = _check_threat_model(self.threat_model)
        for key in TIMM_CONFIG_KEYS:  # timm's Hub-format keys in config.json (see timm_format.py): not ours
            kwargs.pop(key, None)
            self.__dict__.pop(key, None)
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise ValueError(f"base_model must be a Hub repo id (str) or None; got {self.base_model!r}.")
        super().__post_init__(**kwargs)
        if not isinstance(self.num_labels, int) or not 2 <= self.num_labels <= _MAX_CLASSES:
            raise ValueError(f"num_labels must be an integer in [2, {_MAX_CLASSES}]; got {self.num_labels!r}.")


def _check_threat_model(threat_model: Optional[dict]) -> Dict[str, Any]:
    threat = {"norm": "Linf", "eps": 8 / 255}
    if threat_model is not None:
        if not isinstance(threat_model, dict):
            raise ValueError(f"threat_model must be a dict like {{'norm': 'Linf', 'eps': 8/255}}; got {threat_model!r}.")
        threat.update(threat_model)
    check_choice("threat_model['norm']", threat["norm"], NORMS)
    threat["eps"] = check_budget(threat["eps"], threat["norm"], "threat_model['eps']")
    return threat


class RobustImageClassifier(PreTrainedModel):
    """An image classifier taking ``pixel_values`` in [0, 1] and normalising them itself."""

    config_class = RobustClassifierConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True

    def __init__(self, config: RobustClassifierConfig) -> None:
        super().__init__(config)
        kwargs = dict(num_classes=config.num_labels, in_chans=config.num_channels, **config.backbone_kwargs)
        _check_parameter_budget(config.backbone, kwargs)
        self.backbone = _create_backbone(config.backbone, kwargs)
        channels = config.num_channels
        self.register_buffer("image_mean", torch.tensor(config.image_mean, dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("image_std", torch.tensor(config.image_std, dtype=torch.float32).view(1, channels, 1, 1))
        if not any(p.is_meta for p in self.backbone.parameters()):
            # The backbone initialised itself (timm's own scheme); keep transformers from re-initialising it.
            for module in self.backbone.modules():
                module._is_hf_initialized = True
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Only reached for weights a checkpoint did not provide: PyTorch's defaults, config mean/std."""
        if module is self:
            with torch.no_grad():
                self.image_mean.copy_(torch.tensor(self.config.image_mean).view_as(self.image_mean))
                self.image_std.copy_(torch.tensor(self.config.image_std).view_as(self.image_std))
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``; a truncated or corrupted safetensors file is reported as a
        ``ValueError`` naming the file (safetensors' own error does not say which file it read)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as error:
            source = str(pretrained_model_name_or_path)
            files = sorted(f for f in os.listdir(source) if f.endswith(".safetensors")) if os.path.isdir(source) else []
            where = ", ".join(os.path.join(source, f) for f in files) or f"the safetensors weights of {source!r}"
            raise ValueError(
                f"cannot load {where}: the file is truncated or corrupted ({error}). Re-download or re-save the "
                "checkpoint; nothing was loaded from it."
            ) from error

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    # ------------------------------------------------------------------ gradient checkpointing
    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=torch_checkpoint, every_n_layers: int = 1
    ) -> None:
        """What ``gradient_checkpointing_enable()`` / ``TrainingArguments(gradient_checkpointing=True)`` reach:
        the timm backbone's ``set_grad_checkpointing``. hf_csr's backbones checkpoint every residual block,
        non-reentrant (input gradients for the attacks flow through), with BatchNorm statistics updated once."""
        if enable:
            func = getattr(gradient_checkpointing_func, "func", gradient_checkpointing_func)
            options = dict(getattr(gradient_checkpointing_func, "keywords", None) or {})
            if func is not torch_checkpoint:
                raise ValueError(
                    "RobustImageClassifier supports plain activation checkpointing only (no `offload`): the timm "
                    "backbone checkpoints its own residual blocks."
                )
            if options.get("use_reentrant", False):
                raise ValueError(
                    "gradient_checkpointing_kwargs={'use_reentrant': True} is not supported: the attacks need input "
                    "gradients through the checkpointed blocks, which reentrant checkpointing does not give. Drop "
                    "use_reentrant (the backbone always uses non-reentrant checkpointing)."
                )
            if every_n_layers != 1:
                raise ValueError(f"every_n_layers must be 1 (the backbone checkpoints every block); got {every_n_layers}.")
        setter = getattr(self.backbone, "set_grad_checkpointing", None)
        if setter is None:
            raise ValueError(
                f"backbone {self.config.backbone!r} has no set_grad_checkpointing(), so it cannot use gradient "
                "checkpointing; train without gradient_checkpointing or pick a timm model that supports it."
            )
        try:
            setter(enable)
        except (AssertionError, NotImplementedError, RuntimeError) as error:
            raise ValueError(
                f"backbone {self.config.backbone!r} does not support gradient checkpointing ({error}); train without "
                "gradient_checkpointing."
            ) from error
        self.gradient_checkpointing = bool(enable)

    def image_processor(self) -> "RobustImageProcessor":
        """The image processor of this model (:class:`RobustImageProcessor`): PIL images to the model's
        channels, resized to ``image_size`` and rescaled to [0, 1], *without* normalising (the model normalises
        inside, so budgets stay in pixel units)."""
        size = self.config.image_size
        return RobustImageProcessor(
            num_channels=self.config.num_channels, do_resize=True, size={"height": size, "width": size},
            do_rescale=True, rescale_factor=1 / 255, do_normalize=False,
        )

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus ``preprocessor_config.json`` (:meth:`image_processor`) and
        timm's Hub format in the same directory (see :mod:`hf_csr.models.timm_format`):
        ``timm.create_model("hf-hub:<repo>", pretrained=True)`` loads the backbone from a pushed directory. That
        timm model expects *normalised* inputs."""
        push = kwargs.pop("push_to_hub", False)
        hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in kwargs}
        result = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            apply_umask(*Path(save_directory).glob("*.safetensors"))  # safetensors writes 0600
            self.image_processor().save_pretrained(save_directory)
            write_timm_hub_files(self, str(save_directory), variant=kwargs.get("variant"))
            if push:  # after the processor and timm files exist (transformers would upload before they are written)
                hub.setdefault("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
                self.push_to_hub(token=kwargs.get("token"), **hub)
        return result

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[ImageClassifierOutput, tuple]:
        channels = self.config.num_channels
        if input_checks_enabled():
            check_pixel_values(pixel_values, num_channels=channels)
        elif pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (N, {channels}, H, W); got {tuple(pixel_values.shape)}."
            )
        normalized = (pixel_values - self.image_mean.to(pixel_values.dtype)) / self.image_std.to(pixel_values.dtype)
        logits = self.backbone(normalized)
        loss = None
        if labels is not None:
            if input_checks_enabled():
                check_labels_in_range(labels, self.config.num_labels, "labels", allow_empty=True)
            loss = F.cross_entropy(logits.float(), labels)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutput(loss=loss, logits=logits)


class RobustImageProcessor(ViTImageProcessor):
    """transformers' ViT image processor (resize, rescale; here without normalisation) that first converts PIL
    images to the model's channels: greyscale (``L``, ITU-R 601-2 luma) for 1-channel models, RGB for 3-channel
    ones -- ``pipeline("image-classification")`` hands every image over as RGB."""

    def __init__(self, num_channels: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_channels = int(num_channels)

    def preprocess(self, images, *args, **kwargs):
        import PIL.Image

        mode = {1: "L", 3: "RGB"}.get(self.num_channels)

        def convert(image):
            if mode is not None and isinstance(image, PIL.Image.Image) and image.mode != mode:
                return image.convert(mode)
            return image

        if isinstance(images, (list, tuple)):
            images = [[convert(i) for i in item] if isinstance(item, (list, tuple)) else convert(item) for item in images]
        else:
            images = convert(images)
        return super().preprocess(images, *args, **kwargs)


def _create_backbone(name: str, kwargs: Dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as error:
        raise ValueError(f"backbone {name!r} does not accept backbone_kwargs {sorted(kwargs)}: {error}") from error


def _check_parameter_budget(name: str, kwargs: Dict[str, Any]) -> None:
    """Build the backbone on the meta device (no memory) and reject absurd sizes."""
    with torch.device("meta"):
        probe = _create_backbone(name, kwargs)
    count = sum(p.numel() for p in probe.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"backbone {name!r} with {kwargs} would have {count:,} parameters, more than the limit of "
            f"{MAX_PARAMETERS:,}; check backbone_kwargs (width/depth) in the config."
        )


def create_robust_classifier(
    backbone: str = "preact_resnet18",
    num_classes: Optional[int] = None,
    *,
    class_names: Optional[Sequence[str]] = None,
    num_channels: Optional[int] = None,
    image_size: Optional[int] = None,
    dataset: Any = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    threat_model: Optional[dict] = None,
    **backbone_kwargs: Any,
) -> RobustImageClassifier:
    """Build a randomly initialised :class:`RobustImageClassifier`.

    ``class_names`` (or ``num_classes``) fixes the classes; ``backbone_kwargs`` go to timm.
    ``dataset``: an hf_csr dataset (e.g. ``load_image_dataset(...)``) or anything yielding
    ``{"pixel_values": (C, H, W)}`` with ``class_names``: the classes, channels and image size not given
    are taken from it (defaults without a dataset: the backbone's timm ``pretrained_cfg`` input size, else
    3 channels, 32 x 32). A mismatch between the model and
    the data is also caught when the :class:`~hf_csr.CSRTrainer` is built.
    """
    if dataset is not None:
        data_channels, data_size = _dataset_geometry(dataset)
        if num_channels is not None and num_channels != data_channels:
            raise ValueError(f"num_channels = {num_channels} but the dataset's images have {data_channels} channels.")
        if image_size is not None and image_size != data_size:
            raise ValueError(f"image_size = {image_size} but the dataset's images are {data_size} x {data_size}.")
        num_channels, image_size = data_channels, data_size
        names = getattr(dataset, "class_names", None)
        if class_names is None and num_classes is None and names:
            class_names = list(names)
    cfg_channels, cfg_size = _default_input_size(backbone)
    num_channels = cfg_channels if num_channels is None else num_channels
    image_size = cfg_size if image_size is None else image_size
    if class_names is not None:
        names: List[str] = [str(n) for n in class_names]
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"num_classes = {num_classes} but {len(names)} class_names were given.")
    elif num_classes is not None:
        names = [str(i) for i in range(num_classes)]
    else:
        raise ValueError("pass num_classes, class_names or a dataset with class_names.")
    config = RobustClassifierConfig(
        backbone=backbone,
        backbone_kwargs=dict(backbone_kwargs),
        num_channels=num_channels,
        image_size=image_size,
        image_mean=list(mean) if mean is not None else None,
        image_std=list(std) if std is not None else None,
        threat_model=threat_model,
        id2label={i: n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
    )
    return RobustImageClassifier(config)


def _default_input_size(backbone: str) -> tuple:
    """(channels, size) of the backbone's timm ``pretrained_cfg`` when it names a square input, else (3, 32)."""
    cfg = timm.models.get_pretrained_cfg(timm.models.get_arch_name(backbone) if "." not in backbone else backbone)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    if size is None or len(size) != 3 or size[1] != size[2]:
        return 3, 32
    return int(size[0]), int(size[1])


def _dataset_geometry(dataset: Any) -> tuple:
    """(channels, size) of a dataset's images: its ``image_shape`` when it has one, else its first example."""
    shape = getattr(dataset, "image_shape", None)
    if shape is None:
        real = getattr(dataset, "real", dataset)
        try:
            first = real[0]
            shape = tuple(torch.as_tensor(first["pixel_values"]).shape)
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(
                "dataset= must yield {'pixel_values': (C, H, W), 'labels': ...} (an hf_csr dataset such as "
                f"load_image_dataset(...)); reading its first example failed ({type(error).__name__}: {error})."
            ) from None
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"dataset images must be square (C, H, W); got shape {tuple(shape)}.")
    return int(shape[0]), int(shape[1])


AutoConfig.register(RobustClassifierConfig.model_type, RobustClassifierConfig, exist_ok=True)
AutoModelForImageClassification.register(RobustClassifierConfig, RobustImageClassifier, exist_ok=True)
AutoImageProcessor.register(RobustClassifierConfig, RobustImageProcessor, exist_ok=True)
