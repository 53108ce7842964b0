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

from ..utils import atomic_write_text, public_path, read_json_object, scrub_paths
from ..validation import check_repo_id, is_repo_id
from ..data.registry import DATASETS as CARD_DATASETS  # the datasets a card can name (``hf-csr card --dataset``)
from ..data.registry import dataset_info

__all__ = ["MODEL_CARD_TEMPLATE", "ATTACK_NAMES", "CARD_DATASETS", "escape_markdown", "framework_versions",
           "public_path", "render_model_card", "write_model_card"]

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
            if not isinstance(per_class, (list, tuple)):
                raise ValueError(f"results['attacks'][{key!r}]['per_class_accuracy'] must be a list of numbers.")
            if class_names is not None and len(per_class) != len(class_names):
                raise ValueError(
                    f"results['attacks'][{key!r}]['per_class_accuracy'] has {len(per_class)} entries but there are "
                    f"{len(class_names)} class_names."
                )
            for index, value in enumerate(per_class):
                _number(value, f"attacks[{key!r}]['per_class_accuracy'][{index}]")
        worst = metrics.get("worst_class")
        if worst is not None and (not isinstance(worst, Mapping) or "accuracy" not in worst):
            raise ValueError(f"results['attacks'][{key!r}]['worst_class'] must be a mapping with 'accuracy' and 'name'.")
        checked[key] = metrics
    return checked


def _worst(metrics: Mapping[str, Any], class_names: Sequence[str]) -> Optional[Dict[str, Any]]:
    worst = metrics.get("worst_class")
    if isinstance(worst, Mapping) and "accuracy" in worst:
        ties = worst.get("ties")
        name = worst.get("name", "")
        if isinstance(ties, (list, tuple)) and len(ties) > 1:
            name = ", ".join(str(t) for t in ties) + " (tie)"
        return {"accuracy": _number(worst["accuracy"], "worst_class accuracy"), "name": name}
    per_class = metrics.get("per_class_accuracy")
    if per_class:
        lowest = min(per_class)
        tied = [class_names[i] for i, value in enumerate(per_class) if value == lowest]
        return {"accuracy": float(lowest), "name": tied[0] if len(tied) == 1 else ", ".join(tied) + " (tie)"}
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


