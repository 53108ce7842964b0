"""Reliability, round 2 (RELIABILITY.md, items 7-14): data layout, settings, files, failing before the work,
honest resume, the CLI boundary, the divergence guard and SIGTERM.

``ROUND2`` is a table of bad inputs and faults, each one distinct mistake; every row asserts a named error
(a regular expression over the message: it names the argument or file and the problem) raised *before* the
long work -- in a constructor, in argument parsing, in a loader, before the first attack step or before a
resume loads anything. The tests below the table assert correct behaviour where the right answer is not an
error (a stratified subset of the requested size, a resume that warns, a run that stops and keeps its last
good checkpoint, a SIGTERM that saves and resumes to identical weights).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_csr import CSRTrainer, CSRTrainingArguments, pgd_attack
from hf_csr.cli import main as cli_main
from hf_csr.data import TensorImageDataset, load_image_dataset
from hf_csr.evaluation import evaluate_robustness
from hf_csr.experiment import parse_args
from hf_csr.experiment import main as recipe_main
from hf_csr.metrics.classwise_accuracy.classwise_accuracy import classwise_accuracy
from hf_csr.metrics.robust_confusion.robust_confusion import robust_confusion
from hf_csr.models import create_robust_classifier
from hf_csr.safety import TrainingDivergedError, TrainingInterrupted
from hf_csr.trainer import CSR_STATE_NAME


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


REPO = Path(__file__).resolve().parents[2]
NAMES = ["a", "b", "c"]


# ----------------------------------------------------------------------------- builders
def tiny_model(image_size=8, channels=1, names=NAMES, **kwargs):
    torch.manual_seed(0)
    return create_robust_classifier("test_tiny_convnet", class_names=list(names), num_channels=channels,
                                    image_size=image_size, **kwargs)


def toy_dataset(n=12, size=8, channels=1, labels=None, name="train_dataset", names=NAMES):
    x, y = toy_data(n=n)
    if size != 8 or channels != 1:
        x = torch.nn.functional.interpolate(x, size=(size, size)).repeat(1, channels, 1, 1)
    return TensorImageDataset((x * 255).to(torch.uint8), y if labels is None else labels, list(names), name=name)


def args(tmp, **overrides):
    settings = dict(output_dir=str(tmp / "out"), use_cpu=True, max_steps=2, per_device_train_batch_size=6,
                    per_device_eval_batch_size=12, attack_steps=1, learning_rate=0.05, disable_tqdm=True,
                    save_steps=1, logging_steps=1, eval_attacks="clean", report_to="none", seed=0)
    settings.update(overrides)
    return CSRTrainingArguments(**settings)


def trainer(tmp, model=None, train=None, eval_dataset=None, callbacks=None, **overrides):
    return CSRTrainer(model=model if model is not None else tiny_model(), args=args(tmp, **overrides),
                      train_dataset=train if train is not None else toy_dataset(), eval_dataset=eval_dataset,
                      callbacks=callbacks)


def npz(tmp, images, labels, name="data.npz"):
    path = tmp / name
    np.savez(path, image=images, label=labels)
    return path


def saved_model(tmp, nan=False, threat=None):
    model = tiny_model(threat_model=threat)
    if nan:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    directory = tmp / "model"
    model.save_pretrained(directory)
    return directory


def evaluate_cli(tmp, *flags, model=None):
    argv = ["evaluate", "--model", str(model or tmp / "no-such-model"), "--dataset", "fashion_mnist",
            "--output-dir", str(tmp / "eval"), "--no-progress", "--limit", "8", *flags]
    return cli_main(argv)


# ----------------------------------------------------------------------------- checkpoints to break
@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    """A 2-step run with a checkpoint per step (tiny conv net, 12 images): copied and damaged by the tests."""
    tmp = tmp_path_factory.mktemp("run")
    trainer(tmp).train()
    return tmp / "out"


def damaged(tmp, run, edit):
    out = tmp / "out"
    shutil.copytree(run, out)
    edit(out / "checkpoint-1")
    return out / "checkpoint-1"


def resume(tmp, checkpoint, **overrides):
    """Resume from ``checkpoint``; the tests' trainers must fail before the first optimizer step."""
    steps = []

    class NoStep(TrainerCallback):
        def on_step_begin(self, *a, **k):
            steps.append(1)
            raise AssertionError("a training step ran before the checkpoint was checked")

    t = trainer(tmp, callbacks=[NoStep()], **overrides)
    t.train(resume_from_checkpoint=str(checkpoint))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_csr_state(state):
    return lambda ckpt: torch.save(state, ckpt / CSR_STATE_NAME)


