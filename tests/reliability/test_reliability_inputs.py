"""Bad input, table-driven (RELIABILITY.md, item 3).

Every row is one distinct mistake a user can make through the public API, the recipes' arguments or
the ``hf-csr`` command. Each must fail *before* any long work (training, attacking, loading a model)
with an error that names the argument and the allowed values; the test asserts the message.
"""

import re

import numpy as np
import pytest
import torch
from torch import nn

from hf_csr import ConfusionEstimator, CSRTrainer, CSRTrainingArguments, csr_penalty, pgd_attack
from hf_csr.cli import main as cli_main
from hf_csr.data import TensorImageDataset, load_image_dataset
from hf_csr.evaluation import evaluate_robustness
from hf_csr.experiment import parse_args
from hf_csr.models import create_robust_classifier


# The tables below are built at import time, so their rows cannot take fixtures: this module builds its own
# tiny inputs (any valid model and images do: every row must be refused before they are used).
class toy_net(nn.Module):  # noqa: N801  (named like the suite's toy_net fixture)
    """A tiny conv net with BatchNorm on 1 x 8 x 8 images."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def toy_data(n=96, num_classes=3, seed=0):
    """Random 1 x 8 x 8 images in [0, 1] and labels 0, 1, ..., num_classes - 1, 0, 1, ..."""
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.arange(n) % num_classes


def parse_recipe(tmp, *flags, config=None):
    """The recipes' ``parse_args`` on ``flags`` (and a YAML ``config`` text), output under ``tmp``."""
    argv = ["--output_dir", str(tmp / "run"), *flags]
    if config is not None:
        (tmp / "config.yaml").write_text(config)
        argv = ["--config", str(tmp / "config.yaml"), *argv]
    return parse_args(argv)


def _x(n=6):
    return toy_data(n=n)[0]


def _y(n=6):
    return toy_data(n=n)[1]


def _attack(**overrides):
    settings = dict(eps=8 / 255, step_size=2 / 255, steps=1)
    settings.update(overrides)
    x = settings.pop("x", _x())
    y = settings.pop("y", _y())
    return pgd_attack(toy_net(), x, y, **settings)


def _penalty(logits=None, labels=None, **kwargs):
    logits = torch.randn(6, 3) if logits is None else logits
    labels = _y() if labels is None else labels
    return csr_penalty(logits, labels, torch.ones(3, 3), **kwargs)


def _args(tmp, **overrides):
    return CSRTrainingArguments(output_dir=str(tmp / "out"), use_cpu=True, **overrides)


def _dataset(images=None, labels=None, names=("a", "b", "c")):
    x, y = toy_data(n=12)
    images = (x * 255).to(torch.uint8) if images is None else images
    return TensorImageDataset(images, y if labels is None else labels, list(names), name="train_dataset")


def _trainer(tmp, dataset):
    model = create_robust_classifier("test_tiny_convnet", class_names=["a", "b", "c"], num_channels=1, image_size=8)
    return CSRTrainer(model=model, args=_args(tmp, max_steps=1), train_dataset=dataset)


def _npz(tmp, images, labels):
    path = tmp / "data.npz"
    np.savez(path, image=images, label=labels)
    return load_image_dataset(path)


def _evaluate_cli(tmp, *flags, model=None):
    # The model path does not exist: an error about it would mean the check came too late.
    argv = ["evaluate", "--model", model or str(tmp / "no-such-model"), "--dataset", "fashion_mnist",
            "--output-dir", str(tmp / "eval"), "--no-progress", *flags]
    return cli_main(argv)


def _not_a_dir(tmp):
    blocker = tmp / "a-file"
    blocker.write_text("x")
    return str(blocker / "out")


