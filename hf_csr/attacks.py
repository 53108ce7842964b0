"""Projected gradient descent attacks (``docs/method.md`` section 6).

``pgd_attack`` covers the training and evaluation attacks of the paper: Linf and L2 threat models;
cross-entropy (PGD-AT, PGD-20), TRADES KL and CW-margin (CW-20) losses; a uniform start in the
eps-ball, TRADES' small Gaussian start or none. Images are in [0, 1] and stay there.

Gradients are taken with ``torch.autograd.grad`` with respect to the input alone: no parameter
``.grad`` is touched and no weight gradient is computed. The model's train/eval flags (module by
module) are restored afterwards; BatchNorm behaviour during the attack is chosen by ``bn_mode``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .utils import as_logits, check_pixel_values, inputs_prevalidated
from .validation import MAX_ATTACK_STEPS, NORMS, check_budget, check_choice, check_labels_in_range

__all__ = [
    "NORMS",
    "ATTACK_LOSSES",
    "RANDOM_STARTS",
    "BN_MODES",
    "attack_mode",
    "attack_loss",
    "pgd_attack",
    "random_init",
]

ATTACK_LOSSES = ("ce", "kl", "cw")
RANDOM_STARTS = ("uniform", "gaussian", "none")
#: ``eval``: BatchNorm uses running statistics (TRADES, the released code).
#: ``train``: batch statistics, running statistics frozen (the DDPM-data recipes).
#: ``train_update``: batch statistics, running statistics updated by every attack step.
BN_MODES = ("eval", "train", "train_update")

_FP16_LOSS_SCALE = 1024.0


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[nn.Module]:
    """Put ``model`` in the mode used to craft attacks; restore every module's flags on exit."""
    check_choice("bn_mode", bn_mode, BN_MODES)
    flags = [(module, module.training) for module in model.modules()]
    frozen = []
    try:
        if bn_mode == "eval":
            model.eval()
        else:
            model.train()
            if bn_mode == "train":
                for module in model.modules():
                    if isinstance(module, _BatchNorm) and module.track_running_stats:
                        # In train mode with track_running_stats=False, BatchNorm normalises with the
                        # batch statistics and leaves running_mean/var/num_batches_tracked untouched.
                        module.track_running_stats = False
                        frozen.append(module)
        yield model
    finally:
        for module in frozen:
            module.track_running_stats = True
        for module, training in flags:
            module.training = training


def attack_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss: str, target_probs: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-batch *sum* of the attack objective (to be maximised).

    ``ce``: cross-entropy. ``kl``: ``KL(p_nat || softmax(logits))`` (TRADES; ``target_probs`` = p_nat).
    ``cw``: the CW margin ``max_{i != y} z_i - z_y``.
    """
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="sum")
    if loss == "kl":
        if target_probs is None:
            raise ValueError("the 'kl' attack loss needs the natural-image probabilities (target_probs).")
        return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="sum")
    if loss == "cw":
        true = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
        return (other - true).sum()
    raise ValueError(f"loss must be one of {list(ATTACK_LOSSES)}; got {loss!r}.")


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _as_budget(value: Union[float, torch.Tensor], name: str, x: torch.Tensor) -> Union[float, torch.Tensor]:
    """A scalar budget, or a per-example one (shape (N,)) broadcast over the image dimensions."""
    if isinstance(value, torch.Tensor):
        if value.shape != (x.shape[0],):
            raise ValueError(f"a per-example {name} must have shape (N,) = ({x.shape[0]},); got {tuple(value.shape)}.")
        if not bool((value > 0).all()):
            raise ValueError(f"{name} must be > 0 for every example.")
        return value.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}.")
    return value


def _check_step_within_budget(step_size, eps) -> None:
    """A step larger than the budget only bounces between the ball's faces: almost always a unit mix-up."""
    if isinstance(step_size, torch.Tensor) or isinstance(eps, torch.Tensor):
        too_big = bool(torch.as_tensor(step_size > eps * (1 + 1e-6)).any())
    else:
        too_big = step_size > eps * (1 + 1e-6)
    if too_big:
        raise ValueError(
            f"step_size must not exceed eps (allowed: 0 < step_size <= eps; the paper uses eps/4); got step_size "
            f"{_describe(step_size)} > eps {_describe(eps)}."
        )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"up to {float(value.max()):.4g}"
    return f"{value:.4g}"


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps, norm: str) -> torch.Tensor:
    if norm == "Linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        factor = (eps / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        x_adv = x + delta * factor
    # Clamping to [0, 1] moves every coordinate towards x (which is in [0, 1]): it never leaves the ball.
    return x_adv.clamp(0.0, 1.0)


def _linf_box(x: torch.Tensor, eps) -> tuple:
    """Bounds of {z : |z - x|_inf <= eps} intersected with [0, 1] (x in [0, 1], so low <= high)."""
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


