"""A small Fashion-MNIST classifier (trained for a few seconds) and models with broken gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_csr import create_robust_classifier
from hf_csr.data import FASHION_MNIST_CLASSES, load_fashion_mnist

#: Small enough that PGD breaks some, but not all, of the tiny model's correct predictions.
EPS = 4 / 255


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """These models are tiny: one thread is as fast, and it does not spin-wait when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_fmnist_classifier():
    return create_robust_classifier("preact_resnet_tiny", class_names=FASHION_MNIST_CLASSES, width=4)


@pytest.fixture(scope="session")
def fmnist_model():
    """A PreAct-ResNet (width 4) trained clean for 3 epochs on 3000 Fashion-MNIST images (~70% accuracy)."""
    torch.manual_seed(0)
    model = tiny_fmnist_classifier()
    x, y = load_fashion_mnist("train", limit=3000, seed=1).tensors()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for idx in torch.randperm(len(y)).split(128):
            loss = F.cross_entropy(model(x[idx]).logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def fmnist_test():
    """40 real Fashion-MNIST test images, 4 per class."""
    return load_fashion_mnist("test", limit=40, seed=0)


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