def broken(name, how):
    return lambda ckpt: how(ckpt / name)


def _hf_two_size_dataset(tmp):
    import datasets
    from PIL import Image

    def split(size, n=9):
        images = [Image.fromarray(np.full((size, size), 10 * i, np.uint8)) for i in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "label": datasets.ClassLabel(names=NAMES)}))

    path = tmp / "hfdata"
    datasets.DatasetDict({"train": split(8), "test": split(10)}).save_to_disk(str(path))
    return path


def _recipe_run(tmp, *flags):
    argv = ["--model", "test_tiny_convnet", "--output_dir", str(tmp / "run"), "--use_cpu", "--max_steps", "1",
            "--per_device_train_batch_size", "6", "--attack_steps", "1", "--disable_tqdm", "true", *flags]
    return recipe_main(argv=argv)


def _nan_model():
    model = toy_net()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    return model


# ----------------------------------------------------------------------------- the table
# (class, name, call, message); each call must raise (or exit with) the named error.
ROUND2 = [
    # ------------------------------------------------------------------ 2. data layout
    ("2 data", "npz channels-first grayscale", lambda t: load_image_dataset(
        npz(t, np.zeros((4, 1, 28, 28), np.uint8), np.arange(4) % 2)),
     r"data.npz: 'image': images must be channels-last \(N, H, W, C\).*looks channels-first.*np.transpose"),
    ("2 data", "npz channels-first RGB", lambda t: load_image_dataset(
        npz(t, np.zeros((4, 3, 32, 32), np.uint8), np.arange(4) % 2)), r"looks channels-first \(N, C, H, W\) = \(4, 3, 32, 32\)"),
    ("2 data", "recipe on a channels-first npz", lambda t: _recipe_run(
        t, "--dataset", str(npz(t, np.zeros((6, 1, 8, 8), np.uint8), np.arange(6) % 3))),
     r"channels-last"),
    ("2 data", "npz fractional float labels", lambda t: load_image_dataset(
        npz(t, np.zeros((4, 8, 8), np.uint8), np.array([0.0, 1.5, 1.0, 0.2]))),
     r"'label' must hold integer class indices; got dtype float64.*not truncated"),
    ("2 data", "npz integral float labels", lambda t: load_image_dataset(
        npz(t, np.zeros((4, 8, 8), np.uint8), np.array([0.0, 1.0, 1.0, 0.0], np.float32))),
     r"must hold integer class indices; got dtype float32"),
    ("2 data", "in-memory fractional labels", lambda t: TensorImageDataset(
        torch.zeros(3, 1, 8, 8), torch.tensor([0.0, 1.7, 1.0]), NAMES), r"labels must be integer class indices.*1.7.*never truncated"),
    ("2 data", "train images smaller than the model", lambda t: trainer(t, model=tiny_model(image_size=12)),
     r"train_dataset has 8x8 images but the model was built for image_size = 12"),
    ("2 data", "eval images of another size", lambda t: trainer(t, eval_dataset=toy_dataset(size=10, name="eval")),
     r"eval_dataset has 10x10 images but the model was built for image_size = 8"),
    ("2 data", "RGB data for a grayscale model", lambda t: trainer(t, train=toy_dataset(channels=3)),
     r"train_dataset has 3-channel images but the model expects num_channels = 1"),
    ("2 data", "recipe: train and eval splits of different sizes", lambda t: _recipe_run(
        t, "--dataset", str(_hf_two_size_dataset(t))), r"'train' images .* \(1, 8, 8\) but the 'test' images are \(1, 10, 10\)"),
    # ------------------------------------------------------------------ 3. settings
    ("3 settings", "NaN learning rate", lambda t: args(t, learning_rate=float("nan")), r"learning_rate must be a finite number; got nan"),
    ("3 settings", "inf learning rate", lambda t: args(t, learning_rate=float("inf")), r"learning_rate must be a finite number; got inf"),
    ("3 settings", "negative learning rate", lambda t: args(t, learning_rate=-0.1), r"learning_rate must be >= 0; got -0.1"),
    ("3 settings", "NaN weight decay", lambda t: args(t, weight_decay=float("nan")), r"weight_decay must be a finite number"),
    ("3 settings", "negative weight decay", lambda t: args(t, weight_decay=-5e-4), r"weight_decay must be >= 0"),
    ("3 settings", "NaN max_grad_norm", lambda t: args(t, max_grad_norm=float("nan")), r"max_grad_norm must be a finite number"),
    ("3 settings", "seed -1 in the arguments", lambda t: args(t, seed=-1), r"seed must be an integer in \[0, 2\*\*32 - 1\]; got -1"),
    ("3 settings", "unbounded max_steps", lambda t: args(t, max_steps=10**15), r"max_steps must be -1 .* below 2\*\*40"),
    ("3 settings", "unbounded attack_steps", lambda t: args(t, attack_steps=10**9), r"attack_steps must be an integer in \[1, 10000\]"),
    ("3 settings", "unbounded crop padding", lambda t: args(t, crop_padding=10**6), r"crop_padding must be an integer in \[0, 256\]"),
    ("3 settings", "unbounded eval PGD steps", lambda t: args(t, eval_attacks="clean,pgd99999999"),
     r"eval_attacks: pgd99999999 has 99999999 steps, above 10000"),
    ("3 settings", "Linf attack_eps inf", lambda t: args(t, attack_eps=float("inf")), r"attack_eps must be a finite budget > 0"),
    ("3 settings", "library pgd Linf eps 2", lambda t: pgd_attack(toy_net(), *toy_data(n=4), eps=2.0, step_size=0.5, steps=1),
     r"eps = 2 exceeds 1 for Linf"),
    ("3 settings", "library pgd eps inf", lambda t: pgd_attack(toy_net(), *toy_data(n=4), eps=float("inf"), step_size=0.1, steps=1, norm="L2"),
     r"eps must be a finite budget > 0"),
    ("3 settings", "library pgd unbounded steps", lambda t: pgd_attack(toy_net(), *toy_data(n=4), eps=0.03, step_size=0.01, steps=10**8),
     r"steps must be at most 10000"),
    ("3 settings", "library per-example Linf eps > 1", lambda t: pgd_attack(
        toy_net(), *toy_data(n=4), eps=torch.tensor([0.1, 0.1, 3.0, 0.1]), step_size=0.01, steps=1),
     r"eps reaches 3 , above 1 for Linf|eps reaches 3, above 1 for Linf"),
    ("3 settings", "evaluate_robustness Linf eps 8", lambda t: evaluate_robustness(toy_net(), *toy_data(n=4), eps=8.0, attacks="clean"),
     r"eps = 8 exceeds 1 for Linf"),
    ("3 settings", "model threat_model Linf eps 8", lambda t: tiny_model(threat_model={"norm": "Linf", "eps": 8}),
     r"threat_model\['eps'\] = 8 exceeds 1 for Linf"),
    ("3 settings", "convert --threat-model Linf:8", lambda t: cli_main(
        ["convert", str(t / "none.pt"), str(t / "out"), "--threat-model", "Linf:8"]), r"--threat_model eps = 8 exceeds 1 for Linf"),
    ("3 settings", "evaluate --eps 8 without --norm", lambda t: evaluate_cli(t, "--eps", "8", model=saved_model(t)),
     r"--eps = 8 exceeds 1 for Linf"),
    ("3 settings", "YAML list for a float", lambda t: parse_recipe(t, config="learning_rate: [0.1, 0.01]\n"),
     r"learning_rate in .*config.yaml must be of type float or int; got \[0.1, 0.01\] \(list\)"),
    ("3 settings", "YAML float for an integer", lambda t: parse_recipe(t, config="max_steps: 1.5\n"),
     r"max_steps in .*config.yaml must be of type int; got 1.5 \(float\)"),
    ("3 settings", "YAML boolean for an integer", lambda t: parse_recipe(t, config="attack_steps: yes\n"),
     r"attack_steps in .*config.yaml must be of type int; got True \(bool\)"),
    ("3 settings", "YAML mapping for a text setting", lambda t: parse_recipe(t, config="eval_attacks: {clean: 1}\n"),
     r"eval_attacks in .*config.yaml must be of type str"),
    ("3 settings", "YAML NaN learning rate", lambda t: parse_recipe(t, config="learning_rate: .nan\n"), r"learning_rate must be a finite number"),
    # ------------------------------------------------------------------ 4. files and memory bounds
    ("4 files", "npz with one huge label", lambda t: load_image_dataset(
        npz(t, np.zeros((3, 8, 8), np.uint8), np.array([0, 1, 10**12]))), r"'label' must lie in \[0, 100000\).*\[0, 1000000000000\]"),
    ("4 files", "npz negative label", lambda t: load_image_dataset(
        npz(t, np.zeros((3, 8, 8), np.uint8), np.array([0, -1, 1]))), r"'label' must lie in \[0, 100000\).*\[-1, 1\]"),
    ("4 files", "npz label beyond class_names", lambda t: load_image_dataset(
        npz(t, np.zeros((3, 8, 8), np.uint8), np.array([0, 1, 5])), class_names=NAMES), r"must lie in \[0, 3\) \(num_classes = 3\)"),
    ("4 files", "metric with a huge label", lambda t: classwise_accuracy([0, 10**12], [0, 1]),
     r"largest class index \+ 1 is 1000000000001, above 100000"),
    ("4 files", "confusion metric with a huge class count", lambda t: robust_confusion([0, 1], [1, 0], num_classes=10**6),
     r"num_classes is 1000000, above 10000"),
    ("4 files", "csr_state.pt is a list", lambda t: resume(t, damaged(t, t.checkpoint, write_csr_state([1, 2, 3]))),
     r"csr_state.pt is not a CSRTrainer state: expected a dict with a 'fairness' dict .* got list"),
    ("4 files", "csr_state.pt with wrong shapes", lambda t: resume(t, damaged(t, t.checkpoint, write_csr_state(
        {"confusion": {"counts": torch.zeros(2), "class_counts": torch.zeros(5)}}))),
     r"cannot resume from .*csr_state.pt: confusion-estimator state has shapes \(2,\) / \(5,\); expected \(3, 3\)"),
    ("4 files", "csr_state.pt without counts", lambda t: resume(t, damaged(t, t.checkpoint, write_csr_state({"confusion": {}}))),
     r"csr_state.pt is malformed \(KeyError: 'counts'\)"),
    ("4 files", "truncated trainer_state.json", lambda t: resume(t, damaged(t, t.checkpoint, broken("trainer_state.json", truncate))),
     r"cannot read .*checkpoint-1/trainer_state.json: .*truncated or corrupted"),
    ("4 files", "trainer_state.json without global_step", lambda t: resume(t, damaged(
        t, t.checkpoint, broken("trainer_state.json", lambda p: p.write_text("{}")))),
     r"trainer_state.json: it holds no integer global_step"),
    ("4 files", "truncated optimizer.pt", lambda t: resume(t, damaged(t, t.checkpoint, broken("optimizer.pt", truncate))),
     r"cannot load .*checkpoint-1/optimizer.pt: torch.load\(weights_only=True\) rejected it"),
    ("4 files", "truncated scheduler.pt", lambda t: resume(t, damaged(t, t.checkpoint, broken("scheduler.pt", truncate))),
     r"cannot load .*checkpoint-1/scheduler.pt"),
    ("4 files", "truncated checkpoint model.safetensors", lambda t: resume(
        t, damaged(t, t.checkpoint, broken("model.safetensors", truncate))),
     r"cannot load .*checkpoint-1/model.safetensors: the file is truncated or corrupted"),
    # ------------------------------------------------------------------ 5. fail before the work
    ("5 before", "AutoAttack evaluation with 3 classes", lambda t: trainer(t, eval_attacks="clean,autoattack"),
     r"eval_attacks: AutoAttack's apgd-t needs at least 4 classes and the model has 3"),
    ("5 before", "APGD-DLR with 2 classes", lambda t: trainer(
        t, model=tiny_model(names=["a", "b"]), train=toy_dataset(labels=torch.arange(12) % 2, names=["a", "b"]),
        eval_attacks="autoattack:apgd-dlr"), r"apgd-dlr needs at least 3 classes and the model has 2"),
    ("5 before", "recipe final AutoAttack with 3 classes", lambda t: _recipe_run(
        t, "--dataset", str(npz(t, np.zeros((6, 8, 8), np.uint8), np.arange(6) % 3)), "--final_eval_attacks", "clean,autoattack"),
     r"final_eval_attacks: AutoAttack's apgd-t needs at least 4 classes"),
    ("5 before", "load_best_model_at_end with eval_loss", lambda t: trainer(
        t, load_best_model_at_end=True, eval_strategy="steps", eval_steps=1, eval_dataset=toy_dataset(name="e")),
     r"metric_for_best_model .* 'loss' \(eval_loss\) never is .*eval_clean_worst_class_accuracy"),
    ("5 before", "load_best_model_at_end with an attack not evaluated", lambda t: trainer(
        t, load_best_model_at_end=True, eval_strategy="steps", eval_steps=1, eval_dataset=toy_dataset(name="e"),
        metric_for_best_model="pgd20_worst_class_accuracy", greater_is_better=True), r"'pgd20_worst_class_accuracy'.*never is"),
    ("5 before", "malformed card.json in output_dir", lambda t: (
        (t / "out").mkdir(), (t / "out" / "card.json").write_text('{"training": '), trainer(t)),
     r"out/card.json' is not valid JSON .*truncated or corrupted: delete or regenerate it"),
    ("5 before", "a model with NaN weights to train", lambda t: trainer(t, model=tiny_model().apply(
        lambda m: [p.data.fill_(float("nan")) for p in m.parameters(recurse=False)])),
     r"the model to train has non-finite \(NaN or inf\) weights"),
    # ------------------------------------------------------------------ 6. resume
    ("6 resume", "changed fairness method", lambda t: resume(t, t.checkpoint_copy(), fairness_method="none"),
     r"fairness_method changed: .* trained with 'csr', this run has 'none'"),
    ("6 resume", "changed csr_gamma", lambda t: resume(t, t.checkpoint_copy(), csr_gamma=0.5),
     r"csr_gamma changed: .* trained with 0, this run has 0.5"),
    # ------------------------------------------------------------------ 7. CLI boundary
    ("7 cli", "evaluate --seed -1", lambda t: evaluate_cli(t, "--seed", "-1"), r"--seed must be an integer in \[0, 2\*\*32 - 1\]; got -1"),
    ("7 cli", "evaluate --device with no such device", lambda t: evaluate_cli(t, "--device", "cuda:99"),
     r"--device 'cuda:99': (CUDA is not available|this machine has)"),
    ("7 cli", "evaluate --device nonsense", lambda t: evaluate_cli(t, "--device", "gpu0"), r"--device 'gpu0' is not a device"),
    ("7 cli", "evaluate an unreachable dataset offline", lambda t: cli_main(
        ["evaluate", "--model", str(saved_model(t)), "--dataset", "nobody/no-such-dataset", "--output-dir", str(t / "e")]),
     r"cannot load the dataset 'nobody/no-such-dataset'.*HF_HUB_OFFLINE"),
    ("7 cli", "recipe --seed -1", lambda t: _recipe_run(t, "--seed", "-1", "--dataset", "fashion_mnist"),
     r"error: seed must be an integer in \[0, 2\*\*32 - 1\]"),
    ("7 cli", "recipe with an unreachable dataset offline", lambda t: _recipe_run(t, "--dataset", "nobody/no-such-dataset"),
     r"error: cannot load the dataset 'nobody/no-such-dataset'"),
    # ------------------------------------------------------------------ divergence: non-finite models
    ("3 divergence", "evaluate_robustness on a NaN model", lambda t: evaluate_robustness(_nan_model(), *toy_data(n=4), attacks="clean"),
     r"model has non-finite \(NaN or inf\) weights in 1 tensor\(s\): head.weight"),
    ("3 divergence", "hf-csr evaluate on a NaN model", lambda t: evaluate_cli(t, model=saved_model(t, nan=True)),
     r"hf-csr evaluate: error: model has non-finite \(NaN or inf\) weights"),
]


