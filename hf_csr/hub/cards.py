"""Class-wise model cards for robust checkpoints.

:func:`render_model_card` turns an evaluation's ``results.json`` (clean / PGD-20 / CW-20 / AutoAttack,
average and per class), the model config and the training set-up into a ``huggingface_hub.ModelCard``
rendered from the Jinja template ``hf_csr/hub/templates/model_card.md``: YAML metadata with a
``model-index`` (average and worst-class accuracy per attack), a class-wise table, plots, the training
set-up, how to load the model and the paper citation. Everything user-supplied (class names, training
values, captions, flags) is escaped for Markdown; the metadata goes through ``ModelCardData`` (YAML
serialisation), and repo ids are validated.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union
from urllib.parse import quote

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..utils import atomic_write_text
from .checkpoints import DATASETS

__all__ = ["MODEL_CARD_TEMPLATE", "ATTACK_NAMES", "escape_markdown", "render_model_card", "write_model_card"]

MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"

#: results.json attack keys -> display names, in display order
ATTACK_NAMES = {
    "clean": "Clean",
    "pgd20": "PGD-20",
    "cw20": "CW-20",
    "autoattack": "AutoAttack",
    "worst_of_all": "Worst of all attacks",
}
TAGS = [
    "image-classification",
    "adversarial-robustness",
    "robust-fairness",
    "confusional-spectral-regularization",
    "csr",
    "hf_csr",
]
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+!|~$])")


def escape_markdown(text: Any) -> str:
    """``text`` as inline Markdown that renders literally: one line, HTML (``& < >``) and Markdown syntax escaped."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"results: {what} must be a finite number; got {value!r}.")
    return float(value)


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _plain(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.4f}"


def _attack_name(key: str) -> str:
    return ATTACK_NAMES.get(key, escape_markdown(key))


def _checked_attacks(results: Mapping[str, Any], class_names: Sequence[str]) -> Dict[str, Mapping[str, Any]]:
    attacks = results.get("attacks")
    if not isinstance(attacks, Mapping):
        raise ValueError("results must hold an 'attacks' mapping (attack name -> metrics), as in results.json.")
    ordered = [k for k in ATTACK_NAMES if k in attacks] + sorted(k for k in attacks if k not in ATTACK_NAMES)
    checked = {}
    for key in ordered:
        metrics = attacks[key]
        if not isinstance(metrics, Mapping) or "accuracy" not in metrics:
            raise ValueError(f"results['attacks'][{key!r}] must be a mapping with at least 'accuracy'.")
        _number(metrics["accuracy"], f"attacks[{key!r}]['accuracy']")
        per_class = metrics.get("per_class_accuracy")
        if per_class is not None:
            if len(per_class) != len(class_names):
                raise ValueError(
                    f"results['attacks'][{key!r}]['per_class_accuracy'] has {len(per_class)} entries but there are "
                    f"{len(class_names)} class_names."
                )
            for index, value in enumerate(per_class):
                _number(value, f"attacks[{key!r}]['per_class_accuracy'][{index}]")
        checked[key] = metrics
    return checked


def _worst(metrics: Mapping[str, Any], class_names: Sequence[str]) -> Optional[Dict[str, Any]]:
    worst = metrics.get("worst_class")
    if isinstance(worst, Mapping) and "accuracy" in worst:
        return {"accuracy": _number(worst["accuracy"], "worst_class accuracy"), "name": worst.get("name", "")}
    per_class = metrics.get("per_class_accuracy")
    if per_class:
        index = min(range(len(per_class)), key=per_class.__getitem__)
        return {"accuracy": float(per_class[index]), "name": class_names[index]}
    return None


def _optional(metrics: Mapping[str, Any], key: str) -> Optional[float]:
    value = metrics.get(key)
    return None if value is None else _number(value, key)


def _threat_text(threat: Optional[Mapping[str, Any]]) -> str:
    if not threat:
        return "unspecified"
    eps = float(threat.get("eps", float("nan")))
    return f"{escape_markdown(threat.get('norm', '?'))} (ε = {eps:.4g} = {eps * 255:.4g}/255)"


def _training_value(value: Any) -> str:
    if isinstance(value, float):
        return escape_markdown(f"{value:.6g}")
    if isinstance(value, (dict, list, tuple)):
        return escape_markdown(json.dumps(value, sort_keys=True, default=str))
    return escape_markdown(value)


def _plot_entries(plots: Union[Mapping[str, str], Sequence[str], None]) -> List[Dict[str, str]]:
    if not plots:
        return []
    items = plots.items() if isinstance(plots, Mapping) else [(None, p) for p in plots]
    entries = []
    for caption, path in items:
        posix = PurePosixPath(str(path).replace(os.sep, "/"))
        if posix.is_absolute() or ".." in posix.parts or ":" in str(path) or not str(path).strip():
            raise ValueError(f"plot paths must be relative paths inside the repo; got {str(path)!r}.")
        caption = caption if caption is not None else posix.stem.replace("_", " ").replace("-", " ")
        entries.append({"caption": escape_markdown(caption), "path": quote(str(posix))})
    return entries


def _validated_repo_id(value: Optional[str], name: str) -> Optional[str]:
    if value is None:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise ValueError(f"{name} must be a Hub repo id like 'namespace/name'; got {value!r} ({error}).") from None
    return value


def render_model_card(
    results: Optional[Mapping[str, Any]] = None,
    *,
    config: Optional[Union[Mapping[str, Any], Any]] = None,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    training: Optional[Mapping[str, Any]] = None,
    dataset: Optional[str] = None,
    dataset_name: Optional[str] = None,
    dataset_id: Optional[str] = None,
    plots: Union[Mapping[str, str], Sequence[str], None] = None,
    license: str = "apache-2.0",
    model_name: Optional[str] = None,
) -> ModelCard:
    """Render the model card of a robust checkpoint.

    Args:
        results: an evaluation's ``results.json`` (``class_names``, ``threat_model``, ``num_examples``,
            ``attacks`` -> {``accuracy``, ``per_class_accuracy``, ``worst_class``, ...}, ``flags``); any attack
            may be absent. ``None``: a card without evaluation.
        config: the model's ``RobustClassifierConfig`` (or its ``config.json`` dict): backbone, classes, threat model.
        repo_id: the Hub repo the card belongs to (used in the loading snippet).
        base_model: the Hub repo the model was fine-tuned from.
        training: the training set-up (base loss, CSR variant, alpha, gamma, confusion source, attack, epochs, lr, ...).
        dataset: ``"cifar10"`` / ``"cifar100"``: fills ``dataset_name`` / ``dataset_id``.
        dataset_name / dataset_id: display name and Hub dataset id of the evaluation data.
        plots: relative paths of PNGs in the repo (or caption -> path), e.g. the confusion-matrix plot.
        license: the card's license identifier.
        model_name: the card's title; default: the repo name.
    """
    repo_id = _validated_repo_id(repo_id, "repo_id")
    base_model = _validated_repo_id(base_model, "base_model")
    if config is not None and not isinstance(config, Mapping):
        config = config.to_dict()
    config = dict(config or {})
    id2label = config.get("id2label") or {}
    results = dict(results or {})
    class_names = [str(n) for n in results.get("class_names") or [id2label[k] for k in sorted(id2label, key=int)]]
    info = DATASETS.get(dataset) if dataset is not None else None
    if dataset is not None and info is None:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)} or None; got {dataset!r}.")
    dataset_name = dataset_name or (info.name if info else "the evaluation data")
    dataset_id = dataset_id or (info.hub_id if info else None)
    threat = results.get("threat_model") or config.get("threat_model")
    title = model_name or (repo_id.split("/")[-1] if repo_id else "Robust image classifier")

    attacks = _checked_attacks(results, class_names) if results.get("attacks") is not None else {}
    summary_rows, eval_results = [], []
    for key, metrics in attacks.items():
        worst = _worst(metrics, class_names)
        summary_rows.append(
            {
                "attack": _attack_name(key),
                "accuracy": _percent(float(metrics["accuracy"])),
                "worst_name": escape_markdown(worst["name"]) if worst else "–",
                "worst": _percent(worst["accuracy"] if worst else None),
                "std": _percent(_optional(metrics, "std")),
                "gap": _percent(_optional(metrics, "best_worst_gap")),
                "spectral": _plain(_optional(metrics, "spectral_norm")),
                "l1": _plain(_optional(metrics, "l1_norm")),
            }
        )
        common = dict(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_id or "custom",
            dataset_name=info.name if info else dataset_name,
            dataset_split="test",
            metric_config=key,
            metric_args=dict(threat) if threat and key != "clean" else None,
        )
        display = ATTACK_NAMES.get(key, key)
        eval_results.append(
            EvalResult(metric_type="accuracy", metric_name=f"{display} accuracy", metric_value=float(metrics["accuracy"]), **common)
        )
        if worst is not None:
            eval_results.append(
                EvalResult(
                    metric_type="worst_class_accuracy", metric_name=f"{display} worst-class accuracy",
                    metric_value=worst["accuracy"], **common,
                )
            )
    class_columns = [_attack_name(k) for k, m in attacks.items() if m.get("per_class_accuracy") is not None]
    per_class = [m["per_class_accuracy"] for m in attacks.values() if m.get("per_class_accuracy") is not None]
    class_rows = [
        {"name": escape_markdown(name), "cells": [_percent(float(column[i])) for column in per_class]}
        for i, name in enumerate(class_names)
    ] if per_class else []

    card_data = ModelCardData(
        library_name="hf_csr",
        pipeline_tag="image-classification",
        license=license,
        tags=TAGS + ([str(threat["norm"]).lower()] if threat and "norm" in threat else []),
        datasets=[dataset_id] if dataset_id else None,
        base_model=base_model,
        metrics=["accuracy"] if eval_results else None,
        model_name=title,
        eval_results=eval_results or None,
    )
    training_rows = [{"key": escape_markdown(k), "value": _training_value(v)} for k, v in (training or {}).items()]
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        title=escape_markdown(title),
        dataset_name=escape_markdown(dataset_name),
        num_classes=len(class_names) or config.get("num_labels", "?"),
        backbone=escape_markdown(config.get("backbone", "unknown")),
        num_channels=int(config.get("num_channels", 3)),
        image_size=int(config.get("image_size", 32)),
        threat=_threat_text(threat),
        csr=_uses_csr(training),
        base_model=base_model,
        repo_literal=repr(repo_id) if repo_id else '"path/to/this/checkpoint"',
        summary_rows=summary_rows,
        num_examples=int(results.get("num_examples", 0)) if results.get("num_examples") is not None else "?",
        seed=results.get("seed") if isinstance(results.get("seed"), int) else None,
        class_columns=class_columns,
        class_rows=class_rows,
        flags=[escape_markdown(flag) for flag in results.get("flags") or []],
        plots=_plot_entries(plots),
        training_rows=training_rows,
    )


#: File next to README.md that keeps the card's inputs other than results, config and plots.
CARD_METADATA = "card.json"
CARD_METADATA_KEYS = ("repo_id", "base_model", "training", "dataset", "dataset_name", "dataset_id", "license",
                      "model_name")


def write_model_card(
    output_dir: Union[str, os.PathLike],
    results: Optional[Mapping[str, Any]] = None,
    *,
    plots: Union[Mapping[str, str], Sequence[str], None] = None,
    **kwargs: Any,
) -> Path:
    """Render the card of the checkpoint in ``output_dir`` and write it to ``output_dir/README.md`` (atomically).

    ``results`` defaults to ``output_dir/results.json``, the config to ``output_dir/config.json`` and the
    plots to the PNGs under ``output_dir``; other arguments as for :func:`render_model_card`. The card's other
    inputs (``training``, ``base_model``, ``repo_id``, data names, ...) are kept in ``output_dir/card.json`` and
    reused when a later call leaves them out, so a card refreshed after a new evaluation or before a push keeps
    the training set-up.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{str(output_dir)!r} is not a directory.")
    # What the caller said about the checkpoint (training set-up, base model, repo id, data) is kept in
    # card.json, so that a card re-rendered later (by `hf-csr evaluate`, `push`, `card`) keeps it.
    saved = _read_json(output_dir / CARD_METADATA) if (output_dir / CARD_METADATA).is_file() else {}
    for key in CARD_METADATA_KEYS:
        if kwargs.get(key) is None and saved.get(key) is not None:
            kwargs[key] = saved[key]
    metadata = {key: kwargs[key] for key in CARD_METADATA_KEYS if kwargs.get(key) is not None}
    if results is None and (output_dir / "results.json").is_file():
        results = _read_json(output_dir / "results.json")
    if kwargs.get("config") is None and (output_dir / "config.json").is_file():
        kwargs["config"] = _read_json(output_dir / "config.json")
    if plots is None:
        plots = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*.png"))
    card = render_model_card(results, plots=plots, **kwargs)
    path = output_dir / "README.md"
    atomic_write_text(path, str(card))
    if metadata != saved:
        atomic_write_text(output_dir / CARD_METADATA, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return path


def _uses_csr(training: Optional[Mapping[str, Any]]) -> bool:
    alpha = (training or {}).get("csr_alpha", (training or {}).get("alpha"))
    try:
        return alpha is not None and float(alpha) > 0
    except (TypeError, ValueError):
        return False


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}); the file is truncated or corrupted.") from error
