"""Adversarial weight perturbation (AWP, Wu et al. 2020) without a proxy model.

The released AWP code copies the model into a proxy, takes one plain-SGD ascent step on the
adversarial loss, and perturbs each multi-dimensional weight by ``gamma * ||w|| * d / ||d||`` with
``d`` the proxy's weight change. For plain SGD, ``d`` is proportional to the loss gradient, so the
same perturbation is ``gamma * ||w|| * g / ||g||`` with ``g = dL/dw``: one forward/backward on the
model itself (BatchNorm running statistics frozen, as the proxy's are thrown away), no copy.
Under data parallelism the gradients are averaged across processes first (``reduce_fn``), so every
replica applies the same perturbation and the replicas stay identical.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

__all__ = ["perturbable_parameters", "awp_perturbation", "apply_perturbation"]

_EPS = 1e-20


def perturbable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The weights AWP perturbs: trainable ``*weight`` tensors with more than one dimension."""
    return [p for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1 and name.endswith("weight")]


def awp_perturbation(
    loss: torch.Tensor,
    params: List[nn.Parameter],
    gamma: float,
    reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-parameter perturbations ``gamma * ||w|| * g / ||g||`` that *increase* ``loss``.

    ``reduce_fn`` averages the flattened gradients across processes (one collective call).
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
    if reduce_fn is not None:
        flat = reduce_fn(torch.cat([g.reshape(-1).float() for g in grads]))
        out, start = [], 0
        for g in grads:
            out.append(flat[start : start + g.numel()].view_as(g).to(g.dtype))
            start += g.numel()
        grads = out
    perturbation = {}
    with torch.no_grad():
        for p, g in zip(params, grads):
            perturbation[p] = gamma * p.norm() / (g.norm() + _EPS) * g
    return perturbation


def apply_perturbation(perturbation: Dict[nn.Parameter, torch.Tensor], sign: float) -> None:
    """Add (``sign=+1``) or remove (``sign=-1``) a perturbation in place."""
    with torch.no_grad():
        for p, delta in perturbation.items():
            p.add_(delta, alpha=sign)