def test_the_round2_table_is_large_and_distinct():
    assert len(ROUND2) >= 40
    assert len({name for _, name, _, _ in ROUND2}) == len(ROUND2)


class _Tmp(type(Path())):
    """tmp_path with the module's checkpoint run attached (for the resume rows)."""


@pytest.mark.parametrize("cls, name, call, message", ROUND2, ids=[row[1] for row in ROUND2])
def test_round2_bad_input_is_named_before_the_work(cls, name, call, message, tmp_path, capsys, checkpoint_run, monkeypatch):
    tmp = _Tmp(tmp_path)
    tmp.checkpoint = checkpoint_run
    tmp.checkpoint_copy = lambda: damaged(tmp, checkpoint_run, lambda ckpt: None)
    if "cuda:99" in name and torch.cuda.device_count() > 99:  # pragma: no cover
        pytest.skip("a machine with 100 GPUs")
    try:
        result = call(tmp)
    except SystemExit as exit_:  # argparse and the hf-csr command exit non-zero with the message on stderr
        assert exit_.code not in (0, None), name
        text = capsys.readouterr().err
    except (ValueError, FileNotFoundError) as error:
        text = str(error)
    else:
        if isinstance(result, int) and result != 0:  # the recipes return their exit status
            text = capsys.readouterr().err
        else:
            pytest.fail(f"{name}: no error was raised")
    assert "Traceback" not in text
    assert re.search(message, text, flags=re.S), f"{name}: {text!r} does not match {message!r}"


