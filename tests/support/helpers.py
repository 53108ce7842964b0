"""Test support code: tiny models and data, trainer arguments, DDP workers' launcher.

Test modules never import this module: ``tests/conftest.py`` hands each of these to the tests as a fixture
of the same name (``toy_net``, ``toy_data``, ``fmnist``, ``fmnist_model``, ``make_args``, ...). Only the
subprocess workers next to it (``tests/support/*_worker.py``) import it directly, since they run outside pytest.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from timm.models import register_model
from torch import nn
from transformers import TrainerCallback

import hf_csr  # noqa: F401
from hf_csr.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from hf_csr.models import create_robust_classifier

#: The repository root and this folder (where the subprocess workers live).
REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent


class ToyNet(nn.Module):
    """A tiny conv net with BatchNorm on 1 x 8 x 8 images."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.avg_pool2d(x, 2)
        return self.head(x.flatten(1))


def toy_data(n=96, num_classes=3, seed=0):
    """Class c lights up the c-th horizontal band of an 8 x 8 image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.6
    for c in range(num_classes):
        rows = slice(c * 8 // num_classes, (c + 1) * 8 // num_classes)
        x[y == c, :, rows, :] += 0.25
    return x.clamp(0, 1), y


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
    from hf_csr.experiment import parse_args

    return parse_args(argv)


def make_args(tmp_path, **overrides):
    """Small CPU :class:`CSRTrainingArguments` (4 steps, 2 attack steps, checkpoints every 2 steps)."""
    from hf_csr import CSRTrainingArguments

    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=0.05, attack_steps=2, logging_steps=2, save_steps=2, use_cpu=True, disable_tqdm=True, seed=0,
    )
    if overrides.get("fairness_method", "csr") == "csr":
        settings["csr_confusion_source"] = "ema"
    settings.update(overrides)
    return CSRTrainingArguments(**settings)


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k].double(), b[k].double(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ddp_workers(tmp_path, processes, batch, extra, worker="ddp_worker.py", timeout=300):
    """``torchrun`` ``tests/support/<worker>`` on ``processes`` CPU processes; returns the saved weights."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"weights-{processes}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(SUPPORT / worker), "--out", str(out), "--per-device-batch", str(batch), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)