def framework_versions() -> Dict[str, str]:
    """Versions of the libraries that made the checkpoint (as transformers' and TRL's cards list them)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("hf_csr", "transformers", "torch", "timm", "accelerate", "datasets", "huggingface_hub", "pyautoattack"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _dataset_ids(dataset: Optional[str], dataset_id: Optional[str], datasets: Optional[Sequence[str]]) -> List[str]:
    ids = [dataset_id] if dataset_id else []
    for item in datasets or []:
        item = str(item)
        if item in CARD_DATASETS:
            item = CARD_DATASETS[item].hub_id or item
        if not is_repo_id(item):
            continue  # a local file or folder is not a Hub dataset id
        if "/" in item and item not in ids:
            ids.append(item)
    return ids


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
    datasets: Optional[Sequence[str]] = None,
    plots: Union[Mapping[str, str], Sequence[str], None] = None,
    license: Optional[str] = None,
    license_name: Optional[str] = None,
    license_link: Optional[str] = None,
    tags: Optional[Sequence[str]] = None,
    model_name: Optional[str] = None,
    versions: Optional[Mapping[str, str]] = None,
) -> ModelCard:
    """Render the model card of a robust checkpoint.

    Args:
        results: an evaluation's ``results.json`` (``class_names``, ``threat_model``, ``num_examples``,
            ``attacks`` -> {``accuracy``, ``per_class_accuracy``, ``worst_class``, ``num_examples``, ...},
            ``flags``); any attack may be absent. ``None``: a card without evaluation.
        config: the model's ``RobustClassifierConfig`` (or its ``config.json`` dict): backbone, classes, threat model.
        repo_id: the Hub repo the card belongs to (used in the loading snippet).
        base_model: the Hub repo the model was fine-tuned or converted from (``base_model`` metadata).
        training: the training set-up (method, base loss, CSR variant, alpha, gamma, confusion source, threat
            model, global batch, devices, optimizer, schedule, precision, epochs and steps, ...), e.g.
            :func:`training_setup` of a trainer.
        dataset: ``"cifar10"`` / ``"cifar100"`` / ``"fashion_mnist"``: fills ``dataset_name`` / ``dataset_id``.
        dataset_name / dataset_id: display name and Hub dataset id of the evaluation data.
        datasets: further Hub dataset ids (e.g. the training data) for the ``datasets`` metadata; local
            paths are left out.
        plots: relative paths of PNGs in the repo (or caption -> path), e.g. the confusion-matrix plot.
        license: the card's licence identifier (default ``apache-2.0``; a converted third-party model keeps its
            original's: ``other`` with ``license_name`` / ``license_link`` when it has no standard identifier).
        tags: extra tags.
        model_name: the card's title; default: the repo name.
        versions: framework versions to list; default: the installed ones.
    """
    repo_id = check_repo_id(repo_id, "repo_id", allow_none=True)
    base_model = check_repo_id(base_model, "base_model", allow_none=True)
    if config is not None and not isinstance(config, Mapping):
        config = config.to_dict()
    config = dict(config or {})
    id2label = config.get("id2label") or {}
    results = dict(results or {})
    class_names = [str(n) for n in results.get("class_names") or [id2label[k] for k in sorted(id2label, key=int)]]
    info = dataset_info(dataset)
    dataset_name = dataset_name or (info.name if info else "the evaluation data")
    dataset_id = dataset_id or (info.hub_id if info else None)
    dataset_ids = _dataset_ids(dataset, dataset_id, datasets)
    threat = results.get("threat_model") or config.get("threat_model")
    title = model_name or (repo_id.split("/")[-1] if repo_id else "Robust image classifier")
    if license is None:
        license = "other" if license_name else "apache-2.0"

    attacks = _checked_attacks(results, class_names) if results.get("attacks") is not None else {}
    default_n = results.get("num_examples")
    summary_rows, eval_results = [], []
    for key, metrics in attacks.items():
        worst = _worst(metrics, class_names)
        n = metrics.get("num_examples", default_n)
        summary_rows.append(
            {
                "attack": _attack_name(key),
                "images": int(n) if isinstance(n, int) and not isinstance(n, bool) else "?",
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
            dataset_name=info.name if info else public_path(dataset_name),
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

    extra = {"license_name": license_name, "license_link": license_link} if license_name or license_link else {}
    all_tags = list(TAGS) + ([str(threat["norm"]).lower()] if threat and "norm" in threat else [])
    all_tags += [str(tag) for tag in tags or [] if str(tag) not in all_tags]
    card_data = ModelCardData(
        library_name="hf_csr",
        pipeline_tag="image-classification",
        license=license,
        tags=all_tags,
        datasets=dataset_ids or None,
        base_model=base_model,
        metrics=["accuracy"] if eval_results else None,
        model_name=title,
        eval_results=eval_results or None,
        **{k: v for k, v in extra.items() if v},
    )
    training = scrub_paths(dict(training or {}))
    training_rows = [
        {"key": escape_markdown(k), "value": _training_value(v)} for k, v in training.items()
    ]
    versions = framework_versions() if versions is None else dict(versions)
    size = config.get("image_size")
    channels = config.get("num_channels")
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        title=escape_markdown(title),
        dataset_name=escape_markdown(public_path(dataset_name)),
        num_classes=len(class_names) or config.get("num_labels", "?"),
        backbone=escape_markdown(config.get("backbone", "unknown")),
        num_channels=int(channels) if isinstance(channels, int) else "C",
        image_size=int(size) if isinstance(size, int) else "H",
        threat=_threat_text(threat),
        csr=_uses_csr(training),
        method=escape_markdown(training.get("method", "")) if training.get("method") else None,
        base_model=base_model,
        license_text=escape_markdown(license_name or license),
        license_link=license_link,
        repo_literal=repr(repo_id) if repo_id else '"path/to/this/checkpoint"',
        summary_rows=summary_rows,
        num_examples=int(default_n) if isinstance(default_n, int) and not isinstance(default_n, bool) else "?",
        seed=results.get("seed") if isinstance(results.get("seed"), int) else None,
        class_columns=class_columns,
        class_rows=class_rows,
        flags=[escape_markdown(flag) for flag in results.get("flags") or []],
        plots=_plot_entries(plots),
        training_rows=training_rows,
        versions=[{"name": escape_markdown(k), "version": escape_markdown(v)} for k, v in versions.items()],
    )


#: File next to README.md that keeps the card's inputs other than results, config and plots.
CARD_METADATA = "card.json"
CARD_METADATA_KEYS = ("repo_id", "base_model", "training", "dataset", "dataset_name", "dataset_id", "datasets",
                      "license", "license_name", "license_link", "tags", "model_name")
_CARD_METADATA_TYPES = {"training": Mapping, "datasets": (list, tuple), "tags": (list, tuple)}


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
    inputs (``training``, ``base_model``, ``repo_id``, data names, licence, ...) are kept in
    ``output_dir/card.json`` and reused when a later call leaves them out, so a card refreshed after a new
    evaluation or before a push keeps the training set-up.
    """
    output_dir = Path(output_dir)
    card, metadata, saved = render_directory_card(output_dir, results, plots=plots, **kwargs)
    path = output_dir / "README.md"
    atomic_write_text(path, str(card))
    if metadata != saved:
        atomic_write_text(output_dir / CARD_METADATA, json.dumps(metadata, indent=2) + "\n")
    return path


