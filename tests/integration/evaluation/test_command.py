"""`hf-csr evaluate` on a saved checkpoint, the figures, and the train-vs-test agreement."""

import json
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from hf_csr.cli import main
from hf_csr.data import load_fashion_mnist
from hf_csr.evaluation import classwise_agreement, evaluate_robustness
from hf_csr.evaluation.plots import PLOT_FILES, plot_train_test_scatter, save_plots


SCHEMA = {"num_examples", "class_names", "threat_model", "seed", "attacks", "flags"}
ATTACK_KEYS = {"accuracy", "per_class_accuracy", "class_counts", "worst_class", "std", "best_worst_gap",
               "confusion_matrix", "spectral_norm", "l1_norm", "nu"}


@pytest.fixture(scope="module")
def checkpoint(fmnist_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    fmnist_model.save_pretrained(path)
    return path


def _png_size(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        return image.size


def test_command_on_a_saved_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(checkpoint), "--dataset", "fashion_mnist", "--split", "test", "--limit", "20",
            "--attacks", "clean,pgd10,cw10", "--eps", "4/255", "--train-dataset", "fashion_mnist",
            "--train-limit", "20", "--batch-size", "8", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert SCHEMA <= set(results) and results["num_examples"] == 20
    assert results["threat_model"] == {"norm": "Linf", "eps": 4 / 255}
    assert set(results["attacks"]) == {"clean", "pgd10", "cw10", "worst_of_all"}
    assert all(ATTACK_KEYS <= set(entry) for entry in results["attacks"].values())
    assert results["model"] == checkpoint.name and results["dataset"] == "fashion_mnist"  # no local path (issue 16) and results["split"] == "test"
    agreement = results["train_test_agreement"]
    assert agreement["train_num_examples"] == 20 and set(agreement["attacks"]) == set(results["attacks"])
    assert {"kendall_tau", "covariance", "train_per_class_accuracy"} <= set(agreement["attacks"]["pgd10"])
    table = (out / "results.md").read_text()
    assert printed == table and "| pgd10 |" in table and "| Shirt |" in table
    for name in PLOT_FILES.values():
        width, height = _png_size(out / name)
        assert width > 400 and height > 300


def test_command_defaults_to_the_checkpoints_threat_model_and_resumes(checkpoint, tmp_path, capsys):
    out, progress = tmp_path / "eval", tmp_path / "progress"
    argv = ["evaluate", "--model", str(checkpoint), "--dataset", "fashion_mnist", "--limit", "10", "--attacks", "pgd5",
            "--output-dir", str(out), "--resume-dir", str(progress), "--no-progress"]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["threat_model"] == {"norm": "Linf", "eps": 8 / 255}  # the config's threat_model
    saved = sorted(progress.rglob("*.pt"))
    assert saved and main(argv) == 0
    assert json.loads((out / "results.json").read_text()) == first and sorted(progress.rglob("*.pt")) == saved
    capsys.readouterr()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attacks", "clean,fgsm"], "unknown attack 'fgsm'"),
        (["--eps", "eight"], "--eps must be a number or a fraction"),
        (["--limit", "0"], "--limit must be a positive integer"),
        (["--dataset", "/nonexistent/data.npz"], "no npz file at /nonexistent/data.npz"),
    ],
)
def test_command_errors_are_clear(checkpoint, tmp_path, capsys, extra, message):
    argv = ["evaluate", "--model", str(checkpoint), "--dataset", "fashion_mnist", "--output-dir", str(tmp_path),
            "--no-progress", *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_command_rejects_a_missing_model_and_an_unwritable_output_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tmp_path / "missing"), "--dataset", "fashion_mnist", "--output-dir",
              str(tmp_path / "out")])
    assert "--model" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", "m", "--dataset", "fashion_mnist", "--output-dir", str(blocker / "out")])
    assert "is not a writable directory" in capsys.readouterr().err


