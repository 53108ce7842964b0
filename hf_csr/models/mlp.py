"""A small fully connected network for Fashion-MNIST, written as convolutions so that it is a full timm model.

Its first layer is a convolution whose kernel covers the whole image (a dense layer over the pixels), the next
ones are 1 x 1 convolutions (dense layers over the features): on a 28 x 28 image it computes exactly an MLP
``784 -> 512 -> 256 -> 256 -> 10`` with ReLUs. Written this way it keeps timm's interface (``features_only``,
``forward_intermediates``, ``reset_classifier``, TorchScript, FX) through :class:`TimmBackboneMixin`, and it costs
about a tenth of ``preact_resnet_tiny`` per image on a CPU, which is what makes the Fashion-MNIST reproduction's
many adversarially trained runs affordable on two cores.

This module has no ``from __future__ import annotations`` on purpose (TorchScript, see ``_common``).
"""

from typing import Dict, List, Sequence

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_module

from ..data.registry import DATASETS
from ._common import TimmBackboneMixin, checkpoint_blocks, get_activation, unwrap_robust_classifier

__all__ = ["ConvMLP", "DenseConv2d"]


@register_notrace_module  # FX: a leaf (its fast path looks at the input's shape)
class DenseConv2d(nn.Conv2d):
    """A convolution without padding or stride that, on an input exactly its kernel's size (one output
    position), runs as the equivalent matrix product: the same result as the convolution, several times faster
    on a CPU than its unfold-based path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == self.kernel_size[0] and x.shape[-1] == self.kernel_size[1]:
            out = torch.nn.functional.linear(x.flatten(1), self.weight.flatten(1), self.bias)
            return out[:, :, None, None]
        return self._conv_forward(x, self.weight, self.bias)


class ConvMLP(TimmBackboneMixin, nn.Module):
    """A multilayer perceptron over a fixed-size image, as convolutions.

    ``conv1`` (kernel ``img_size``: the first dense layer) -> one stage per further hidden layer (activation,
    then a 1 x 1 convolution) -> activation -> global pool -> ``fc``. ``feature_info``: ``conv1`` then each stage,
    all at reduction ``img_size`` (one spatial position on an ``img_size`` image; a larger image gives a grid of
    such positions, averaged by the pool).
    """

    classifier_name = "fc"
    stem_name = "conv1"
    final_norm_names = ("norm", "act")

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        hidden: Sequence[int] = (512, 256, 256),
        global_pool: str = "avg",
        act_layer: str = "relu",
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unexpected ConvMLP arguments: {sorted(kwargs)}.")
        hidden = [int(h) for h in hidden]
        if len(hidden) < 3 or min(hidden) < 1 or int(img_size) < 1:
            raise ValueError(f"hidden must list at least 3 positive widths and img_size be >= 1; got {hidden}, {img_size}.")
        act = get_activation(act_layer)
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.conv1 = DenseConv2d(in_chans, hidden[0], int(img_size))
        self.feature_info = [dict(num_chs=hidden[0], reduction=int(img_size), module="conv1")]
        stages = []
        for index, (width_in, width_out) in enumerate(zip(hidden[:-1], hidden[1:]), start=1):
            stages.append(nn.Sequential(nn.Sequential(act(), DenseConv2d(width_in, width_out, 1))))
            self.feature_info.append(dict(num_chs=width_out, reduction=int(img_size), module=f"stages.{index - 1}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.act = act()
        self._init_head(hidden[-1], num_classes, global_pool)

    @torch.jit.ignore
    def stage_modules(self) -> List[nn.Sequential]:
        return list(self.stages)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups for timm's layer-wise LR decay (``param_groups_layer_decay``)."""
        return dict(stem=r"^conv1", blocks=r"^stages\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_blocks(self.checkpointed_blocks(), x)
        else:
            x = self.stages(x)
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict, model=None) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: a saved ``RobustImageClassifier``'s keys -> this module's."""
    return unwrap_robust_classifier(state_dict)


_FASHION_MNIST = DATASETS["fashion_mnist"]
default_cfgs = generate_default_cfgs({
    "mlp_tiny.fashion_mnist": {
        "url": "",
        "num_classes": _FASHION_MNIST.num_classes,
        "input_size": _FASHION_MNIST.input_size,
        "fixed_input_size": True,  # the first layer's kernel is the image
        "pool_size": (1, 1),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": _FASHION_MNIST.mean,
        "std": _FASHION_MNIST.std,
        "first_conv": "conv1",
        "classifier": "fc",
    },
})


@register_model
def mlp_tiny(pretrained: bool = False, **kwargs) -> ConvMLP:
    """An MLP 784 -> 512 -> 256 -> 256 -> 10 for 1 x 28 x 28 Fashion-MNIST images (about 0.6M parameters), as
    convolutions; ``hidden`` changes the widths, ``img_size``/``in_chans`` the input."""
    kwargs.setdefault("in_chans", _FASHION_MNIST.num_channels)
    kwargs.setdefault("img_size", _FASHION_MNIST.image_size)
    levels = len(kwargs.get("hidden", (512, 256, 256)))  # conv1 + one stage per further hidden layer
    return build_model_with_cfg(ConvMLP, "mlp_tiny", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=tuple(range(levels)), flatten_sequential=True), **kwargs)
