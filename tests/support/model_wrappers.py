"""The same classifier behind other output types or forwards (evaluation tests)."""

import torch
from torch import nn


class Wrap(nn.Module):
    """``forward(x) = fn(model, x)``: the same classifier behind another output type or forward."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x):
        return self.fn(self.model, x)


def logits_of(model):
    """A plain module returning the logits tensor (what pyautoattack needs)."""
    return Wrap(model, lambda m, x: m(x).logits)


class Rounding(nn.Module):
    """Quantises its input before the classifier: logits are piecewise constant, input gradients zero."""

    def __init__(self, model, levels=16):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


class CountingModel(nn.Module):
    """Counts its forward calls; raises after ``fail_after`` of them (a simulated interruption)."""

    def __init__(self, model, fail_after=None):
        super().__init__()
        self.model, self.fail_after, self.calls = model, fail_after, 0

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated interruption")
        return self.model(x)