def render_directory_card(
    output_dir: Union[str, os.PathLike],
    results: Optional[Mapping[str, Any]] = None,
    *,
    plots: Union[Mapping[str, str], Sequence[str], None] = None,
    **kwargs: Any,
):
    """What :func:`write_model_card` would write, without writing: ``(card, card.json metadata, the saved one)``."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{str(output_dir)!r} is not a directory.")
    # What the caller said about the checkpoint (training set-up, base model, repo id, data) is kept in
    # card.json, so that a card re-rendered later (by `hf-csr evaluate`, `push`, `card`) keeps it.
    saved = read_card_metadata(output_dir / CARD_METADATA) if (output_dir / CARD_METADATA).is_file() else {}
    for key in CARD_METADATA_KEYS:
        if kwargs.get(key) is None and saved.get(key) is not None:
            kwargs[key] = saved[key]
    if kwargs.get("training") is not None:
        kwargs["training"] = scrub_paths(dict(kwargs["training"]))
    metadata = {key: kwargs[key] for key in CARD_METADATA_KEYS if kwargs.get(key) is not None}
    if results is None and (output_dir / "results.json").is_file():
        results = read_results(output_dir / "results.json")
    if kwargs.get("config") is None and (output_dir / "config.json").is_file():
        kwargs["config"] = read_json_object(output_dir / "config.json")
    if plots is None:
        from .push import regular_files

        plots = [p.relative_to(output_dir).as_posix() for p in regular_files(output_dir) if p.suffix == ".png"]
    return render_model_card(results, plots=plots, **kwargs), metadata, saved


def _uses_csr(training: Optional[Mapping[str, Any]]) -> bool:
    alpha = (training or {}).get("csr_alpha", (training or {}).get("alpha"))
    try:
        return alpha is not None and float(alpha) > 0
    except (TypeError, ValueError):
        return False


def read_card_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """``card.json``: checked key by key, so a malformed file is a ``ValueError`` naming the file and the key."""
    saved = read_json_object(Path(path))
    for key, value in saved.items():
        if key not in CARD_METADATA_KEYS:
            raise ValueError(f"{str(path)!r}: unknown key {key!r} (known: {list(CARD_METADATA_KEYS)}); fix or delete the file.")
        expected = _CARD_METADATA_TYPES.get(key, str)
        if value is not None and not isinstance(value, expected):
            raise ValueError(
                f"{str(path)!r}: {key!r} must be a {getattr(expected, '__name__', 'list')}, not a "
                f"{type(value).__name__} ({value!r:.80}); fix or delete the file."
            )
    return saved


def check_card_inputs(directory: Union[str, os.PathLike]) -> None:
    """Read and check ``card.json`` and ``results.json`` in ``directory`` if they exist: called before a long
    training or evaluation that ends by writing the card there, so that a malformed file fails first."""
    directory = Path(directory)
    if (directory / CARD_METADATA).is_file():
        read_card_metadata(directory / CARD_METADATA)
    if (directory / "results.json").is_file():
        read_results(directory / "results.json")


def read_results(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """``results.json``, checked for the shape a card needs (``ValueError`` naming the file and the entry)."""
    path = Path(path)
    results = read_json_object(path)
    try:
        names = results.get("class_names")
        if names is not None and not isinstance(names, list):
            raise ValueError("'class_names' must be a list of names")
        attacks = results.get("attacks")
        if attacks is not None:
            _checked_attacks(results, [str(n) for n in names or []] if names is not None else None)
        threat = results.get("threat_model")
        if threat is not None and (not isinstance(threat, Mapping) or not isinstance(threat.get("eps", 0), (int, float))):
            raise ValueError("'threat_model' must be a mapping like {'norm': 'Linf', 'eps': 0.0314}")
        if results.get("num_examples") is not None and not isinstance(results["num_examples"], int):
            raise ValueError("'num_examples' must be an integer")
    except ValueError as error:
        raise ValueError(f"{str(path)!r} is not a valid results file: {error}. Re-run `hf-csr evaluate` or fix it.") from None
    return results


# --------------------------------------------------------------------------- what a trainer knows
def training_setup(trainer: Any) -> Dict[str, Any]:
    """The training set-up of a :class:`~hf_csr.CSRTrainer` as its card shows it: method, base loss, CSR
    variant / confusion source / alpha / gamma, threat model, *global* batch, devices, optimizer and schedule,
    precision, epochs and steps -- all read from the trainer's own arguments and state."""
    args = trainer.args
    method = args.fairness_method
    name = {"pgd": "PGD-AT", "trades": "TRADES"}.get(args.base_loss, str(args.base_loss))
    if method == "csr":
        name += " + CSR (Confusional Spectral Regularization)"
    elif method not in (None, "none"):
        name += f" + {str(method).upper()}"
    if args.awp_gamma > 0:
        name += " + AWP"
    setup: Dict[str, Any] = {"method": name, "base_loss": args.base_loss}
    if args.base_loss == "trades":
        setup["trades_beta"] = args.trades_beta
    fairness = getattr(trainer, "fairness", None)
    if fairness is not None:  # the method's own settings, as the method shows them (FairnessMethod.card_fields)
        setup.update(fairness.card_fields())
    eps = float(args.attack_eps)
    setup["threat_model"] = f"{args.attack_norm}, eps = {eps:.5g} ({eps * 255:.4g}/255)"
    setup["training_attack"] = (f"PGD-{args.attack_steps}, step {float(args.attack_step_size):.5g}, "
                                f"{args.random_start} start, BatchNorm in {args.attack_bn_mode} mode")
    if args.awp_gamma > 0:
        setup["awp_gamma"] = args.awp_gamma
    world = max(int(getattr(args, "world_size", 1) or 1), 1)
    accumulation = int(args.gradient_accumulation_steps)
    setup["global_batch_size"] = args.per_device_train_batch_size * accumulation * world
    setup["per_device_batch_size"] = args.per_device_train_batch_size
    setup["gradient_accumulation_steps"] = accumulation
    setup["devices"] = world
    optim = getattr(args.optim, "value", args.optim)
    setup["optimizer"] = f"{optim}" + (f" ({args.optim_args})" if args.optim_args else "")
    setup["learning_rate"] = args.learning_rate
    setup["weight_decay"] = args.weight_decay
    milestones = args.milestone_epochs()
    if milestones:
        schedule = f"x{args.lr_decay_factor:g} at epochs {', '.join(f'{m:g}' for m in milestones)}"
    else:
        schedule = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    warmup = getattr(args, "warmup_steps", 0) or 0
    if isinstance(warmup, (int, float)) and warmup > 0:
        schedule += f", warm-up {warmup:g}" + (" of the steps" if warmup < 1 else " steps")
    setup["lr_schedule"] = schedule
    setup["precision"] = "bf16 mixed" if args.bf16 else "fp16 mixed" if args.fp16 else "fp32"
    state = getattr(trainer, "state", None)
    steps = getattr(state, "global_step", 0) or 0
    epoch = getattr(state, "epoch", None)
    if steps:
        setup["epochs"] = round(float(epoch), 3) if epoch is not None else None
        setup["steps"] = steps
    else:  # not trained (yet): what was asked for
        setup["epochs"] = args.num_train_epochs if args.max_steps in (None, -1) else None
        setup["steps"] = args.max_steps if args.max_steps not in (None, -1) else None
    setup["seed"] = args.seed
    return {key: value for key, value in setup.items() if value is not None}


