"""WideResNets in the two layouts of the published robust checkpoints (``docs/method.md`` section 9).

* ``ddpm`` -- the DDPM-data models of Wang et al. (2023) / Gowal et al. (2020): SiLU, TF-style
  "SAME" padding for the first convolution of every block (``F.pad(1, 1, 1, 1)`` at stride 1,
  ``F.pad(0, 1, 0, 1)`` at stride 2, then a convolution without padding), BatchNorm momentum 0.01.
* ``trades`` -- the TRADES / TRADES-AWP WRN-34-10: ReLU, symmetric padding 1, BatchNorm momentum 0.1,
  no input normalisation.

Both share one module tree whose parameter names are those of the DDPM checkpoints::

    init_conv.weight
    layer.{g}.block.{k}.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}.*   g = 0, 1, 2
    batchnorm.*
    logits.{weight, bias}

so a DDPM checkpoint loads after stripping its wrapper prefix (``module.0.``), and a TRADES
checkpoint through :func:`map_trades_keys`, which renames

=============================================  ==============================================
TRADES key                                     hf_csr key
=============================================  ==============================================
``conv1.*``                                    ``init_conv.*``
``block{g}.layer.{k}.bn1.*``                   ``layer.{g-1}.block.{k}.batchnorm_0.*``
``block{g}.layer.{k}.conv1.*``                 ``layer.{g-1}.block.{k}.conv_0.*``
``block{g}.layer.{k}.bn2.*``                   ``layer.{g-1}.block.{k}.batchnorm_1.*``
``block{g}.layer.{k}.conv2.*``                 ``layer.{g-1}.block.{k}.conv_1.*``
``block{g}.layer.{k}.convShortcut.*``          ``layer.{g-1}.block.{k}.shortcut.*``
``bn1.*``                                      ``batchnorm.*``
``fc.*``                                       ``logits.*``
``sub_block1.*``                               dropped (built but never used by TRADES' forward)
=============================================  ==============================================
"""

import re
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IDENTITY_MEAN,
    IDENTITY_STD,
    TimmBackboneMixin,
    checkpoint_blocks,
    get_activation,
    init_like_wide_resnet,
    unwrap_robust_classifier,
)

__all__ = [
    "LAYOUTS",
    "WideResNet",
    "WideResNetBlock",
    "map_trades_keys",
    "strip_wrapper_prefix",
    "unwrap_checkpoint",
    "checkpoint_filter_fn",
]

#: layout -> (activation, TF "SAME" padding, BatchNorm momentum)
LAYOUTS = {"ddpm": ("silu", True, 0.01), "trades": ("relu", False, 0.1)}