def random_init(
    shape: torch.Size,
    *,
    eps: Union[float, torch.Tensor],
    norm: str = "Linf",
    random_start: str = "uniform",
    init_std: float = 0.001,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The random starting perturbation of PGD (before projection) for a batch of ``shape``.

    ``uniform``: uniform in the Linf ball, or a uniform direction with a uniform radius in the L2 ball;
    ``gaussian``: ``init_std * N(0, I)`` (TRADES); ``none``: zeros.
    """
    check_choice("random_start", random_start, RANDOM_STARTS)
    kwargs = dict(generator=generator, device=device, dtype=dtype)
    if random_start == "none":
        return torch.zeros(shape, device=device, dtype=dtype)
    if random_start == "gaussian":
        return torch.randn(shape, **kwargs) * init_std
    if norm == "Linf":
        return (torch.rand(shape, **kwargs) * 2 - 1) * eps
    direction = torch.randn(shape, **kwargs)
    direction = direction / _per_example_norm(direction).clamp_min(1e-12)
    radius = torch.rand((shape[0],) + (1,) * (len(shape) - 1), **kwargs)
    return direction * radius * eps


def _fp16_autocast_active(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    except (RuntimeError, TypeError):  # pragma: no cover - device types without autocast
        return False


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Union[float, torch.Tensor],
    step_size: Union[float, torch.Tensor],
    steps: int,
    norm: str = "Linf",
    loss: str = "ce",
    random_start: str = "uniform",
    bn_mode: str = "eval",
    natural_logits: Optional[torch.Tensor] = None,
    init_std: float = 0.001,
    noise: Optional[torch.Tensor] = None,
    loss_scale: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Projected gradient ascent on ``loss`` within the ``norm`` ball of radius ``eps`` around ``x``.

    Args:
        model: maps images in [0, 1] to logits (a tensor, ``ModelOutput`` or tuple).
        x: clean images (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps, step_size, steps: the budget (pixel units), the step and the number of steps; ``eps`` and
            ``step_size`` may be per-example tensors of shape (N,) (class-wise budgets, e.g. CFA, FRL).
        norm: ``"Linf"`` (signed gradient steps) or ``"L2"`` (normalised gradient steps).
        loss: ``"ce"``, ``"kl"`` (TRADES; the target is ``softmax(natural_logits)``, computed once in
            attack mode when not given) or ``"cw"`` (margin).
        random_start: ``"uniform"`` in the ball, ``"gaussian"`` (``init_std * N(0, I)``, TRADES) or ``"none"``.
        bn_mode: ``"eval"``, ``"train"`` (batch statistics, running statistics frozen) or ``"train_update"``.
        loss_scale: multiplies the loss before differentiation so that fp16 input gradients do not
            underflow; defaults to 1024 under fp16 autocast and 1 otherwise (steps are scale-free).
        noise: the starting perturbation (overrides ``random_start``; see :func:`random_init`), e.g. a
            slice of noise drawn for a whole global batch so that attacks do not depend on how the
            batch is split across processes.
        generator: random generator for the start (on ``x``'s device), for reproducible attacks.
        validate: check ``x`` and ``y`` once up front.

    Returns:
        Detached adversarial images, within ``eps`` of ``x`` and in [0, 1]; the last iterate.
    """
    check_choice("norm", norm, NORMS)
    check_choice("loss", loss, ATTACK_LOSSES)
    check_choice("random_start", random_start, RANDOM_STARTS)
    check_choice("bn_mode", bn_mode, BN_MODES)
    check_budget(eps, norm, "eps")  # finite, > 0, and <= 1 for Linf on [0, 1] images
    eps = _as_budget(eps, "eps", x)
    step_size = _as_budget(step_size, "step_size", x)
    _check_step_within_budget(step_size, eps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps!r}.")
    if steps > MAX_ATTACK_STEPS:
        raise ValueError(f"steps must be at most {MAX_ATTACK_STEPS}; got {steps}.")
    if validate:
        check_pixel_values(x, name="x")
        if y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"y must be an integer tensor of shape ({x.shape[0]},); got {tuple(y.shape)} {y.dtype}.")
    x = x.detach()
    y = y.detach()
    if loss_scale is None:
        loss_scale = _FP16_LOSS_SCALE if _fp16_autocast_active(x.device.type) else 1.0

    with attack_mode(model, bn_mode), inputs_prevalidated():
        target_probs = None
        if loss == "kl":
            if natural_logits is None:
                with torch.no_grad():
                    natural_logits = as_logits(model(x))
            target_probs = F.softmax(natural_logits.detach().float(), dim=1)
        if noise is None:
            noise = random_init(
                x.shape, eps=eps, norm=norm, random_start=random_start, init_std=init_std,
                generator=generator, device=x.device, dtype=x.dtype,
            )
        elif noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x {tuple(x.shape)}; got {tuple(noise.shape)}.")
        if norm == "Linf":
            # The Linf ball intersected with [0, 1] is a box: its bounds are computed once, and each
            # projection is then one in-place clamp (equal, element by element, to _project's min/max/clamp).
            low, high = _linf_box(x, eps)
            project = lambda z: z.clamp_(low, high)  # noqa: E731
        else:
            project = lambda z: _project(z, x, eps, norm)  # noqa: E731
        x_adv = project(x + noise.to(device=x.device, dtype=x.dtype))
        for step in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = as_logits(model(x_adv))
                if validate and step == 0:
                    check_labels_in_range(y, logits.shape[-1], "y", allow_empty=True)
                objective = attack_loss(logits, y, loss, target_probs)
                if loss_scale != 1.0:
                    objective = objective * loss_scale
                (grad,) = torch.autograd.grad(objective, [x_adv])
            # A non-finite loss (overflowing logits, fp16) must not turn the images into NaN: such
            # gradient entries are treated as zero (no move along them this step).
            grad = torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
            # The graph is gone: update the iterate in place (the step, then the projection).
            x_adv = x_adv.detach()
            if norm == "Linf":
                direction = grad.sign_()
            else:
                direction = grad.div_(_per_example_norm(grad).clamp_min(1e-12))
            if isinstance(step_size, torch.Tensor):
                x_adv.addcmul_(step_size, direction)
            else:
                x_adv.add_(direction, alpha=step_size)
            x_adv = project(x_adv)
    return x_adv.detach()