def base_model_of(model: Any) -> Optional[str]:
    """The Hub repo a model comes from: ``config.base_model`` (converted / published weights), else the Hub id it
    was loaded from with ``from_pretrained`` (never a local path)."""
    config = getattr(model, "config", None)
    for candidate in (getattr(config, "base_model", None), getattr(config, "_name_or_path", None)):
        if not isinstance(candidate, str) or not candidate or os.path.exists(candidate) or os.path.isabs(candidate):
            continue
        if is_repo_id(candidate) and candidate.count("/") == 1:
            return candidate
    return None


def dataset_card_info(*datasets: Any) -> Dict[str, Any]:
    """``dataset`` / ``datasets`` card arguments from hf_csr datasets (their ``name``: a known dataset, a Hub
    id, or a local file -- which is left out)."""
    known, hub_ids = None, []
    for data in datasets:
        for part in (data.values() if isinstance(data, Mapping) else [data]):
            name = getattr(part, "name", None)
            name = getattr(getattr(part, "real", None), "name", name)
            if not isinstance(name, str):
                continue
            base = name.split("[")[0]
            if base in CARD_DATASETS:
                known = known or base
                if CARD_DATASETS[base].hub_id:
                    hub_ids.append(CARD_DATASETS[base].hub_id)
            elif base.count("/") == 1 and not os.path.exists(base):
                hub_ids.append(base)
    out: Dict[str, Any] = {}
    if known:
        out["dataset"] = known
    if hub_ids:
        out["datasets"] = sorted(set(hub_ids), key=hub_ids.index)
    return out
