"""Backbones registered in timm's registry, and the transformers ``RobustImageClassifier``."""

from . import mlp, preact_resnet, wide_resnet  # noqa: F401  (registers the timm models)
from .modeling_robust import MAX_PARAMETERS, RobustClassifierConfig, RobustImageClassifier, create_robust_classifier
from ._common import checkpoint_blocks, unwrap_robust_classifier
from .preact_resnet import PreActResNet
from .wide_resnet import WideResNet, checkpoint_filter_fn, map_trades_keys, strip_wrapper_prefix

__all__ = [
    "MAX_PARAMETERS",
    "PreActResNet",
    "RobustClassifierConfig",
    "RobustImageClassifier",
    "WideResNet",
    "checkpoint_blocks",
    "checkpoint_filter_fn",
    "create_robust_classifier",
    "map_trades_keys",
    "strip_wrapper_prefix",
    "unwrap_robust_classifier",
]