# ----------------------------------------------------------------------------- 2. eval_max_examples
def test_eval_max_examples_on_an_imbalanced_set_keeps_the_requested_size(tmp_path):
    """Class counts 30 / 2 / 30: the subset has the 30 examples asked for (the rare class whole), not 3 x 2."""
    labels = torch.tensor([0] * 30 + [1] * 2 + [2] * 30)
    eval_set = toy_dataset(n=62, labels=labels, name="imbalanced")
    t = trainer(tmp_path, eval_dataset=eval_set, eval_max_examples=30)
    metrics = t.evaluate()
    assert t.last_evaluation.num_examples == 30
    counts = t.last_evaluation.attacks["clean"].metrics["class_counts"]
    assert counts[1] == 2 and sum(counts) == 30 and abs(counts[0] - counts[2]) <= 1
    assert "eval_clean_accuracy" in metrics


# ----------------------------------------------------------------------------- 5. a metric that is logged is accepted
def test_load_best_model_at_end_with_a_logged_metric_is_accepted(tmp_path):
    t = trainer(tmp_path, load_best_model_at_end=True, eval_strategy="steps", eval_steps=1, save_steps=1,
                eval_dataset=toy_dataset(name="e"), metric_for_best_model="clean_worst_class_accuracy",
                greater_is_better=True)
    t.train()
    assert t.state.best_metric is not None and t.state.best_model_checkpoint.endswith(("checkpoint-1", "checkpoint-2"))


