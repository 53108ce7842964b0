"""hf_csr's ``evaluate`` metric modules, one self-contained script (plus a metric card) per folder.

* ``classwise_accuracy``: average, per-class and worst-class accuracy, std and best-worst gap;
* ``robust_confusion``: the normalised (robust) confusion matrix of eq. (1), ``||C||_2``, ``||C||_1``, nu;
* ``classwise_agreement``: Kendall's tau and covariance between two per-class accuracy vectors (Fig. 2).

``evaluate.load(metric_path("robust_confusion"))`` loads one (offline: it is a local path). The scripts
import nothing from hf_csr, since ``evaluate`` copies them alone into its cache; hf_csr's own
evaluation imports their plain functions so that the maths lives in one place.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["METRICS", "metric_path", "load_metric"]

METRICS = ("classwise_accuracy", "robust_confusion", "classwise_agreement")


def metric_path(name: str) -> str:
    """The folder of the metric module ``name`` (one of :data:`METRICS`), for ``evaluate.load``."""
    if name not in METRICS:
        raise ValueError(f"name must be one of {list(METRICS)}; got {name!r}.")
    return str(Path(__file__).resolve().parent / name)


def load_metric(name: str, **kwargs):
    """``evaluate.load(metric_path(name), **kwargs)``."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
