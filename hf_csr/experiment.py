"""What every recipe does: arguments (with ``--config`` YAML), model and data, train, evaluate, card, push.

``recipes/*.py`` are thin scripts over :func:`main`, each with its own defaults::

    accelerate launch recipes/train_from_scratch.py --config recipes/configs/table3_cifar10_csr_gamma0.yaml

Precedence: recipe defaults < ``--config`` YAML < command-line flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import yaml
from transformers import AutoModelForImageClassification, HfArgumentParser, set_seed

from .configuration import CSRTrainingArguments
from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, MixedImageDataset
from .models import RobustImageClassifier, create_robust_classifier
from .trainer import CSRTrainer
from .utils import atomic_write_json
from .validation import check_attack_list

__all__ = ["ExperimentArguments", "parse_args", "build_model", "load_datasets", "run", "main", "training_summary"]

logger = logging.getLogger(__name__)


@dataclass
class ExperimentArguments:
    """Model and data of a recipe (the training settings are :class:`~hf_csr.CSRTrainingArguments`)."""

    model: str = field(
        default="preact_resnet18",
        metadata={"help": "A timm backbone name to train from scratch (preact_resnet18, wrn28_10_ddpm, ...), a "
                          "published checkpoint (wrn28_10_ddpm.dm_cifar10_linf, ...; see hf_csr.hub), a Hub repo id or "
                          "local directory saved with save_pretrained, or a local checkpoint file (.pt/.safetensors)."},
    )
    backbone_kwargs: Optional[str] = field(
        default=None, metadata={"help": "JSON dict of extra timm arguments for a from-scratch backbone, e.g. '{\"width\": 16}'."}
    )
    backbone: Optional[str] = field(
        default=None, metadata={"help": "Backbone of a local checkpoint file when it cannot be inferred (e.g. wrn34_10_trades)."}
    )
    dataset: str = field(
        default="fashion_mnist",
        metadata={"help": "fashion_mnist, a datasets name or path (uoft-cs/cifar10, zh-plus/tiny-imagenet, a local "
                          "folder or parquet file) or an .npz file."},
    )
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str = field(default="test", metadata={"help": "Evaluation split."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (auto-detected by default)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (auto-detected by default)."})
    train_limit: Optional[int] = field(default=None, metadata={"help": "Train on a class-balanced subset of this size."})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "Evaluate on a class-balanced subset of this size."})
    generated_data: Optional[str] = field(
        default=None,
        metadata={"help": "DDPM-generated data mixed into every batch: comma-separated .npz files (local paths, or "
                          "filenames in the Hub dataset repo P2333/DM-Improves-AT such as cifar10/1m.npz) or a "
                          "directory converted by `hf-csr convert-data`."},
    )
    generated_data_dir: Optional[str] = field(
        default=None, metadata={"help": "Where .npz files are converted to memory-mapped shards (default: <output_dir>/generated)."}
    )
    real_fraction: float = field(default=0.3, metadata={"help": "Fraction of real images per batch when generated data is used."})
    final_eval_attacks: str = field(
        default="clean,pgd20,cw20,autoattack",
        metadata={"help": "Attacks of the final evaluation written to results.json and the model card."},
    )
    eval_batch_size: Optional[int] = field(default=None, metadata={"help": "Batch size of the final evaluation."})

    def __post_init__(self):
        if self.backbone_kwargs is not None and not isinstance(self.backbone_kwargs, dict):
            try:
                parsed = json.loads(self.backbone_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"backbone_kwargs must be a JSON object like '{{\"width\": 16}}'; got {self.backbone_kwargs!r} ({error}).") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"backbone_kwargs must be a JSON object; got {self.backbone_kwargs!r}.")
            self.backbone_kwargs = parsed
        if not 0 < self.real_fraction < 1:
            raise ValueError(f"real_fraction must lie in (0, 1); got {self.real_fraction}.")
        for name in ("train_limit", "eval_limit", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None; got {value}.")


# --------------------------------------------------------------------------- arguments
def parse_args(
    argv: Optional[Sequence[str]] = None, defaults: Optional[Mapping[str, Any]] = None
) -> Tuple[ExperimentArguments, CSRTrainingArguments]:
    """Parse ``argv`` (default ``sys.argv[1:]``) with HfArgumentParser; ``--config file.yaml`` supplies
    values between the recipe's ``defaults`` and the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    values: Dict[str, Any] = dict(defaults or {})
    if known.config:
        values.update(_read_config(known.config))
    parser = HfArgumentParser((ExperimentArguments, CSRTrainingArguments))
    valid = {f.name for dc in (ExperimentArguments, CSRTrainingArguments) for f in fields(dc) if f.init}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} in {known.config or 'the recipe defaults'}; valid names are the fields of "
            "ExperimentArguments and CSRTrainingArguments (see --help)."
        )
    values = _check_value_types(values, known.config or "the recipe defaults")
    parser.add_argument("--config", help="YAML file of settings (overridden by command-line flags).")
    parser.set_defaults(**values)
    if "output_dir" not in values and "--output_dir" not in rest and "--output-dir" not in rest:
        parser.set_defaults(output_dir="outputs/run")
    outputs = parser.parse_args_into_dataclasses(rest)  # (experiment, training, namespace with `config`)
    return outputs[0], outputs[1]


