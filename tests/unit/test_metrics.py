"""The evaluate metric modules: doctests, offline loading, hand-computed values."""

import doctest
import importlib
import os
import socket
from pathlib import Path

import evaluate
import numpy as np
import pytest

from hf_csr.metrics import METRICS, metric_path

SCRIPTS = {name: importlib.import_module(f"hf_csr.metrics.{name}.{name}") for name in METRICS}


@pytest.mark.parametrize("name", METRICS)
def test_doctests_pass(name):
    result = doctest.testmod(SCRIPTS[name], raise_on_error=False)
    assert result.attempted >= 3 and result.failed == 0


@pytest.mark.parametrize("name", METRICS)
def test_loads_offline_with_a_card(name, monkeypatch):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by tests/conftest.py before evaluate is imported

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    module = evaluate.load(metric_path(name))
    assert module.name == name and "Examples" in module.inputs_description and module.citation
    text = (Path(metric_path(name)) / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---") and "evaluate.load" in text and "## Citation" in text


def test_metric_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="name must be one of"):
        metric_path("accuracy")


def test_classwise_accuracy_by_hand():
    metric = evaluate.load(metric_path("classwise_accuracy"))
    # class 0: 3/4 right, class 1: 1/2, class 2: absent, class 3: 2/2.
    out = metric.compute(predictions=[0, 0, 0, 1, 1, 3, 3, 3], references=[0, 0, 0, 0, 1, 1, 3, 3], num_classes=4)
    assert out["accuracy"] == 6 / 8
    assert out["per_class_accuracy"][:2] == [0.75, 0.5] and np.isnan(out["per_class_accuracy"][2])
    assert out["class_counts"] == [4, 2, 0, 2]
    assert (out["worst_class"], out["worst_class_name"], out["worst_class_accuracy"]) == (1, "1", 0.5)
    assert out["std"] == pytest.approx(np.std([0.75, 0.5, 1.0]))
    assert out["best_worst_gap"] == 0.5


def test_robust_confusion_by_hand():
    metric = evaluate.load(metric_path("robust_confusion"))
    # true 0 (4 examples): 1 -> class 1, 1 -> class 2; true 1 (2): 1 -> class 0; true 2 (2): all right.
    out = metric.compute(predictions=[0, 0, 1, 2, 0, 1, 2, 2], references=[0, 0, 0, 0, 1, 1, 2, 2])
    expected = np.array([[0, 0.5, 0], [0.25, 0, 0], [0.25, 0, 0]])
    np.testing.assert_allclose(out["confusion_matrix"], expected)
    # Columns are orthogonal: the singular values are the column norms sqrt(1/8) and 1/2.
    assert out["spectral_norm"] == pytest.approx(0.5)
    assert out["l1_norm"] == pytest.approx(0.5)  # worst class: 1 (accuracy 1/2) and 0 (2/4)
    assert out["nu"] == pytest.approx(1.0)
    perfect = metric.compute(predictions=[0, 1], references=[0, 1])
    assert perfect["spectral_norm"] == 0 and perfect["l1_norm"] == 0 and np.isnan(perfect["nu"])


def test_classwise_agreement_by_hand():
    metric = evaluate.load(metric_path("classwise_agreement"))
    # Pairs: (a,b) concordant, (a,c) and (b,c) discordant -> tau = (1 - 2) / 3.
    out = metric.compute(predictions=[0.1, 0.2, 0.05], references=[0.3, 0.6, 0.9])
    assert out["kendall_tau"] == pytest.approx(-1 / 3)
    assert out["covariance"] == pytest.approx(np.cov([0.3, 0.6, 0.9], [0.1, 0.2, 0.05])[0, 1])
    assert metric.compute(predictions=[1.0, 0.5, 0.2], references=[0.9, 0.4, 0.1])["kendall_tau"] == pytest.approx(1.0)
    assert metric.compute(predictions=[1.0, 0.5, 0.2], references=[0.1, 0.4, 0.9])["kendall_tau"] == pytest.approx(-1.0)


def test_kendall_tau_b_matches_scipy_with_ties_and_nans():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, 12) / 4, rng.integers(0, 4, 12) / 4
        out = SCRIPTS["classwise_agreement"].classwise_agreement(x, y)
        expected = stats.kendalltau(x, y).statistic
        assert out["kendall_tau"] == pytest.approx(expected, nan_ok=True)
    x = np.array([0.1, np.nan, 0.5, 0.7])
    out = SCRIPTS["classwise_agreement"].classwise_agreement(x, [0.2, 0.3, 0.4, 0.1])
    assert out["num_classes"] == 3


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("classwise_accuracy", dict(predictions=[0, 1], references=[0]), "differ in length"),
        ("classwise_accuracy", dict(predictions=[0, 5], references=[0, 1], num_classes=3), r"\[0, 3\)"),
        ("classwise_accuracy", dict(predictions=[0, -1], references=[0, 1]), "non-negative|int >= 0"),
        ("robust_confusion", dict(predictions=[], references=[]), "non-empty"),
        ("classwise_agreement", dict(train_accuracy=[0.1], test_accuracy=[0.2]), "at least 2 classes"),
        ("classwise_agreement", dict(train_accuracy=[0.1, 0.2], test_accuracy=[0.2]), "equal length"),
    ],
)
def test_bad_inputs_are_named(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(SCRIPTS[name], name)(**kwargs)
