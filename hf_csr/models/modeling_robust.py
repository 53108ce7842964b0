"""``RobustImageClassifier``: a transformers ``PreTrainedModel`` around any timm backbone.

Inputs are ``pixel_values`` in [0, 1]; the model normalises them with its own mean/std, so attack
budgets are in pixel units (the AutoAttack / RobustBench convention). The config records the
backbone (name and arguments), mean/std, class names and the threat model the weights were trained
for. ``save_pretrained`` writes safetensors; ``AutoModelForImageClassification.from_pretrained``
loads it back after ``import hf_csr``.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
from safetensors import SafetensorError
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from ..utils import check_pixel_values, input_checks_enabled

__all__ = ["RobustClassifierConfig", "RobustImageClassifier", "create_robust_classifier", "MAX_PARAMETERS"]

#: Configs describing a larger network are rejected before any memory is allocated.
MAX_PARAMETERS = 2_000_000_000
_MAX_IMAGE_SIZE = 4096
_MAX_CHANNELS = 64
_MAX_CLASSES = 100_000
THREAT_NORMS = ("Linf", "L2")


def _check_backbone_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a timm model name (str); got {name!r}.")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}: it is not in timm's registry (after `import hf_csr`).{hint} "
            "hf_csr registers preact_resnet18, wrn28_10_ddpm, wrn34_10_ddpm, wrn70_16_ddpm, wrn28_10_trades, "
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

    def __post_init__(self, **kwargs):
        _check_backbone_name(self.backbone)
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
        super().__post_init__(**kwargs)
        if not isinstance(self.num_labels, int) or not 2 <= self.num_labels <= _MAX_CLASSES:
            raise ValueError(f"num_labels must be an integer in [2, {_MAX_CLASSES}]; got {self.num_labels!r}.")


def _check_threat_model(threat_model: Optional[dict]) -> Dict[str, Any]:
    from ..validation import check_budget

    threat = {"norm": "Linf", "eps": 8 / 255}
    if threat_model is not None:
        if not isinstance(threat_model, dict):
            raise ValueError(f"threat_model must be a dict like {{'norm': 'Linf', 'eps': 8/255}}; got {threat_model!r}.")
        threat.update(threat_model)
    if threat["norm"] not in THREAT_NORMS:
        raise ValueError(f"threat_model['norm'] must be one of {list(THREAT_NORMS)}; got {threat['norm']!r}.")
    eps = threat["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"threat_model['eps'] must be a positive number (pixel units); got {eps!r}.")
    threat["eps"] = check_budget(eps, threat["norm"], "threat_model['eps']")  # <= 1 for Linf
    return threat


class RobustImageClassifier(PreTrainedModel):
    """An image classifier taking ``pixel_values`` in [0, 1] and normalising them itself."""

    config_class = RobustClassifierConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

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
                _check_labels(labels, self.config.num_labels)
            loss = F.cross_entropy(logits.float(), labels)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutput(loss=loss, logits=logits)


def _check_labels(labels: torch.Tensor, num_labels: int) -> None:
    if labels.numel() and (bool((labels < 0).any()) or bool((labels >= num_labels).any())):
        raise ValueError(
            f"labels must lie in [0, num_labels) = [0, {num_labels}); got values in "
            f"[{int(labels.min())}, {int(labels.max())}]. Check the dataset's label column against the model's classes."
        )


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
    num_channels: int = 3,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    threat_model: Optional[dict] = None,
    **backbone_kwargs: Any,
) -> RobustImageClassifier:
    """Build a randomly initialised :class:`RobustImageClassifier`.

    ``class_names`` (or ``num_classes``) fixes the classes; ``backbone_kwargs`` go to timm.
    """
    if class_names is not None:
        names: List[str] = [str(n) for n in class_names]
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"num_classes = {num_classes} but {len(names)} class_names were given.")
    elif num_classes is not None:
        names = [str(i) for i in range(num_classes)]
    else:
        raise ValueError("pass num_classes or class_names.")
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


AutoConfig.register(RobustClassifierConfig.model_type, RobustClassifierConfig, exist_ok=True)
AutoModelForImageClassification.register(RobustClassifierConfig, RobustImageClassifier, exist_ok=True)
