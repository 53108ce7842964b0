"""A small Fashion-MNIST classifier (trained for a few seconds) and models with broken gradients."""

import pytest
import torch
import torch.nn.functional as F

from hf_csr import create_robust_classifier
from hf_csr.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from tests.support import model_wrappers

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


@pytest.fixture(scope="session")
def eps():
    """Small enough that PGD breaks some, but not all, of the tiny model's correct predictions."""
    return EPS


@pytest.fixture(scope="session")
def wrappers():
    """The classifier behind other forwards: ``wrappers.Wrap(model, fn)``, ``wrappers.logits_of(model)``,
    ``wrappers.Rounding(model)`` (masked gradients) and ``wrappers.CountingModel(model, fail_after)``."""
    return model_wrappers
