"""Results of a class-wise robustness evaluation: per-attack metrics, ``results.json`` and a Markdown table.

The maths comes from the ``evaluate`` metric scripts in :mod:`hf_csr.metrics` (imported as plain
modules), so that the library and the metric modules cannot disagree.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..metrics.classwise_accuracy.classwise_accuracy import classwise_accuracy as _classwise_accuracy
from ..metrics.classwise_agreement.classwise_agreement import classwise_agreement as _classwise_agreement
from ..metrics.robust_confusion.robust_confusion import robust_confusion as _robust_confusion
from ..utils import atomic_write_json, atomic_write_text, scrub_paths
from .specs import WORST_OF_ALL

__all__ = ["AttackResult", "RobustnessReport", "classwise_agreement", "merge_results"]

logger = logging.getLogger(__name__)


def classwise_agreement(train_per_class_acc: Sequence[float], test_per_class_acc: Sequence[float]) -> Dict[str, Any]:
    """Kendall's tau-b and covariance between train and test per-class accuracies (paper Fig. 2).

    Returns ``{"kendall_tau": ..., "covariance": ..., "num_classes": ...}``; classes with a NaN accuracy
    in either vector are left out. The ``classwise_agreement`` metric module computes the same.
    """
    return _classwise_agreement(np.asarray(train_per_class_acc, float), np.asarray(test_per_class_acc, float))


def _json_safe(value: Any) -> Any:
    """NaN -> None (JSON has no NaN), recursively; numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class AttackResult:
    """The outcome of one attack on every example.

    ``predictions[q]`` is the worst-case prediction for example ``q``: the prediction on the adversarial
    example when the clean input is classified correctly, else the clean prediction (the clean input
    lies in the threat model too). So ``robust = predictions == labels`` implies clean correctness,
    as AutoAttack counts it. ``config`` describes the attack; ``extra`` holds what else it reported
    (AutoAttack: the robust accuracy after each component and its warnings).
    """

    name: str
    predictions: torch.Tensor
    labels: torch.Tensor
    class_names: Sequence[str]
    config: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    robust: torch.Tensor = field(init=False)
    metrics: Dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.predictions = self.predictions.detach().cpu().long()
        self.labels = self.labels.detach().cpu().long()
        self.robust = self.predictions == self.labels
        predictions, labels = self.predictions.numpy(), self.labels.numpy()
        k = len(self.class_names)
        self.metrics = {
            **_classwise_accuracy(predictions, labels, class_names=list(self.class_names)),
            **_robust_confusion(predictions, labels, num_classes=k),
        }

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """(K,) accuracies; NaN for classes without examples."""
        return np.asarray(self.metrics["per_class_accuracy"])

    @property
    def class_counts(self) -> np.ndarray:
        return np.asarray(self.metrics["class_counts"])

    @property
    def worst_class(self) -> Dict[str, Any]:
        """``{"index", "name", "accuracy"}`` of the class with the lowest accuracy; when several classes share
        that accuracy, ``"ties"`` lists all their names (and ``"tie_indices"`` their indices), the first of
        them being ``index`` / ``name``."""
        m = self.metrics
        worst = {"index": m["worst_class"], "name": m["worst_class_name"], "accuracy": m["worst_class_accuracy"]}
        per_class = self.per_class_accuracy
        if worst["accuracy"] is not None and not math.isnan(worst["accuracy"]):
            tied = [int(i) for i in np.flatnonzero(per_class == worst["accuracy"])]
            if len(tied) > 1:
                worst["ties"] = [str(self.class_names[i]) for i in tied]
                worst["tie_indices"] = tied
        return worst

    @property
    def confusion_matrix(self) -> np.ndarray:
        """``C`` of eq. (1): ``C[i, j]`` = fraction of class ``j`` predicted as ``i != j``."""
        return np.asarray(self.metrics["confusion_matrix"])

    def to_dict(self) -> Dict[str, Any]:
        m = self.metrics
        keys = ("accuracy", "per_class_accuracy", "class_counts")
        spread = ("std", "best_worst_gap", "confusion_matrix", "spectral_norm", "l1_norm", "nu")
        return _json_safe({
            **{key: m[key] for key in keys},
            "worst_class": self.worst_class,
            **{key: m[key] for key in spread},
            "num_robust": int(self.robust.sum()),
            "attack": self.config,
            **self.extra,
        })


@dataclass
class RobustnessReport:
    """Per-attack results on one dataset (``attacks`` keeps the run order; ``clean`` first)."""

    attacks: Dict[str, AttackResult]
    labels: torch.Tensor
    class_names: List[str]
    threat_model: Dict[str, Any]
    seed: int
    flags: List[str] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)
    train_test_agreement: Optional[Dict[str, Any]] = None

    @property
    def num_examples(self) -> int:
        return int(self.labels.numel())

    @property
    def headline(self) -> str:
        """The attack to show first: ``autoattack`` if run, else ``worst_of_all`` (or the only attack run)."""
        if "autoattack" in self.attacks:
            return "autoattack"
        if WORST_OF_ALL in self.attacks:
            combined = self.attacks[WORST_OF_ALL].config.get("attacks", [])
            return combined[0] if len(combined) == 1 else WORST_OF_ALL
        return "clean"

    def __getitem__(self, attack: str) -> AttackResult:
        try:
            return self.attacks[attack]
        except KeyError:
            raise KeyError(f"no attack {attack!r} in this report; it has {list(self.attacks)}.") from None

    def compare_with_train(self, train_report: "RobustnessReport") -> Dict[str, Any]:
        """Fill :attr:`train_test_agreement` from an evaluation of the training set (paper Fig. 2).

        For every attack run on both sets: Kendall's tau and covariance of the per-class accuracies,
        and the training set's per-class accuracies and worst class.
        """
        if list(train_report.class_names) != list(self.class_names):
            raise ValueError(
                "the training and test reports have different classes: "
                f"{train_report.class_names} vs {self.class_names}."
            )
        per_attack = {}
        for name, result in self.attacks.items():
            if name in train_report.attacks:
                train = train_report.attacks[name]
                per_attack[name] = {
                    **classwise_agreement(train.per_class_accuracy, result.per_class_accuracy),
                    "train_accuracy": train.accuracy,
                    "train_per_class_accuracy": train.metrics["per_class_accuracy"],
                    "train_worst_class": train.worst_class,
                }
        self.train_test_agreement = {"train_num_examples": train_report.num_examples, "attacks": per_attack}
        described = {k: v for k, v in train_report.metadata.items() if k not in ("evaluation", "versions")}
        if described:
            self.train_test_agreement["train_dataset"] = described
        return self.train_test_agreement

    def to_dict(self) -> Dict[str, Any]:
        """The ``results.json`` document."""
        out: Dict[str, Any] = {
            "num_examples": self.num_examples,
            "class_names": list(self.class_names),
            "threat_model": dict(self.threat_model),
            "seed": self.seed,
            "attacks": {name: result.to_dict() for name, result in self.attacks.items()},
            "flags": list(self.flags),
        }
        if self.train_test_agreement is not None:
            out["train_test_agreement"] = self.train_test_agreement
        for key, value in self.metadata.items():
            out.setdefault(key, value)
        return _json_safe(out)

    def markdown_table(self, per_class: bool = True) -> str:
        """A summary table (one row per attack), the per-class table, the agreement and the flags."""
        cell = _markdown_cell
        lines = [
            f"Threat model: {self.threat_model['norm']}, eps = {self.threat_model['eps']:.5g} "
            f"({self.num_examples} examples, seed {self.seed}). "
            "Robust = correct on the clean input and under the attack.",
            "",
            "| attack | accuracy | worst class | worst-class accuracy | std | best-worst gap "
            "| ‖C‖₂ | ‖C‖₁ | ν |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in self.attacks.items():
            m, worst = r.metrics, r.worst_class
            worst_text = (f"{cell(', '.join(worst['ties']))} (tie)" if worst.get("ties")
                          else f"{cell(worst['name'])} ({worst['index']})")
            lines.append(
                f"| {cell(name)} | {_pct(r.accuracy)} | {worst_text} | "
                f"{_pct(worst['accuracy'])} | {_pct(m['std'])} | {_pct(m['best_worst_gap'])} | "
                f"{_num(m['spectral_norm'])} | {_num(m['l1_norm'])} | {_num(m['nu'])} |"
            )
        if per_class:
            names = list(self.attacks)
            lines += ["", "| class | n | " + " | ".join(map(cell, names)) + " |",
                      "| --- | ---: |" + " ---: |" * len(names)]
            counts = self.attacks["clean"].class_counts if "clean" in self.attacks else None
            for k, class_name in enumerate(self.class_names):
                accs = " | ".join(_pct(self.attacks[n].per_class_accuracy[k]) for n in names)
                lines.append(f"| {cell(class_name)} | {'' if counts is None else int(counts[k])} | {accs} |")
        if self.train_test_agreement:
            lines += ["", "Train vs test class-wise accuracy (paper Fig. 2):", ""]
            for name, a in self.train_test_agreement["attacks"].items():
                worst = a["train_worst_class"]
                lines.append(
                    f"- {cell(name)}: Kendall tau {_num(a['kendall_tau'])}, covariance {_num(a['covariance'], 5)}, "
                    f"train worst class {cell(worst['name'])} ({_pct(worst['accuracy'])})"
                )
        if self.flags:
            lines += ["", "**Warnings:**", ""] + [f"- {cell(flag)}" for flag in self.flags]
        return "\n".join(lines)

    def save(self, output_dir: Union[str, Path], *, plots: bool = True) -> List[Path]:
        """Write ``results.json``, ``results.md`` and (with ``plots``) the PNG figures; return the paths.

        An existing ``results.json`` is merged with this report (:func:`merge_results`): attacks evaluated
        before and not now are kept, and an attack's earlier evaluation on more examples is kept over a
        smaller new one. Local paths (the model, the dataset) are written as their last component only."""
        output_dir = Path(output_dir)
        paths = [output_dir / "results.json", output_dir / "results.md"]
        atomic_write_json(paths[0], merge_results(paths[0], self.to_dict()))
        atomic_write_text(paths[1], self.markdown_table() + "\n")
        if plots:
            from .plots import save_plots

            paths += save_plots(self, output_dir)
        return paths


def _markdown_cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: no pipes, newlines or HTML."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def _num(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _same_threat(a: Any, b: Any) -> bool:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return a == b
    try:
        return a.get("norm") == b.get("norm") and math.isclose(float(a.get("eps")), float(b.get("eps")), rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def merge_results(path: Union[str, Path], new: Dict[str, Any]) -> Dict[str, Any]:
    """The ``results.json`` document after an evaluation ``new``, merged with the one already at ``path``.

    Every attack entry records its own ``num_examples`` and ``seed``. Per attack, the evaluation on more
    examples wins (the newer one on equal numbers), so a quick 20-image run never replaces a 1000-image one;
    attacks only the old file has are kept. ``evaluations`` lists every run merged in (examples, seed, attacks
    with average and worst-class accuracy). When the old file is for other classes or another threat model,
    or cannot be read, it is kept beside as ``results.previous-N.json`` (with a warning) and ``new`` starts
    afresh. Local paths in ``model`` / ``dataset`` become their last component.
    """
    path = Path(path)
    new = dict(new)
    for key in ("model", "dataset"):
        if key in new:
            new[key] = scrub_paths(new[key])
    n_new = new.get("num_examples")
    attacks_new = {name: {**entry, "num_examples": entry.get("num_examples", n_new), "seed": entry.get("seed", new.get("seed"))}
                   for name, entry in (new.get("attacks") or {}).items()}
    run = {"num_examples": n_new, "seed": new.get("seed"),
           "attacks": {name: {"accuracy": e.get("accuracy"), "worst_class_accuracy": (e.get("worst_class") or {}).get("accuracy")}
                       for name, e in attacks_new.items()}}
    new["attacks"] = attacks_new
    new["evaluations"] = [run]
    if not path.is_file():
        return new
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict) or not isinstance(old.get("attacks", {}), dict):
            raise ValueError("not a results object")
        reason = None
        if old.get("class_names") != new.get("class_names"):
            reason = "other class names"
        elif not _same_threat(old.get("threat_model"), new.get("threat_model")):
            reason = f"another threat model ({old.get('threat_model')})"
    except (ValueError, UnicodeDecodeError) as error:
        old, reason = None, f"unreadable ({error})"
    if reason is not None:
        k = 1
        while (path.parent / f"results.previous-{k}.json").exists():
            k += 1
        aside = path.parent / f"results.previous-{k}.json"
        path.replace(aside)
        logger.warning("%s is for %s: kept as %s; results.json now holds only the new evaluation.", path, reason, aside.name)
        return new
    n_old = old.get("num_examples")
    merged = {}
    for name, entry in old["attacks"].items():
        if isinstance(entry, dict):
            merged[name] = {**entry, "num_examples": entry.get("num_examples", n_old), "seed": entry.get("seed", old.get("seed"))}
    for name, entry in attacks_new.items():
        previous = merged.get(name)
        size = lambda e: e.get("num_examples") if isinstance(e.get("num_examples"), int) else -1  # noqa: E731
        if previous is not None and size(previous) > size(entry):
            logger.warning(
                "%s: keeping the earlier %s evaluation on %s examples over this one on %s (evaluate at least as many "
                "examples to replace it; this run is listed under 'evaluations').", path, name, previous.get("num_examples"),
                entry.get("num_examples"))
            continue
        merged[name] = entry
    order = [k for k in attacks_new] + [k for k in merged if k not in attacks_new]
    out = {**old, **new}
    out["attacks"] = {k: merged[k] for k in order}
    out["flags"] = list(dict.fromkeys(list(old.get("flags") or []) + list(new.get("flags") or [])))
    history = old.get("evaluations")
    if not isinstance(history, list):
        history = [{"num_examples": n_old, "seed": old.get("seed"),
                    "attacks": {name: {"accuracy": e.get("accuracy"),
                                       "worst_class_accuracy": (e.get("worst_class") or {}).get("accuracy")}
                                for name, e in old["attacks"].items() if isinstance(e, dict)}}]
    out["evaluations"] = [h for h in history if h != run] + [run]  # the same run again is listed once
    return _json_safe(out)
