"""CIFAR PreAct-ResNet (He et al. 2016), the backbone of the paper's from-scratch experiments.

Parameter names follow the widely used CIFAR implementation (``conv1``, ``layer{1..4}.{k}.bn1/conv1/
bn2/conv2/shortcut.0``, ``bn``, ``linear``), so its state dicts load without a key mapping.
``width`` and ``num_blocks`` shrink the network for tests.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import CIFAR10_MEAN, CIFAR10_STD, ClassifierHeadMixin, get_activation

__all__ = ["PreActBlock", "PreActResNet"]


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


class PreActResNet(ClassifierHeadMixin, nn.Module):
    """PreAct-ResNet for small images (3x3 stem, no max-pool, global average pool)."""

    classifier_name = "linear"

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 64,
        act_layer: str = "relu",
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unexpected PreActResNet arguments: {sorted(kwargs)}.")
        if width < 1 or len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"width must be >= 1 and num_blocks four positive integers; got {width}, {num_blocks}.")
        act = get_activation(act_layer)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        planes, layers = width, []
        for index, (blocks, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            out_planes = width * 2**index
            stage = [PreActBlock(planes, out_planes, stride, act)]
            stage += [PreActBlock(out_planes, out_planes, 1, act) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            planes = out_planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(planes)
        self.act = act()
        self.num_features = planes
        self.linear = nn.Linear(planes, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.act(self.bn(x))


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


default_cfgs = generate_default_cfgs({"preact_resnet18.cifar10": _cfg()})


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct-ResNet18 for CIFAR (about 11.2M parameters at width 64, 10 classes)."""
    kwargs.setdefault("num_blocks", (2, 2, 2, 2))
    return build_model_with_cfg(PreActResNet, "preact_resnet18", pretrained, **kwargs)