def test_help_states_the_input_convention(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "[0, 1]" in text and "normalises them itself" in text and "--train_dataset" in text


def test_recipe_is_a_thin_wrapper(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate_robustness.py", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path("recipes/evaluate_robustness.py", run_name="__main__")
    assert "input convention" in capsys.readouterr().out


def test_train_test_agreement_and_plots(eps, fmnist_model, fmnist_test, tmp_path):
    train = load_fashion_mnist("train", limit=40, seed=5)
    test_report = evaluate_robustness(fmnist_model, fmnist_test, attacks="pgd10", eps=eps, progress=False)
    train_report = evaluate_robustness(fmnist_model, train, attacks="pgd10", eps=eps, progress=False)
    with pytest.raises(ValueError, match="call report.compare_with_train"):
        plot_train_test_scatter(test_report)
    agreement = test_report.compare_with_train(train_report)["attacks"]["pgd10"]
    expected = classwise_agreement(train_report["pgd10"].per_class_accuracy, test_report["pgd10"].per_class_accuracy)
    assert agreement["kendall_tau"] == expected["kendall_tau"] and agreement["covariance"] == expected["covariance"]
    stats = pytest.importorskip("scipy.stats")
    tau = stats.kendalltau(train_report["pgd10"].per_class_accuracy, test_report["pgd10"].per_class_accuracy).statistic
    assert agreement["kendall_tau"] == pytest.approx(tau)
    assert agreement["covariance"] == pytest.approx(
        np.cov(train_report["pgd10"].per_class_accuracy, test_report["pgd10"].per_class_accuracy)[0, 1])
    paths = save_plots(test_report, tmp_path)
    assert [p.name for p in paths] == list(PLOT_FILES.values())
    assert test_report.headline == "pgd10"


def test_command_writes_the_card_and_refreshes_it_keeping_the_training_set_up(fmnist_model, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from hf_csr.hub import write_model_card

    model_dir = tmp_path / "model"
    fmnist_model.save_pretrained(model_dir)
    training = {"base_loss": "trades", "csr_alpha": 0.3, "csr_gamma": 0.1}
    write_model_card(model_dir, training=training, base_model="someone/robust-base")
    base = ["evaluate", "--model", str(model_dir), "--dataset", "fashion_mnist", "--limit", "10",
            "--batch-size", "10", "--no-progress"]
    # into another directory: a card with the new numbers and the model's training set-up
    out = tmp_path / "eval"
    assert main(base + ["--attacks", "clean,pgd5", "--output-dir", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    results = json.loads((out / "results.json").read_text())
    assert "trades" in card.text and "someone/robust-base" in card.content
    assert f'{100 * results["attacks"]["pgd5"]["accuracy"]:.2f}' in card.text
    # into the model directory itself: the card is refreshed at each evaluation, set-up kept
    assert main(base + ["--attacks", "clean", "--output-dir", str(model_dir)]) == 0
    first = (model_dir / "README.md").read_text()
    assert "trades" in first and "pgd5" not in first
    assert main(base + ["--attacks", "clean,pgd5", "--output-dir", str(model_dir)]) == 0
    refreshed = (model_dir / "README.md").read_text()
    assert "pgd5" in refreshed and "trades" in refreshed
    # --no-card leaves no card
    bare = tmp_path / "bare"
    assert main(base + ["--attacks", "clean", "--output-dir", str(bare), "--no-card"]) == 0
    assert not (bare / "README.md").exists()
    capsys.readouterr()


def test_autoattack_on_too_few_classes_is_refused_before_the_clean_pass(tmp_path, capsys, monkeypatch):
    """APGD-T needs 4 classes: a 3-class model is refused when its config is read, before any attack runs."""
    from hf_csr import create_robust_classifier
    from hf_csr.evaluation import robustness

    model_dir = tmp_path / "three"
    create_robust_classifier("preact_resnet_tiny", class_names=["a", "b", "c"], width=4).save_pretrained(model_dir)

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(robustness, "evaluate_robustness", no_evaluation)
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(model_dir), "--dataset", "fashion_mnist", "--limit", "20",
            "--attacks", "clean,autoattack", "--output-dir", str(out), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "apgd-t needs at least 4 classes and the model has 3" in capsys.readouterr().err
    assert not (out / "results.json").exists()