class WideResNetBlock(nn.Module):
    def __init__(
        self, in_planes: int, out_planes: int, stride: int, act_layer: type, same_padding: bool, bn_momentum: float
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2; got {stride}.")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=bn_momentum)
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0 if same_padding else 1, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=bn_momentum)
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.act = act_layer()
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) if in_planes != out_planes else None
        )
        self.same_padding = same_padding
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.batchnorm_0(x))
        if self.shortcut is not None:
            x = out  # both layouts take the projection shortcut from the activated input
        if self.same_padding:
            out = F.pad(out, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
        out = self.conv_0(out)
        out = self.conv_1(self.act(self.batchnorm_1(out)))
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class WideResNetGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, **block_kwargs) -> None:
        super().__init__()
        self.block = nn.Sequential(
            *[
                WideResNetBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, **block_kwargs)
                for i in range(num_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNet(TimmBackboneMixin, nn.Module):
    """WideResNet-``depth``-``width`` (pre-activation blocks, 3 groups of ``(depth - 4) / 6`` blocks).

    A full timm model: ``features_only=True`` (``feature_info``: the stem convolution, then each group's
    output at reductions 1, 1, 2, 4), ``forward_intermediates``, ``set_grad_checkpointing`` (one segment
    per residual block), ``reset_classifier``/``global_pool``, TorchScript and FX.
    """

    classifier_name = "logits"
    stem_name = "init_conv"
    final_norm_names = ("batchnorm", "act")

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        layout: str = "ddpm",
        act_layer: Optional[str] = None,
        same_padding: Optional[bool] = None,
        bn_momentum: Optional[float] = None,
        global_pool: str = "avg",
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unexpected WideResNet arguments: {sorted(kwargs)}.")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}; got {layout!r}.")
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 28, 34, 70, ...); got {depth!r}.")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer; got {width!r}.")
        default_act, default_same, default_momentum = LAYOUTS[layout]
        act = get_activation(act_layer or default_act)
        block_kwargs = dict(
            act_layer=act,
            same_padding=default_same if same_padding is None else same_padding,
            bn_momentum=default_momentum if bn_momentum is None else bn_momentum,
        )
        self.layout = layout
        self.in_chans = in_chans
        self.grad_checkpointing = False
        n = (depth - 4) // 6
        channels = (16, 16 * width, 32 * width, 64 * width)
        self.init_conv = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            WideResNetGroup(n, channels[0], channels[1], 1, **block_kwargs),
            WideResNetGroup(n, channels[1], channels[2], 2, **block_kwargs),
            WideResNetGroup(n, channels[2], channels[3], 2, **block_kwargs),
        )
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module="init_conv")] + [
            dict(num_chs=channels[g + 1], reduction=2**g, module=f"layer.{g}") for g in range(3)
        ]
        self.batchnorm = nn.BatchNorm2d(channels[3], momentum=block_kwargs["bn_momentum"])
        self.act = act()
        self._init_head(channels[3], num_classes, global_pool)
        init_like_wide_resnet(self)

    @torch.jit.ignore
    def stage_modules(self) -> List[nn.Sequential]:
        return [group.block for group in self.layer]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups for timm's layer-wise LR decay (``param_groups_layer_decay``)."""
        return dict(
            stem=r"^init_conv",
            blocks=r"^layer\.(\d+)" if coarse else [(r"^layer\.(\d+)\.block\.(\d+)", None), (r"^batchnorm", (99999,))],
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.init_conv(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_blocks(self.checkpointed_blocks(), x)
        else:
            x = self.layer(x)
        return self.act(self.batchnorm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.logits(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------- checkpoint keys
_WRAPPER_PREFIXES = ("module.", "model.", "0.")
_TRADES_BLOCK = re.compile(r"^block([123])\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(.+)$")
_TRADES_BLOCK_NAMES = {
    "bn1": "batchnorm_0",
    "conv1": "conv_0",
    "bn2": "batchnorm_1",
    "conv2": "conv_1",
    "convShortcut": "shortcut",
}
_TRADES_TOP = {"conv1.": "init_conv.", "bn1.": "batchnorm.", "fc.": "logits."}


def unwrap_checkpoint(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (``model_state_dict``, ``state_dict`` or the dict itself)."""
    for key in ("model_state_dict", "state_dict", "model"):
        inner = checkpoint.get(key) if isinstance(checkpoint, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    return dict(checkpoint)


def strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove the prefixes that wrappers add to every key: ``module.`` (DataParallel), ``model.``,
    ``0.`` (an ``nn.Sequential`` around the network) -- repeatedly, e.g. ``module.0.``."""
    state = dict(state_dict)
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def map_trades_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename TRADES-layout keys to hf_csr's (see the module docstring); other keys pass unchanged."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("sub_block1."):
            continue
        match = _TRADES_BLOCK.match(key)
        if match:
            group, index, name, rest = match.groups()
            out[f"layer.{int(group) - 1}.block.{index}.{_TRADES_BLOCK_NAMES[name]}.{rest}"] = value
            continue
        for old, new in _TRADES_TOP.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Mapping, model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: a published DDPM or TRADES checkpoint, or the ``model.safetensors``
    of a saved ``RobustImageClassifier`` -> this module's keys."""
    state = strip_wrapper_prefix(unwrap_robust_classifier(unwrap_checkpoint(state_dict)))
    if any(key.startswith(("block1.", "fc.", "sub_block1.")) for key in state):
        state = map_trades_keys(state)
    return state


# --------------------------------------------------------------------------- timm registry
_DM_REPO = "wzekai99/DM-Improves-AT"
_DM_PAPER = "Better Diffusion Models Further Improve Adversarial Training"


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "init_conv",
        "classifier": "logits",
        **kwargs,
    }


def _dm_cfg(filename: str, cifar100: bool = False, **kwargs):
    extra = dict(num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD) if cifar100 else {}
    return _cfg(
        hf_hub_id=_DM_REPO,
        hf_hub_filename=f"checkpoint/{filename}",
        paper_name=_DM_PAPER,
        paper_ids="arXiv:2302.04638",
        origin_url=f"https://huggingface.co/{_DM_REPO}",
        **extra,
        **kwargs,
    )


_trades_cfg = dict(mean=IDENTITY_MEAN, std=IDENTITY_STD, paper_name="TRADES (Zhang et al. 2019)")

default_cfgs = generate_default_cfgs(
    {
        "wrn28_10_ddpm.dm_cifar10_linf": _dm_cfg("cifar10_linf_wrn28-10.pt"),
        "wrn28_10_ddpm.dm_cifar10_l2": _dm_cfg("cifar10_l2_wrn28-10.pt"),
        "wrn28_10_ddpm.dm_cifar100_linf": _dm_cfg("cifar100_linf_wrn28-10.pt", cifar100=True),
        "wrn70_16_ddpm.dm_cifar10_linf": _dm_cfg("cifar10_linf_wrn70-16.pt"),
        "wrn70_16_ddpm.dm_cifar10_l2": _dm_cfg("cifar10_l2_wrn70-16.pt"),
        "wrn70_16_ddpm.dm_cifar100_linf": _dm_cfg("cifar100_linf_wrn70-16.pt", cifar100=True),
        "wrn34_10_ddpm.cifar10": _cfg(),
        "wrn28_10_trades.cifar10": _cfg(**_trades_cfg),
        "wrn34_10_trades.cifar10": _cfg(**_trades_cfg),
        "wrn70_16_trades.cifar10": _cfg(**_trades_cfg),
    }
)


def _create(variant: str, pretrained: bool, default_depth: int, default_width: int, layout: str, **kwargs) -> WideResNet:
    kwargs.setdefault("depth", default_depth)
    kwargs.setdefault("width", default_width)
    return build_model_with_cfg(
        WideResNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # features_only: the stem and the three groups (layer.0, layer.1, layer.2 once flattened)
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        layout=layout,
        **kwargs,
    )


@register_model
def wrn28_10_ddpm(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10, DDPM-data layout (SiLU, SAME padding); about 36.5M parameters."""
    return _create("wrn28_10_ddpm", pretrained, 28, 10, "ddpm", **kwargs)


@register_model
def wrn34_10_ddpm(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-34-10, DDPM-data layout; about 46.2M parameters."""
    return _create("wrn34_10_ddpm", pretrained, 34, 10, "ddpm", **kwargs)


@register_model
def wrn70_16_ddpm(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-70-16, DDPM-data layout; about 267M parameters."""
    return _create("wrn70_16_ddpm", pretrained, 70, 16, "ddpm", **kwargs)


@register_model
def wrn28_10_trades(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10, TRADES layout (ReLU, no normalisation)."""
    return _create("wrn28_10_trades", pretrained, 28, 10, "trades", **kwargs)


@register_model
def wrn34_10_trades(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-34-10, TRADES layout, the TRADES / TRADES-AWP backbone of Table 1; about 46.2M parameters."""
    return _create("wrn34_10_trades", pretrained, 34, 10, "trades", **kwargs)


@register_model
def wrn70_16_trades(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-70-16, TRADES layout."""
    return _create("wrn70_16_trades", pretrained, 70, 16, "trades", **kwargs)
