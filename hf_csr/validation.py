"""Checks at the boundary: settings, budgets, data layout, labels, attack lists, model weights.

Every function raises a ``ValueError`` that names the argument (or file) and the fix, and each is cheap:
it runs where a value enters hf_csr (argument parsing, a constructor, a loader), before any long work.
Inner layers trust what passed here.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "NORMS",
    "MAX_NUM_CLASSES",
    "MAX_ATTACK_STEPS",
    "MAX_CROP_PADDING",
    "check_finite_number",
    "check_positive_int",
    "check_choice",
    "check_budget",
    "check_seed",
    "check_channels_last_images",
    "check_class_indices",
    "check_labels_in_range",
    "check_repo_id",
    "is_repo_id",
    "check_dataset_geometry",
    "non_finite_tensors",
    "check_finite_model",
    "check_evaluation_inputs",
    "check_device",
]

#: The threat models' norms (attacks, training arguments, model configs, the command line).
NORMS = ("Linf", "L2")
#: Largest class count (and so largest label + 1) hf_csr accepts: a label above it is a corrupted file,
#: and a per-class table of that size would allocate memory out of proportion to the data.
MAX_NUM_CLASSES = 100_000
#: Largest number of attack iterations of one PGD (training or evaluation); AutoAttack uses 100.
MAX_ATTACK_STEPS = 10_000
#: Largest zero padding of the random crop (the paper pads by 4).
MAX_CROP_PADDING = 256


def check_finite_number(
    value: Any, name: str, *, minimum: Optional[float] = None, strict: bool = False, maximum: Optional[float] = None
) -> float:
    """``value`` as a float; ``ValueError`` unless it is a finite real number in the given range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value}.")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}; got {value:g}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}; got {value:g}.")
    return value


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int; ``ValueError`` unless it is an integer >= 1 (or None with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}; got {value!r}.")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` unchanged; ``ValueError`` naming ``name`` and the allowed values unless it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}.")
    return value


def check_budget(eps: Any, norm: Optional[str], name: str = "eps") -> float:
    """An attack budget in pixel units: finite, > 0, and <= 1 for ``Linf`` (images are in [0, 1], so a
    larger Linf budget allows any image and is a unit mistake, e.g. 8 instead of 8/255)."""
    if isinstance(eps, torch.Tensor):
        if eps.numel() == 0:
            raise ValueError(f"{name} is empty.")
        if not bool(torch.isfinite(eps).all()) or not bool((eps > 0).all()):
            raise ValueError(f"{name} must be finite and > 0 for every example.")
        if norm == "Linf" and float(eps.max()) > 1:
            raise ValueError(
                f"{name} reaches {float(eps.max()):.4g}, above 1 for Linf on [0, 1] images; use pixel units like 8/255."
            )
        return float(eps.max())
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"{name} must be a number (pixel units, e.g. 8/255); got {eps!r}.")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{name} must be a finite budget > 0 in pixel units (e.g. 8/255 for Linf, 0.5 for L2); got {eps}.")
    if norm == "Linf" and eps > 1:
        raise ValueError(
            f"{name} = {eps:.6g} exceeds 1 for Linf on [0, 1] images (every image would be in the ball); "
            "use pixel units such as 8/255."
        )
    return eps


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed numpy, torch and Python all accept: an integer in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"{name} must be an integer in [0, 2**32 - 1]; got {seed!r}.")
    return int(seed)


def check_channels_last_images(shape: Sequence[int], name: str) -> None:
    """Images stored as (N, H, W, C) (or (N, H, W)) uint8 must have C = 1 or 3 channels last.

    A channels-first array (N, C, H, W) would otherwise be read as N images of height C, width H and W
    channels (Fashion-MNIST (N, 1, 28, 28): 28-channel images one pixel high)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        return
    if len(shape) != 4:
        raise ValueError(f"{name}: images must have shape (N, H, W, C) or (N, H, W); got {shape}.")
    if shape[-1] in (1, 3):
        return
    hint = ""
    if shape[1] in (1, 3):
        hint = (f" It looks channels-first (N, C, H, W) = {shape}: store it channels-last, e.g. "
                "np.transpose(images, (0, 2, 3, 1)).")
    raise ValueError(
        f"{name}: images must be channels-last (N, H, W, C) with C = 1 (grayscale) or 3 (RGB); got shape {shape}.{hint}"
    )


def check_class_indices(labels: Any, name: str, num_classes: Optional[int] = None) -> np.ndarray:
    """Labels as int64 class indices: integer dtype (floats are refused, never truncated), >= 0, and
    below ``num_classes`` (or :data:`MAX_NUM_CLASSES`) -- checked before any per-class table is allocated."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must hold integer class indices; got dtype {array.dtype}. Float labels are not truncated: "
            "convert them explicitly (e.g. labels.astype(np.int64)) if they are class indices."
        )
    if array.size == 0:
        return array.astype(np.int64).reshape(-1)
    lo, hi = int(array.min()), int(array.max())
    limit = MAX_NUM_CLASSES if num_classes is None else int(num_classes)
    if lo < 0 or hi >= limit:
        what = f"num_classes = {limit}" if num_classes is not None else f"the largest supported class count ({limit})"
        raise ValueError(
            f"{name} must lie in [0, {limit}) ({what}); got labels in [{lo}, {hi}]. Check the label column or file."
        )
    return array.astype(np.int64).reshape(-1)