def _read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of setting: value; got {type(data).__name__}.")
    return data


def _field_kinds() -> Dict[str, Tuple[type, ...]]:
    """Per setting, the YAML value types it accepts (``str`` is always parsed by argparse as on the command line)."""
    import typing

    kinds: Dict[str, Tuple[type, ...]] = {}
    for dc in (ExperimentArguments, CSRTrainingArguments):
        hints = typing.get_type_hints(dc)
        for f in fields(dc):
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            accepted = set()
            for arg in args:
                origin = typing.get_origin(arg) or arg
                if arg is type(None):
                    accepted.add(type(None))
                elif origin is typing.Literal:
                    accepted.update(type(v) for v in typing.get_args(arg))
                elif isinstance(origin, type) and issubclass(origin, bool):
                    accepted.add(bool)
                elif isinstance(origin, type) and issubclass(origin, float):
                    accepted.update((float, int))
                elif isinstance(origin, type) and issubclass(origin, int):
                    accepted.add(int)
                elif isinstance(origin, type) and issubclass(origin, str):
                    accepted.add(str)
                elif origin in (list, dict):
                    accepted.add(origin)
                else:
                    accepted.add(object)  # anything else: left to the field's own validation
            kinds[f.name] = tuple(accepted)
    return kinds


def _check_value_types(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    """Refuse YAML / default values of the wrong type with an error naming the setting and the file.

    argparse converts only *string* defaults, so a YAML list, mapping, float for an integer or boolean for a
    number would otherwise reach the arguments unchecked (silently, or as a raw crash much later)."""
    kinds = _field_kinds()
    checked = dict(values)
    for name, value in values.items():
        accepted = kinds.get(name, (object,))
        if object in accepted or isinstance(value, str) or value is None and type(None) in accepted:
            continue  # strings go through argparse's own type conversion, as on the command line
        if name == "backbone_kwargs" and isinstance(value, dict):
            continue
        if set(accepted) <= {str, type(None)} and isinstance(value, (int, float)) and not isinstance(value, bool):
            checked[name] = str(value)  # e.g. `lr_milestones: 100` for a text setting
            continue
        ok = any(isinstance(value, kind) for kind in accepted)
        if isinstance(value, bool) and bool not in accepted:
            ok = False  # YAML `yes` / `true` for a number
        if isinstance(value, float) and float not in accepted:
            ok = False  # 1.5 for an integer setting is not silently truncated
        if not ok:
            names = sorted({"null" if k is type(None) else k.__name__ for k in accepted})
            raise ValueError(
                f"{name} in {source} must be of type {' or '.join(names)}; got {value!r} ({type(value).__name__})."
            )
    return checked


# --------------------------------------------------------------------------- model and data
def load_datasets(experiment: ExperimentArguments, training: CSRTrainingArguments, num_channels: Optional[int] = None):
    """(train, eval) datasets; with ``generated_data``, the train set mixes real and generated images."""
    from .data.sources import load_image_dataset

    common = dict(image_column=experiment.image_column, label_column=experiment.label_column, seed=training.seed,
                  num_channels=num_channels)
    train = load_image_dataset(experiment.dataset, experiment.train_split, limit=experiment.train_limit, **common)
    evaluation = load_image_dataset(experiment.dataset, experiment.eval_split, limit=experiment.eval_limit,
                                    class_names=train.class_names, **common)
    if tuple(train.image_shape) != tuple(evaluation.image_shape):
        raise ValueError(
            f"the {experiment.train_split!r} images of {experiment.dataset!r} are (C, H, W) = {tuple(train.image_shape)} "
            f"but the {experiment.eval_split!r} images are {tuple(evaluation.image_shape)}; both splits must have the "
            "model's geometry."
        )
    if experiment.generated_data:
        generated = _generated_dataset(experiment, training, train.class_names)
        train = MixedImageDataset(train, generated, real_fraction=experiment.real_fraction)
    return train, evaluation


def _generated_dataset(experiment: ExperimentArguments, training: CSRTrainingArguments, class_names: List[str]):
    from .hub import GeneratedImageDataset, convert_generated_data, download_generated_data

    source = experiment.generated_data
    if os.path.isdir(source):
        return GeneratedImageDataset(source)
    paths = [Path(p) if os.path.exists(p) else download_generated_data(p) for p in (s.strip() for s in source.split(",")) if p]
    target = Path(experiment.generated_data_dir or os.path.join(training.output_dir, "generated"))
    if (target / "index.json").exists() or (target / "meta.json").exists():
        try:
            return GeneratedImageDataset(target)
        except (ValueError, FileNotFoundError):
            logger.warning("re-converting the generated data in %s", target)
    return convert_generated_data(paths, target, class_names=class_names, overwrite=True)


def build_model(experiment: ExperimentArguments, training: CSRTrainingArguments, train_dataset) -> RobustImageClassifier:
    """A model for ``experiment.model`` whose classes match the training data."""
    from .hub import PUBLISHED_CHECKPOINTS, load_published

    name, class_names = experiment.model, list(train_dataset.class_names)
    threat = {"norm": training.attack_norm, "eps": float(training.attack_eps)}
    if name in PUBLISHED_CHECKPOINTS or os.path.isfile(name):
        model = load_published(name, backbone=experiment.backbone, class_names=class_names, threat_model=threat)
    elif os.path.isdir(name) or ("/" in name and not timm.is_model(name)):
        model = AutoModelForImageClassification.from_pretrained(name)
    elif timm.is_model(name):
        channels, size = _image_geometry(train_dataset)
        mean = std = None
        if experiment.dataset == "fashion_mnist":
            mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
        model = create_robust_classifier(
            name, class_names=class_names, num_channels=channels, image_size=size, mean=mean, std=std,
            threat_model=threat, **(experiment.backbone_kwargs or {}),
        )
    else:
        raise ValueError(
            f"model {name!r} is neither a timm backbone, a published checkpoint name, an existing file or directory, "
            "nor a Hub repo id."
        )
    if model.config.num_labels != len(class_names):
        raise ValueError(
            f"the model has {model.config.num_labels} classes but the dataset {experiment.dataset!r} has "
            f"{len(class_names)}; pick a matching checkpoint or dataset."
        )
    model.config.threat_model = threat
    return model


def _image_geometry(dataset) -> Tuple[int, int]:
    real = getattr(dataset, "real", dataset)
    channels, height, _ = tuple(torch.as_tensor(real[0]["pixel_values"]).shape)
    return int(channels), int(height)


def training_summary(training: CSRTrainingArguments) -> Dict[str, Any]:
    """The training set-up as the model card shows it."""
    summary = {
        "base_loss": training.base_loss,
        "fairness_method": training.fairness_method,
        "attack": f"PGD-{training.attack_steps} {training.attack_norm} eps={float(training.attack_eps):.5g} "
                  f"step={float(training.attack_step_size):.5g} (BatchNorm: {training.attack_bn_mode})",
        "epochs": training.num_train_epochs if training.max_steps in (None, -1) else f"{training.max_steps} steps",
        "learning_rate": training.learning_rate,
        "lr_milestones": training.lr_milestones,
        "batch_size": training.per_device_train_batch_size,
        "weight_decay": training.weight_decay,
        "awp_gamma": training.awp_gamma,
        "seed": training.seed,
    }
    if training.base_loss == "trades":
        summary["trades_beta"] = training.trades_beta
    if training.fairness_method == "csr":
        summary.update(csr_variant=training.csr_variant, csr_alpha=training.csr_alpha, csr_gamma=training.csr_gamma,
                       csr_confusion_source=training.csr_confusion_source)
    elif training.fairness_method in ("frl", "faal", "cfa", "wat"):
        prefix = f"{training.fairness_method}_"
        summary.update({f.name: getattr(training, f.name) for f in fields(training) if f.name.startswith(prefix)})
        if training.fairness_method != "faal":
            summary["fairness_val_size"] = training.fairness_val_size
    return summary


# --------------------------------------------------------------------------- the run
def run(experiment: ExperimentArguments, training: CSRTrainingArguments) -> Dict[str, Any]:
    """Train, save, evaluate (results.json, plots, table), write the card, push if asked."""
    # Seed before the model exists: a from-scratch backbone's initial weights come from the global RNG,
    # and the same seed must give the same run (the Trainer only seeds once the model is built).
    set_seed(training.seed)
    train_dataset, eval_dataset = load_datasets(experiment, training)
    model = build_model(experiment, training, train_dataset)
    # The final evaluation runs after training: check its attacks now (AutoAttack's APGD-T needs 4 classes).
    check_attack_list(experiment.final_eval_attacks, "final_eval_attacks", num_classes=model.config.num_labels)
    trainer = CSRTrainer(model=model, args=training, train_dataset=train_dataset, eval_dataset=eval_dataset)
    resume = training.resume_from_checkpoint
    if resume in ("true", "True", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        # A run killed before its first checkpoint simply starts again.
        resume = get_last_checkpoint(training.output_dir) if os.path.isdir(training.output_dir) else None
        logger.info("resuming from %s", resume or "the start (no complete checkpoint yet)")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    results = trainer.evaluate_and_report(
        eval_dataset, attacks=experiment.final_eval_attacks, batch_size=experiment.eval_batch_size,
        training=training_summary(training), dataset_name=experiment.dataset,
    )
    if training.push_to_hub and trainer.is_world_process_zero():
        trainer.push_to_hub()
    return results


def main(defaults: Optional[Mapping[str, Any]] = None, argv: Optional[Sequence[str]] = None) -> int:
    """A recipe's entry point: one clear error line and a non-zero status for every failure (the
    traceback only with ``--log_level debug``); 143 when SIGTERM stopped the run after its checkpoint."""
    from .cli import run_reporting_errors

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a.lower() in ("--log_level=debug", "--log-level=debug") for a in argv) or any(
        a in ("--log_level", "--log-level") and i + 1 < len(argv) and argv[i + 1].lower() == "debug"
        for i, a in enumerate(argv))
    return run_reporting_errors(lambda: _main(defaults, argv), "error", debug=debug, debug_hint="--log_level debug")


def _main(defaults: Optional[Mapping[str, Any]], argv: Sequence[str]) -> int:
    experiment, training = parse_args(argv, defaults)
    results = run(experiment, training)
    atomic_write_json(os.path.join(training.output_dir, "run_summary.json"),
                      {"experiment": asdict(experiment), "training": training_summary(training),
                       "results_file": os.path.join(training.output_dir, "results.json"),
                       "accuracy": {k: v.get("accuracy") for k, v in results.get("attacks", {}).items()}})
    return 0
