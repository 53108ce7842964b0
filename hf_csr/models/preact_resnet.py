"""CIFAR PreAct-ResNet (He et al. 2016), the backbone of the paper's from-scratch experiments.

Parameter names follow the widely used CIFAR implementation (``conv1``, ``layer{1..4}.{k}.bn1/conv1/
bn2/conv2/shortcut.0``, ``bn``, ``linear``), so its state dicts load without a key mapping.
``width`` and ``num_blocks`` shrink the network; ``preact_resnet_tiny`` is the registered small one (one
block per stage, width 8, 1 x 28 x 28 Fashion-MNIST inputs) that the quick start and the tests train.
"""

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..data.registry import DATASETS
from ._common import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    TimmBackboneMixin,
    checkpoint_blocks,
    get_activation,
    unwrap_robust_classifier,
)

__all__ = ["PreActBlock", "PreActResNet", "checkpoint_filter_fn"]


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, act_layer: type) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.act = act_layer()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act(self.bn2(out)))
        return out + shortcut


class PreActResNet(TimmBackboneMixin, nn.Module):
    """PreAct-ResNet for small images (3x3 stem, no max-pool, global average pool).

    A full timm model: ``features_only=True`` (``feature_info``: the stem convolution, then ``layer1`` ..
    ``layer4`` at reductions 1, 1, 2, 4, 8), ``forward_intermediates``, ``set_grad_checkpointing`` (one
    segment per residual block), ``reset_classifier``/``global_pool``, TorchScript and FX.
    """

    classifier_name = "linear"
    stem_name = "conv1"
    final_norm_names = ("bn", "act")

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 64,
        act_layer: str = "relu",
        global_pool: str = "avg",
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unexpected PreActResNet arguments: {sorted(kwargs)}.")
        if width < 1 or len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"width must be >= 1 and num_blocks four positive integers; got {width}, {num_blocks}.")
        act = get_activation(act_layer)
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        self.feature_info = [dict(num_chs=width, reduction=1, module="conv1")]
        planes, layers = width, []
        for index, (blocks, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            out_planes = width * 2**index
            stage = [PreActBlock(planes, out_planes, stride, act)]
            stage += [PreActBlock(out_planes, out_planes, 1, act) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            self.feature_info.append(dict(num_chs=out_planes, reduction=2**index, module=f"layer{index + 1}"))
            planes = out_planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(planes)
        self.act = act()
        self._init_head(planes, num_classes, global_pool)

    @torch.jit.ignore
    def stage_modules(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups for timm's layer-wise LR decay (``param_groups_layer_decay``)."""
        return dict(
            stem=r"^conv1",
            blocks=r"^layer(\d+)" if coarse else [(r"^layer(\d+)\.(\d+)", None), (r"^bn\.", (99999,))],
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_blocks(self.checkpointed_blocks(), x)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.act(self.bn(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Mapping, model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: the ``model.safetensors`` of a saved ``RobustImageClassifier`` ->
    this module's keys; a plain state dict passes unchanged."""
    return unwrap_robust_classifier(state_dict)


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        "paper_name": "Identity Mappings in Deep Residual Networks",
        **kwargs,
    }


_FASHION_MNIST = DATASETS["fashion_mnist"]
default_cfgs = generate_default_cfgs({
    "preact_resnet18.cifar10": _cfg(),
    "preact_resnet_tiny.fashion_mnist": _cfg(
        input_size=_FASHION_MNIST.input_size, mean=_FASHION_MNIST.mean, std=_FASHION_MNIST.std,
        num_classes=_FASHION_MNIST.num_classes,
    ),
})


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct-ResNet18 for CIFAR (about 11.2M parameters at width 64, 10 classes)."""
    kwargs.setdefault("num_blocks", (2, 2, 2, 2))
    return build_model_with_cfg(
        PreActResNet, "preact_resnet18", pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


@register_model
def preact_resnet_tiny(pretrained: bool = False, **kwargs) -> PreActResNet:
    """A small PreAct-ResNet for 1 x 28 x 28 Fashion-MNIST images: one block per stage, width 8 (about 77k
    parameters, 10 classes); the backbone of the quick start and the tests (``width`` shrinks it further)."""
    kwargs.setdefault("num_blocks", (1, 1, 1, 1))
    kwargs.setdefault("width", 8)
    kwargs.setdefault("in_chans", _FASHION_MNIST.num_channels)
    return build_model_with_cfg(
        PreActResNet, "preact_resnet_tiny", pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )
