"""Pieces shared by the CIFAR-style backbones: dataset statistics (from :mod:`hf_csr.data.registry`), activations, timm's model interface
(classifier head, features, intermediates, gradient checkpointing) and checkpoint-key helpers.

This module has no ``from __future__ import annotations`` on purpose: TorchScript reads the annotations of
the modules' ``forward`` methods and class attributes, and cannot resolve them as strings.
"""

import contextlib
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint
from timm.layers import create_classifier
from timm.models._features import feature_take_indices

from ..data.registry import DATASETS, IDENTITY_MEAN, IDENTITY_STD  # noqa: F401  (re-exported for the backbones)

# The statistics the backbones' pretrained configs name, read from the dataset registry.
CIFAR10_MEAN, CIFAR10_STD = DATASETS["cifar10"].mean, DATASETS["cifar10"].std
CIFAR100_MEAN, CIFAR100_STD = DATASETS["cifar100"].mean, DATASETS["cifar100"].std

ACTIVATIONS: Dict[str, Type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}


def get_activation(name: str) -> Type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"act_layer must be one of {sorted(ACTIVATIONS)}; got {name!r}.") from None


# --------------------------------------------------------------------------- gradient checkpointing
@contextlib.contextmanager
def _replay_batchnorm(states: List[Tuple[_BatchNorm, bool, bool]]):
    """During a recomputation: each BatchNorm in the state it had in the original forward (``training``,
    ``track_running_stats``: e.g. AWP and the attacks freeze the statistics for their forward, and backward
    runs after they restored them), and with its running statistics left as they are (the original
    forward already updated them once).

    ``momentum = 0`` makes the train-mode update ``running * 1 + batch * 0``, i.e. no change, while the
    recomputation runs the very same operation as the original forward (non-reentrant checkpointing
    checks that the same tensors are saved); ``num_batches_tracked`` is put back afterwards.
    """
    current = [(module, module.training, module.track_running_stats, module.momentum) for module, _, _ in states]
    counts = [
        (module, module.num_batches_tracked.clone())
        for module, _, _ in states
        if module.num_batches_tracked is not None
    ]
    try:
        for module, training, track in states:
            module.training = training
            module.track_running_stats = track
            module.momentum = 0.0
        yield
    finally:
        for module, training, track, momentum in current:
            module.training = training
            module.track_running_stats = track
            module.momentum = momentum
        with torch.no_grad():
            for module, count in counts:
                module.num_batches_tracked.copy_(count)


def _context_for(block: nn.Module) -> Callable:
    batchnorms = [m for m in block.modules() if isinstance(m, _BatchNorm)]

    def context_fn():
        states = [(m, m.training, m.track_running_stats) for m in batchnorms]  # captured at forward time
        return contextlib.nullcontext(), _replay_batchnorm(states)

    return context_fn


def checkpoint_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run ``blocks`` in order, each as a gradient-checkpointed segment (timm's ``checkpoint_seq`` with
    ``every=1``), such that a step gives the same loss, gradients *and* BatchNorm statistics as without.

    * Non-reentrant checkpointing always (whatever ``TIMM_REENTRANT_CKPT`` says): it supports
      ``torch.autograd.grad`` with respect to the input (the attacks) and inputs that do not require grad.
    * The recomputation replays each BatchNorm in the mode of the original forward and does not update its
      running statistics a second time (plain checkpointing would count every train-mode batch twice).
    * Without autograd (``torch.no_grad``, evaluation) the blocks just run: there is nothing to save.
    """
    if not torch.is_grad_enabled():
        for block in blocks:
            x = block(x)
        return x
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False, context_fn=_context_for(block))
    return x


# --------------------------------------------------------------------------- timm's model interface
class TimmBackboneMixin:
    """timm's model interface for a CIFAR backbone ``stem -> stages -> final norm/act -> pool -> Linear``.

    The subclass registers, in this order, ``stem_name`` (a conv), the stages (``stage_names``), the final
    ``batchnorm``/``bn`` + ``act`` (``final_norm_names``), then calls :meth:`_init_head`. It sets
    ``feature_info`` (stem + one entry per stage) and writes a scriptable ``forward_features`` /
    ``forward_head`` of its own.
    """

    classifier_name = "fc"
    stem_name = "conv1"
    final_norm_names = ("bn", "act")

    def _init_head(self, num_features: int, num_classes: int, global_pool: str) -> None:
        self.num_classes = num_classes
        self.num_features = num_features
        self.global_pool, fc = create_classifier(num_features, num_classes, pool_type=global_pool)
        setattr(self, self.classifier_name, fc)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def stage_modules(self) -> List[nn.Sequential]:
        """The stages, each a sequence of residual blocks (the checkpointing units)."""
        raise NotImplementedError

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block's activations in the backward pass instead of storing them
        (non-reentrant; see :func:`checkpoint_blocks`)."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return self.classifier_name if name_only else getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        old = getattr(self, self.classifier_name)
        reference = next(iter(self.parameters()))
        self._init_head(self.num_features, num_classes, global_pool)
        getattr(self, self.classifier_name).to(device=reference.device, dtype=reference.dtype)
        getattr(self, self.classifier_name).train(old.training)
        self.global_pool.train(old.training)

    @torch.jit.ignore
    def checkpointed_blocks(self) -> List[nn.Module]:
        """Every residual block, in order (what ``forward_features`` checkpoints one by one)."""
        return [block for stage in self.stage_modules() for block in stage]

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_blocks(list(stage), x) if self.grad_checkpointing else stage(x)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's intermediate-features API: the stem output then each stage output (``feature_info``
        order). ``norm=True`` applies the final BatchNorm + activation to the last stage's output (these are
        pre-activation networks: the stage outputs themselves are un-normalised residual sums)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW'; got {output_fmt!r}.")
        stages = self.stage_modules()
        take_indices, max_index = feature_take_indices(len(stages) + 1, indices)
        intermediates = []
        x = getattr(self, self.stem_name)(x)
        if 0 in take_indices:
            intermediates.append(x)
        last = max_index if stop_early else len(stages)
        for index, stage in enumerate(stages[:last], start=1):
            x = self._run_stage(stage, x)
            if index in take_indices:
                intermediates.append(self._final_norm(x) if norm and index == len(stages) else x)
        if intermediates_only:
            return intermediates
        if last == len(stages):
            x = self._final_norm(x)
        return x, intermediates

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        norm_name, act_name = self.final_norm_names
        return getattr(self, act_name)(getattr(self, norm_name)(x))

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last wanted intermediate (and the head); return the kept indices."""
        stages = self.stage_modules()
        take_indices, max_index = feature_take_indices(len(stages) + 1, indices)
        for stage in stages[max(max_index, 0):]:
            for name in [name for name, _ in stage.named_children()]:
                delattr(stage, name)  # an empty Sequential, as timm's ResNet does
        if prune_norm or max_index < len(stages):
            for name in self.final_norm_names:
                setattr(self, name, nn.Identity())
        if max_index < len(stages):
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < len(stages):
            self.reset_classifier(0, "")
        return take_indices


def init_like_wide_resnet(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit BatchNorm, zero linear bias (the TRADES/DDPM init)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- checkpoint keys
#: The top-level buffers of a transformers ``RobustImageClassifier`` state dict (``model.safetensors``).
ROBUST_CLASSIFIER_BUFFERS = ("image_mean", "image_std")
ROBUST_CLASSIFIER_PREFIX = "backbone."


def unwrap_robust_classifier(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A ``RobustImageClassifier`` state dict (``backbone.*`` + ``image_mean``/``image_std``) -> the
    backbone's own keys; any other state dict passes unchanged. This is what lets
    ``timm.create_model("hf-hub:<repo>", pretrained=True)`` read the ``model.safetensors`` that
    ``save_pretrained`` wrote (the timm model does not normalise: the buffers are dropped)."""
    keys = set(state_dict)
    if not set(ROBUST_CLASSIFIER_BUFFERS) <= keys:
        return dict(state_dict)
    rest = keys - set(ROBUST_CLASSIFIER_BUFFERS)
    if not rest or not all(key.startswith(ROBUST_CLASSIFIER_PREFIX) for key in rest):
        return dict(state_dict)
    return {key[len(ROBUST_CLASSIFIER_PREFIX):]: state_dict[key] for key in state_dict if key in rest}
