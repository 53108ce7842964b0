"""Shared test helpers: a BatchNorm-free timm backbone and tiny Fashion-MNIST models and data."""

import torch
from timm.models import register_model
from torch import nn
from transformers import TrainerCallback

import hf_csr  # noqa: F401
from hf_csr.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from hf_csr.experiment import parse_args
from hf_csr.models import create_robust_classifier


class TinyConvNet(nn.Module):
    """Conv -> ReLU -> pool -> Linear, no BatchNorm (data-parallel and accumulation equivalences need
    a network whose output does not depend on how the batch is split)."""

    def __init__(self, num_classes=10, in_chans=1, width=8, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


@register_model
def test_tiny_convnet(pretrained=False, **kwargs):
    return TinyConvNet(**kwargs)


def fmnist_model(backbone="preact_resnet_tiny", **kwargs):
    if backbone == "preact_resnet_tiny":
        kwargs = {"width": 4, **kwargs}  # half the registered width: faster tests
    return create_robust_classifier(backbone, class_names=FASHION_MNIST_CLASSES, num_channels=1, image_size=28,
                                    mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, **kwargs)


def fmnist(split="train", limit=64, seed=0):
    return load_fashion_mnist(split, limit=limit, seed=seed)


class StopAt(TrainerCallback):
    """Stop training after optimizer step ``step`` (a run "killed" at a step boundary, in-process)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def parse_recipe(tmp, *flags, config=None):
    """The recipes' ``parse_args`` on ``flags`` (and a YAML ``config`` text), output under ``tmp``."""
    argv = ["--output_dir", str(tmp / "run"), *flags]
    if config is not None:
        path = tmp / "config.yaml"
        path.write_text(config)
        argv = ["--config", str(path), *argv]
    return parse_args(argv)
