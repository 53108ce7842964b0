"""Figures of a robustness report (PNG through matplotlib's Agg canvas; pyplot's global state is not used).

* :func:`plot_confusion_matrix`: the robust confusion matrix ``C`` of eq. (1) as a heatmap, true class
  on the x axis and predicted class on the y axis (the paper's Fig. 3);
* :func:`plot_classwise_accuracy`: per-class clean and robust accuracy bars, worst class marked;
* :func:`plot_train_test_scatter`: per-class robust accuracy, training set vs test set (Fig. 2).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
from matplotlib.figure import Figure

from ..utils import atomic_write_bytes
from .report import RobustnessReport

__all__ = ["plot_confusion_matrix", "plot_classwise_accuracy", "plot_train_test_scatter", "save_plots", "PLOT_FILES"]

PLOT_FILES = {
    "confusion_matrix": "confusion_matrix.png",
    "classwise_accuracy": "classwise_accuracy.png",
    "train_test_scatter": "train_test_scatter.png",
}
_CLEAN, _ROBUST, _WORST = "#9bb7d4", "#c0392b", "#222222"


def _size(num_classes: int, base: float, per_class: float) -> float:
    return min(max(base, per_class * num_classes), 24.0)


def plot_confusion_matrix(report: RobustnessReport, attack: Optional[str] = None) -> Figure:
    """Heatmap of ``C`` under ``attack`` (default: the report's headline attack)."""
    result = report[attack or report.headline]
    matrix, names = result.confusion_matrix, report.class_names
    k = len(names)
    side = _size(k, 6.0, 0.55)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Reds", vmin=0.0, vmax=max(float(matrix.max()), 1e-9))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 40:
        ax.set_xticks(range(k), names, rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(k), names)
    if k <= 15:
        threshold = 0.6 * float(matrix.max())
        for (i, j), value in np.ndenumerate(matrix):
            if i != j and value > 0:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > threshold else "black")
    ax.set_xlabel("true class")
    ax.set_ylabel("predicted class")
    m = result.metrics
    ax.set_title(f"{result.name}: robust confusion matrix (diagonal 0)\n"
                 f"‖C‖₂ = {m['spectral_norm']:.3f}   ‖C‖₁ = {m['l1_norm']:.3f} (worst-class error)")
    fig.tight_layout()
    return fig


def plot_classwise_accuracy(report: RobustnessReport, attack: Optional[str] = None) -> Figure:
    """Clean and robust accuracy per class; the worst class under ``attack`` is outlined and labelled."""
    attack = attack or report.headline
    clean, robust = report["clean"], report[attack]
    names, k = report.class_names, len(report.class_names)
    fig = Figure(figsize=(_size(k, 7.0, 0.7), 4.5))
    ax = fig.add_subplot()
    x = np.arange(k)
    width = 0.4 if attack != "clean" else 0.8
    ax.bar(x - width / 2 if attack != "clean" else x, clean.per_class_accuracy, width, color=_CLEAN,
           label=f"clean ({clean.accuracy:.1%})")
    if attack != "clean":
        ax.bar(x + width / 2, robust.per_class_accuracy, width, color=_ROBUST,
               label=f"{attack} ({robust.accuracy:.1%})")
        ax.axhline(robust.accuracy, color=_ROBUST, linestyle="--", linewidth=1)
    worst = robust.worst_class
    offset = width / 2 if attack != "clean" else 0.0
    ax.bar(worst["index"] + offset, worst["accuracy"], width, fill=False, edgecolor=_WORST, linewidth=2)
    ax.annotate(f"worst: {worst['name']} ({worst['accuracy']:.1%})", (worst["index"] + offset, worst["accuracy"]),
                xytext=(0, 12), textcoords="offset points", ha="center", fontsize=9, fontweight="bold",
                arrowprops={"arrowstyle": "->", "color": _WORST})
    if k <= 40:
        ax.set_xticks(x, names, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center")
        label = ax.get_xticklabels()[worst["index"]]
        label.set_color(_ROBUST)
        label.set_fontweight("bold")
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Per-class accuracy, {report.threat_model['norm']} eps = {report.threat_model['eps']:.4g}")
    ax.legend(loc="upper left", ncol=2, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_train_test_scatter(report: RobustnessReport, attack: Optional[str] = None) -> Figure:
    """Per-class accuracy on the training set (x) and test set (y).

    Needs the training-set results: call :meth:`RobustnessReport.compare_with_train` first.
    """
    if not report.train_test_agreement:
        raise ValueError("the report has no training-set results; call report.compare_with_train(train_report) first.")
    agreement = report.train_test_agreement["attacks"]
    attack = attack or (report.headline if report.headline in agreement else next(iter(agreement)))
    if attack not in agreement:
        raise ValueError(f"attack must be one of {list(agreement)} (run on both sets); got {attack!r}.")
    entry, test = agreement[attack], report[attack]
    train_acc = np.array([np.nan if v is None else v for v in entry["train_per_class_accuracy"]], dtype=float)
    test_acc = test.per_class_accuracy
    fig = Figure(figsize=(6.0, 6.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="train = test")
    ax.scatter(train_acc, test_acc, s=40, color=_ROBUST, zorder=3)
    train_worst, test_worst = entry["train_worst_class"]["index"], test.worst_class["index"]
    ax.scatter(train_acc[train_worst], test_acc[train_worst], marker="*", s=320, color="#f1c40f", edgecolor=_WORST,
               zorder=4, label=f"worst on train: {report.class_names[train_worst]}")
    ax.scatter(train_acc[test_worst], test_acc[test_worst], marker="*", s=320, color="#3498db", edgecolor=_WORST,
               zorder=4, label=f"worst on test: {report.class_names[test_worst]}")
    if len(report.class_names) <= 40:
        points: dict = {}  # classes at the same point share one label
        for name, x, y in zip(report.class_names, train_acc, test_acc):
            if not (np.isnan(x) or np.isnan(y)):
                points.setdefault((x, y), []).append(name)
        for (x, y), group in points.items():
            ax.annotate(", ".join(group), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
    low = max(float(np.nanmin(np.concatenate([train_acc, test_acc]))) - 0.1, -0.03)
    ax.set_xlim(low, 1.06)
    ax.set_ylim(low, 1.06)
    ax.set_xlabel("training-set accuracy per class")
    ax.set_ylabel("test-set accuracy per class")
    ax.set_title(f"{attack}: train vs test, Kendall τ = {entry['kendall_tau']:.3f}, cov = {entry['covariance']:.4f}")
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _save(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def save_plots(report: RobustnessReport, output_dir: Union[str, Path], attack: Optional[str] = None) -> List[Path]:
    """Write the PNGs of :data:`PLOT_FILES` (the scatter only with training-set results); return their paths."""
    output_dir = Path(output_dir)
    paths = [
        _save(plot_confusion_matrix(report, attack), output_dir / PLOT_FILES["confusion_matrix"]),
        _save(plot_classwise_accuracy(report, attack), output_dir / PLOT_FILES["classwise_accuracy"]),
    ]
    if report.train_test_agreement:
        paths.append(_save(plot_train_test_scatter(report, attack), output_dir / PLOT_FILES["train_test_scatter"]))
    return paths