BAD_INPUTS = [
    # ---------------------------------------------------------------- public API: attacks
    ("pgd label out of range", lambda t: _attack(y=_y() + 3), r"the y.s labels lie in \[3, 5\] but the model has num_classes = 3"),
    ("pgd NaN pixels", lambda t: _attack(x=_x().index_fill(0, torch.tensor([0]), float("nan"))),
     r"x contains NaN or inf values; images must be finite and in \[0, 1\]"),
    ("pgd inf pixels", lambda t: _attack(x=_x().index_fill(0, torch.tensor([1]), float("inf"))),
     r"x contains NaN or inf"),
    ("pgd uint8 images", lambda t: _attack(x=(_x() * 255).to(torch.uint8)),
     r"x must be a floating-point tensor in \[0, 1\]; got dtype torch.uint8.*x.float\(\) / 255"),
    ("pgd images outside [0, 1]", lambda t: _attack(x=(_x() - 0.5) / 0.25),
     r"x must lie in \[0, 1\].*got values in"),
    ("pgd wrong shape", lambda t: _attack(x=_x()[:, 0]), r"x must have shape \(N, C, H, W\); got \(6, 8, 8\)"),
    ("pgd eps <= 0", lambda t: _attack(eps=0.0), r"eps must be a finite budget > 0 in pixel units .*; got 0.0"),
    ("pgd step size > eps", lambda t: _attack(eps=2 / 255, step_size=8 / 255),
     r"step_size must not exceed eps \(allowed: 0 < step_size <= eps"),
    ("pgd unknown norm", lambda t: _attack(norm="L1"), r"norm must be one of \['Linf', 'L2'\]; got 'L1'"),
    ("pgd unknown loss", lambda t: _attack(loss="hinge"), r"loss must be one of \['ce', 'kl', 'cw'\]"),
    ("pgd negative steps", lambda t: _attack(steps=-1), r"steps must be a non-negative integer; got -1"),
    ("pgd unknown bn_mode", lambda t: _attack(bn_mode="frozen"), r"bn_mode must be one of \['eval', 'train', 'train_update'\]"),
    # ---------------------------------------------------------------- public API: penalty and estimator
    ("penalty gamma < 0", lambda t: _penalty(gamma=-0.1), r"gamma must be >= 0"),
    ("penalty reference gamma >= 1", lambda t: _penalty(variant="reference", gamma=1.5),
     r"gamma must lie in \[0, 1\) for variant='reference'"),
    ("penalty unknown variant", lambda t: _penalty(variant="spectral"), r"variant must be one of \['paper', 'reference'\]"),
    ("penalty label out of range", lambda t: _penalty(labels=_y() + 1),
     r"labels lie in \[1, 3\] but the model has num_classes = 3"),
    ("penalty NaN logits", lambda t: _penalty(logits=torch.full((6, 3), float("nan"))), r"logits contain NaN or inf"),
    ("estimator momentum 1", lambda t: ConfusionEstimator(3, momentum=1.0), r"momentum .* must lie in \[0, 1\); got 1.0"),
    ("estimator unknown source", lambda t: ConfusionEstimator(3, source="online"),
     r"source must be one of \['epoch', 'ema', 'batch'\]; got 'online'"),
    ("estimator K=1", lambda t: ConfusionEstimator(1), r"num_classes must be an integer >= 2; got 1"),
    # ---------------------------------------------------------------- public API: models and data
    ("model wrong channels", lambda t: create_robust_classifier(
        "test_tiny_convnet", num_classes=3, num_channels=1, image_size=8)(torch.rand(2, 3, 8, 8)),
     r"pixel_values has 3 channels but the model expects num_channels = 1"),
    ("model unknown backbone", lambda t: create_robust_classifier("resnet_does_not_exist", num_classes=3),
     r"unknown backbone 'resnet_does_not_exist'.*preact_resnet18"),
    ("dataset image/label lengths", lambda t: TensorImageDataset(torch.zeros(5, 1, 8, 8), torch.zeros(4), ["a", "b"]),
     r"5 images but 4 labels; the two must have the same length"),
    ("npz mismatched lengths", lambda t: _npz(t, np.zeros((5, 8, 8), np.uint8), np.zeros(4, np.int64)),
     r"data.npz: 5 images but 4 labels"),
    ("npz float images", lambda t: _npz(t, np.zeros((4, 8, 8), np.float32), np.zeros(4, np.int64)),
     r"data.npz: 'image' must be uint8 \(N, H, W, C\) or \(N, H, W\); got float32"),
    ("empty dataset", lambda t: TensorImageDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0), ["a", "b"]),
     r"the dataset is empty: it has no examples"),
    ("evaluate eps <= 0", lambda t: evaluate_robustness(toy_net(), _x(), _y(), eps=-1.0),
     r"eps must be a finite budget > 0 in pixel units \(e.g. 8/255 for Linf, 0.5 for L2\)"),
    ("evaluate unknown attack", lambda t: evaluate_robustness(toy_net(), _x(), _y(), attacks="clean,fgsm"),
     r"fgsm"),
    ("evaluate batch_size 0", lambda t: evaluate_robustness(toy_net(), _x(), _y(), batch_size=0),
     r"batch_size must be a positive integer; got 0"),
    # ---------------------------------------------------------------- trainer (raised in the constructor)
    ("trainer label out of range", lambda t: _trainer(t, _dataset(labels=_y(12) + 2, names="abcde")),
     r"labels lie in \[2, 4\] but the model has num_classes = 3 \(labels must be in \[0, 3\)\)"),
    ("trainer class missing", lambda t: _trainer(t, _dataset(labels=_y(12) % 2)),
     r"train_dataset has no examples of class\(es\) \['c'\].*num_classes = 3"),
    ("trainer NaN pixels", lambda t: _trainer(t, _dataset(images=torch.full((12, 1, 8, 8), float("nan")))),
     r"train_dataset images contains NaN or inf values"),
    ("trainer images outside [0, 1]", lambda t: _trainer(t, _dataset(images=torch.full((12, 1, 8, 8), 2.0))),
     r"train_dataset images must lie in \[0, 1\]"),
    ("trainer unwritable output_dir", lambda t: CSRTrainer(
        model=create_robust_classifier("test_tiny_convnet", class_names=["a", "b", "c"], num_channels=1, image_size=8),
        args=CSRTrainingArguments(output_dir=_not_a_dir(t), use_cpu=True), train_dataset=_dataset()),
     r"output_dir '.*a-file/out' is not a writable directory"),
    # ---------------------------------------------------------------- training arguments (recipes' --flags)
    ("args csr_alpha < 0", lambda t: _args(t, csr_alpha=-0.1), r"csr_alpha must be >= 0; got -0.1"),
    ("args reference alpha > 1", lambda t: _args(t, csr_alpha=1.5), r"csr_alpha must lie in \[0, 1\] for csr_variant='reference'"),
    ("args csr_gamma out of range", lambda t: _args(t, csr_gamma=1.0), r"csr_gamma must lie in \[0, 1\) for csr_variant='reference'"),
    ("args attack_eps <= 0", lambda t: _args(t, attack_eps=0.0), r"attack_eps must be a finite budget > 0 in pixel units \(e.g. 8/255"),
    ("args step > eps", lambda t: _args(t, attack_eps="4/255", attack_step_size="8/255"),
     r"attack_step_size \(0.03137\) must not exceed attack_eps \(0.01569\)"),
    ("args unknown confusion source", lambda t: _args(t, csr_confusion_source="online"),
     r"csr_confusion_source must be one of \['epoch', 'ema', 'batch'\]"),
    ("args unknown bn mode", lambda t: _args(t, attack_bn_mode="frozen"), r"attack_bn_mode must be one of \['eval', 'train', 'train_update'\]"),
    ("args awp_gamma < 0", lambda t: _args(t, awp_gamma=-0.005), r"awp_gamma must be >= 0 \(0 disables AWP\)"),
    ("args ema momentum", lambda t: _args(t, csr_ema_momentum=1.0), r"csr_ema_momentum must lie in \[0, 1\)"),
    ("args eval attack", lambda t: _args(t, eval_attacks="clean,fgsm"), r"fgsm"),
    ("args eps fraction", lambda t: _args(t, attack_eps="8//255"), r"value must be a number or a fraction like '8/255'"),
    # ---------------------------------------------------------------- recipes: command line and --config YAML
    ("recipe unknown enum flag", lambda t: parse_recipe(t, "--base_loss", "mart"),
     r"--base_loss.*: invalid choice: 'mart' \(choose from 'pgd', 'trades'\)"),
    ("recipe alpha flag", lambda t: parse_recipe(t, "--csr_alpha", "-1"), r"csr_alpha must be >= 0"),
    ("recipe unknown config key", lambda t: parse_recipe(t, config="csr_alfa: 0.3\n"),
     r"unknown setting\(s\) \['csr_alfa'\].*fields of ExperimentArguments and CSRTrainingArguments"),
    ("recipe real_fraction", lambda t: parse_recipe(t, "--real_fraction", "1.5"), r"real_fraction must lie in \(0, 1\); got 1.5"),
    ("recipe backbone_kwargs JSON", lambda t: parse_recipe(t, "--backbone_kwargs", "{width: 8}"),
     r"backbone_kwargs must be a JSON object like"),
    # ---------------------------------------------------------------- the hf-csr command
    ("cli eps <= 0 before loading the model", lambda t: _evaluate_cli(t, "--eps", "0"),
     r"--eps must be a finite budget > 0 in pixel units"),
    ("cli eps not a number", lambda t: _evaluate_cli(t, "--eps", "eight"), r"--eps must be a number or a fraction like '8/255'"),
    ("cli Linf eps > 1", lambda t: _evaluate_cli(t, "--norm", "Linf", "--eps", "8"), r"--eps = 8 exceeds 1 for Linf"),
    ("cli limit 0", lambda t: _evaluate_cli(t, "--limit", "0"), r"--limit must be a positive integer; got 0"),
    ("cli unknown attack", lambda t: _evaluate_cli(t, "--attacks", "clean,fgsm"), r"fgsm"),
    ("cli unknown norm", lambda t: _evaluate_cli(t, "--norm", "L1"), r"--norm: invalid choice: 'L1' \(choose from 'Linf', 'L2'\)"),
    ("cli unwritable output dir", lambda t: cli_main(
        ["evaluate", "--model", str(t / "none"), "--dataset", "fashion_mnist", "--output-dir", _not_a_dir(t)]),
     r"--output_dir .* is not a writable directory"),
]


def test_the_table_is_large_and_distinct():
    assert len(BAD_INPUTS) >= 25
    assert len({name for name, _, _ in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("name, call, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_named(name, call, message, tmp_path, capsys):
    try:
        call(tmp_path)
    except SystemExit as exit_:  # argparse and the hf-csr command exit 2 with the message on stderr
        assert exit_.code == 2, name
        text = capsys.readouterr().err
    except (ValueError, FileNotFoundError) as error:
        text = str(error)
    else:
        pytest.fail(f"{name}: no error was raised")
    assert re.search(message, text, flags=re.S), f"{name}: {text!r} does not match {message!r}"