def check_labels_in_range(labels: torch.Tensor, num_classes: int, what: str = "dataset", *,
                          allow_empty: bool = False) -> None:
    """Class indices (a tensor) in [0, ``num_classes``): the one range check of labels met by a model (datasets,
    batches, ``pgd_attack``'s ``y``, the classifier's ``labels``, the penalty's ``labels``)."""
    if labels.numel() == 0:
        if allow_empty:
            return
        raise ValueError(f"the {what} is empty: it has no examples.")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"the {what}'s labels lie in [{lo}, {hi}] but the model has num_classes = {num_classes} "
            f"(labels must be in [0, {num_classes})); check the label column or the model's classes."
        )


def is_repo_id(text: Any) -> bool:
    """Whether ``text`` is a valid Hub repo id (``namespace/name`` or ``name``; huggingface_hub's rules)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(text, str):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_repo_id(value: Optional[str], name: str = "repo_id", *, allow_none: bool = False) -> Optional[str]:
    """``value`` unchanged; ``ValueError`` naming ``name`` unless it is a Hub repo id (or None with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not is_repo_id(value):
        raise ValueError(f"{name} must be a Hub repo id like 'namespace/name'; got {value!r}.")
    return value


def check_dataset_geometry(dataset: Any, name: str, *, num_channels: Optional[int], image_size: Optional[int],
                           shape: Optional[Tuple[int, ...]] = None) -> None:
    """The images of ``dataset`` (or of the given ``shape``, (C, H, W)) have the model's channel count and size
    (checked on the shape, no data read)."""
    if shape is None:
        shape = getattr(dataset, "image_shape", None)
    if shape is None:
        real = getattr(dataset, "real", None)
        shape = getattr(real, "image_shape", None)
    if shape is None:
        return
    channels, height, width = (int(s) for s in tuple(shape)[-3:])
    if num_channels is not None and channels != num_channels:
        raise ValueError(
            f"{name} has {channels}-channel images but the model expects num_channels = {num_channels}; "
            "convert the images (grayscale / RGB) or build the model from the data "
            "(create_robust_classifier(..., dataset=train_dataset))."
        )
    if image_size is not None and (height, width) != (image_size, image_size):
        raise ValueError(
            f"{name} has {height}x{width} images but the model was built for image_size = {image_size}; resize the "
            "images or build the model from the data (create_robust_classifier(..., dataset=train_dataset)): a "
            "convolutional network would otherwise train silently on the wrong geometry."
        )


def non_finite_tensors(model: nn.Module) -> List[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding NaN or inf (one device sync)."""
    named: List[Tuple[str, torch.Tensor]] = [
        (n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()
    ]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t.detach()).all().to(named[0][1].device) for _, t in named])
    if bool(flags.all()):
        return []
    return [n for (n, _), ok in zip(named, flags.tolist()) if not ok]


def check_finite_model(model: nn.Module, name: str = "model") -> None:
    """Refuse a model whose weights hold NaN or inf: its outputs are meaningless (an all-NaN model predicts
    class 0 for every image and would be reported as 100% robust on that class)."""
    bad = non_finite_tensors(model)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"{name} has non-finite (NaN or inf) weights in {len(bad)} tensor(s): {shown}. Its outputs are not "
            "predictions; evaluate a checkpoint from before the training diverged."
        )


def check_evaluation_inputs(model: nn.Module, eps: Any, norm: Optional[str]) -> None:
    """What an evaluation checks before its first batch: the budget, and that the weights are finite."""
    check_budget(eps, norm, "eps")
    check_finite_model(model)


def check_device(device: Optional[str], name: str = "--device") -> None:
    """A device string torch understands and this machine has (``cuda`` without a GPU is refused)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{name} {device!r} is not a device (e.g. cpu, cuda, cuda:1, mps): {error}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device!r}: CUDA is not available on this machine; use --device cpu (or omit it).")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{name} {device!r}: MPS is not available on this machine; use --device cpu.")