# ----------------------------------------------------------------------------- 6. honest resume
def test_resume_with_a_changed_ema_momentum_warns_and_uses_the_new_value(tmp_path, checkpoint_run, caplog):
    checkpoint = damaged(tmp_path, checkpoint_run, lambda ckpt: None)
    t = trainer(tmp_path, csr_ema_momentum=0.5, max_steps=2)
    with caplog.at_level("WARNING", logger="hf_csr.safety"):
        t._load_from_checkpoint(str(checkpoint))
    assert "csr_ema_momentum: 0.99 in the checkpoint, 0.5 now" in caplog.text
    assert "NOT an exact continuation" in caplog.text
    assert t.fairness.confusion.momentum == 0.5  # not silently replaced by the checkpoint's 0.99
    assert t.resume_warnings == ["csr_ema_momentum changed"]


def test_resume_with_the_same_settings_is_silent(tmp_path, checkpoint_run, caplog):
    checkpoint = damaged(tmp_path, checkpoint_run, lambda ckpt: None)
    t = trainer(tmp_path)
    with caplog.at_level("WARNING"):
        t._load_from_checkpoint(str(checkpoint))
    assert "exact continuation" not in caplog.text and not getattr(t, "resume_warnings", [])


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt"])
def test_resume_without_optimizer_or_scheduler_state_warns(tmp_path, checkpoint_run, caplog, missing):
    checkpoint = damaged(tmp_path, checkpoint_run, lambda ckpt: (ckpt / missing).unlink())
    t = trainer(tmp_path, max_steps=2)
    with caplog.at_level("WARNING", logger="hf_csr.safety"):
        t.train(resume_from_checkpoint=str(checkpoint))
    assert f"without {missing}" in caplog.text and "NOT an exact continuation" in caplog.text
    assert t.resume_warnings == [f"missing {missing}"]


def test_old_checkpoint_without_settings_reports_a_changed_fairness_method_as_such(tmp_path, checkpoint_run):
    """A checkpoint from before the settings record: the method is read from the state, not mistaken for a
    'source' mismatch of the confusion estimator."""
    def strip(ckpt):
        state = torch.load(ckpt / CSR_STATE_NAME, weights_only=True)
        del state["settings"]
        torch.save(state, ckpt / CSR_STATE_NAME)

    checkpoint = damaged(tmp_path, checkpoint_run, strip)
    with pytest.raises(ValueError, match=r"^fairness_method changed: .* trained with 'csr', this run has 'none'") as info:
        resume(tmp_path, checkpoint, fairness_method="none")
    assert "source" not in str(info.value)


# ----------------------------------------------------------------------------- 7. the CLI boundary
def test_a_full_disk_gives_one_line_and_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    """ENOSPC for real: the temporary file of the atomic write is /dev/full."""
    directory = saved_model(tmp_path)
    assert cli_main(["card", str(directory)]) == 0
    before = (directory / "README.md").read_bytes()
    import hf_csr.utils as utils

    original = tempfile.mkstemp

    def full_disk(prefix="", suffix="", dir=None):
        fd, name = original(prefix=prefix, suffix=suffix, dir=dir)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(utils.tempfile, "mkstemp", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["card", str(directory), "--repo-id", "me/other"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert re.fullmatch(r"hf-csr card: error: No space left on device.*free some space.*--log_level debug for the traceback\)\n", err)
    assert (directory / "README.md").read_bytes() == before
    assert not list(directory.glob(".README.md.*"))


def test_an_unexpected_exception_is_one_line_with_a_debug_hint(tmp_path, capsys, monkeypatch, caplog):
    def boom(args):
        raise RuntimeError("something deep went wrong\nsecond line")

    monkeypatch.setattr("hf_csr.hub.commands._card", boom)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["card", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "unexpected RuntimeError: something deep went wrong (rerun with --log_level debug for the traceback)" in err
    with caplog.at_level("ERROR", logger="hf_csr.cli"), pytest.raises(SystemExit):
        cli_main(["--log-level", "DEBUG", "card", str(tmp_path)])
    assert "Traceback (most recent call last)" in caplog.text and "something deep went wrong" in caplog.text


@pytest.mark.subprocess
@pytest.mark.slow
def test_cli_errors_in_a_real_process_have_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "hf_csr.cli", "evaluate", "--model", str(tmp_path / "m"), "--dataset",
                             "fashion_mnist", "--output-dir", str(tmp_path / "e"), "--seed", "-1"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("hf-csr evaluate: error: --seed must be")


# ----------------------------------------------------------------------------- divergence guard
class NaNLossAt:
    """CSRTrainer whose loss becomes NaN at optimizer step ``step`` (0-based global_step before the step)."""

    def __init__(self, step):
        self.step = step

    def __call__(self, base):
        step = self.step

        class Diverging(base):
            def compute_loss(self, model, inputs, *a, **k):
                loss = super().compute_loss(model, inputs, *a, **k)
                if model.training and self.state.global_step == step:
                    loss = loss * float("nan")
                return loss

        return Diverging


def test_a_nan_loss_mid_training_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    Diverging = NaNLossAt(2)(CSRTrainer)
    t = Diverging(model=tiny_model(), args=args(tmp_path, max_steps=5), train_dataset=toy_dataset())
    with pytest.raises(TrainingDivergedError, match=r"diverged at optimizer step 3: the gradients .* NaN or inf.*"
                                                    r"checkpoint-2, was written before it and is intact"):
        t.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    # stopped before the optimizer step: the weights in memory are still those of checkpoint-2
    for name, value in t.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    # the previous checkpoint still loads and training continues from it
    resumed = trainer(tmp_path, max_steps=3)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 3 and all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_non_finite_weights_after_a_step_stop_the_run_before_any_save(tmp_path):
    """A huge learning rate makes the weights overflow to inf: caught after the step, before its checkpoint."""
    t = trainer(tmp_path, learning_rate=1e38, max_grad_norm=0.0, max_steps=4, optim="sgd", optim_args="momentum=0.0")
    with pytest.raises(TrainingDivergedError, match=r"diverged at optimizer step \d: (the weights .* became NaN or inf|the gradients)"):
        t.train()
    for checkpoint in (tmp_path / "out").glob("checkpoint-*"):
        assert all(torch.isfinite(v).all() for v in load_file(checkpoint / "model.safetensors").values())


# ----------------------------------------------------------------------------- 8. SIGTERM
def test_sigterm_in_process_saves_a_checkpoint_and_raises(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("test handler"))  # never the default kill
    try:
        class TermAt2(TrainerCallback):
            def on_step_end(self, a, state, control, **k):
                if state.global_step == 2:
                    os.kill(os.getpid(), signal.SIGTERM)

        t = trainer(tmp_path, max_steps=6, save_steps=100, callbacks=[TermAt2()])
        with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM after optimizer step [23].*resume_from_checkpoint last") as info:
            t.train()
        checkpoint = Path(info.value.checkpoint)
        assert checkpoint.name in ("checkpoint-2", "checkpoint-3") and (checkpoint / CSR_STATE_NAME).is_file()
        assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == [checkpoint.name]
        assert not seen  # the trainer's handler took the signal
        os.kill(os.getpid(), signal.SIGTERM)  # and the previous handler is back
        assert seen == ["test handler"]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_on_one_ddp_rank_stops_every_rank_at_the_same_step(free_port, tmp_path):
    """torchrun, 2 processes, SIGTERM to rank 1 only: the stop flag is all-reduced, so rank 0 (which saves)
    stops at the same step boundary, the checkpoint is written once and both ranks exit non-zero."""

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "support" / "sigterm_ddp_worker.py"), "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["interrupted"] for r in records), records
    assert records[0]["global_step"] == records[1]["global_step"] == 2, records
    checkpoints = [p.name for p in (tmp_path / "run").glob("checkpoint-*")]
    assert checkpoints == ["checkpoint-2"] and (tmp_path / "run" / "checkpoint-2" / CSR_STATE_NAME).is_file()
