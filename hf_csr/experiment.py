"""What every recipe does: arguments (with ``--config`` YAML), model and data, train, evaluate, card, push.

``recipes/*.py`` are thin scripts over :func:`main`, each with its own defaults::

    accelerate launch recipes/train_from_scratch.py --config recipes/configs/table3_cifar10_csr_gamma0.yaml

Precedence: recipe defaults < ``--config`` YAML < command-line flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import yaml
from accelerate import PartialState
from transformers import AutoModelForImageClassification, HfArgumentParser, TrainerCallback, set_seed

from .configuration import CSRTrainingArguments
from .data import DATASETS, MixedImageDataset
from .models import RobustImageClassifier, create_robust_classifier
from .selection import BEST_DIR, BestCheckpointCallback, load_best_weights, split_training_set
from .trainer import CSRTrainer
from .utils import atomic_write_bytes, atomic_write_json, launched_processes, process_log_level, setup_console_logging
from .validation import check_choice

__all__ = ["ExperimentArguments", "parse_args", "build_model", "load_datasets", "run", "main", "run_recipe",
           "training_summary", "check_launch", "FinalEvaluationFollows"]

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
    real_fraction: float = field(
        default=0.3,
        metadata={"help": "Share of real images per global batch when generated data is used: B - int((1 - "
                          "real_fraction) * B) real images (a fresh shuffle of the real set, slice after slice), the "
                          "rest generated images drawn uniformly with replacement, as DM-Improves-AT's sampler."},
    )
    generated_epoch_batches: Optional[int] = field(
        default=None,
        metadata={"help": "Global batches per epoch when generated data is used; default ceil(n_real / B), as "
                          "DM-Improves-AT (391 for CIFAR-10 at B = 128), whatever the size of the generated set."},
    )
    final_eval_attacks: str = field(
        default="clean,pgd20,cw20,autoattack",
        metadata={"help": "Attacks of the final evaluation written to results.json and the model card."},
    )
    eval_batch_size: Optional[int] = field(default=None, metadata={"help": "Batch size of the final evaluation."})
    subset_seed: Optional[int] = field(
        default=None,
        metadata={"help": "Seed of the train_limit / eval_limit subsets (default: the training seed); fix it (e.g. 0) "
                          "for the same images in every seed's run."},
    )
    long_tail_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "Long-tail the training set by exponential subsampling (n_c = n_max * ratio^(-c/(K-1)), "
                          "hf_csr.data.sampling.long_tail_indices) with seed 0, so every method and seed sees the same "
                          "data; e.g. 100. Drawn after the validation split is removed."},
    )
    validation_size: Optional[int] = field(
        default=None,
        metadata={"help": "Hold out this many training images (class-stratified, seed 0, removed from training); at "
                          "each epoch end the robust accuracy on them under validation_attack picks the best epoch, "
                          "whose weights are kept in <output_dir>/best and evaluated beside the final ones "
                          "(<output_dir>/best/results.json)."},
    )
    validation_attack: str = field(
        default="pgd10", metadata={"help": "Attack of the per-epoch validation (pgd<steps> at the training eps)."}
    )
    extra_eval: Optional[str] = field(
        default=None,
        metadata={"help": "A second final evaluation on a fixed class-balanced subset, as 'attacks@examples', e.g. "
                          "'autoattack@1000' (standard AutoAttack on 1,000 images, seed 0, as a gradient-masking check), "
                          "written to <output_dir>/extra_eval (results.json and plots)."},
    )
    extra_eval_on: str = field(
        default="both",
        metadata={"help": "Which weights the extra_eval evaluates when there is a validation split: 'both' (final and "
                          "best), 'final' or 'best' (the checkpoint the paper's protocol reports).",
                  "choices": ["both", "final", "best"]},
    )

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
        if self.long_tail_ratio is not None and self.long_tail_ratio < 1:
            raise ValueError(f"long_tail_ratio must be >= 1 (head count / tail count) or None; got {self.long_tail_ratio}.")
        if self.extra_eval is not None:
            _parse_extra_eval(self.extra_eval)
        check_choice("extra_eval_on", self.extra_eval_on, ("both", "final", "best"))
        for name in ("train_limit", "eval_limit", "eval_batch_size", "generated_epoch_batches", "validation_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None; got {value}.")


def _parse_extra_eval(text: str) -> Tuple[str, int]:
    attacks, sep, examples = str(text).rpartition("@")
    if not sep or not attacks or not examples.isdigit() or int(examples) < 1:
        raise ValueError(f"extra_eval must read 'attacks@examples', e.g. 'autoattack@1000'; got {text!r}.")
    return attacks, int(examples)


# --------------------------------------------------------------------------- arguments
def fairness_flags_dataclass():
    """A dataclass with one field per fairness-method flag of every registered method (built-ins included),
    for ``HfArgumentParser``: ``--csr_alpha``, ``--frl_tau_clean``, ``--fairness_val_size`` ...

    A flag's default is its method's default (None when methods sharing it disagree: then the method's
    own default applies); its help names the method(s) it belongs to."""
    from .fairness.registry import all_method_flags, get_fairness_method

    specs = []
    for flag, owners in sorted(all_method_flags().items()):
        method_name, field_name, first = owners[0]
        defaults = {repr(o[2].default) for o in owners}
        shared_default = first.default if len(defaults) == 1 and first.default is not MISSING else None
        # config modules may use `from __future__ import annotations`: resolve the type
        annotation = typing.get_type_hints(get_fairness_method(method_name).config_class)[field_name]
        if shared_default is None and type(None) not in typing.get_args(annotation):
            annotation = Optional[annotation]
        methods = ", ".join(sorted({o[0] for o in owners}))
        metadata = {k: v for k, v in first.metadata.items() if k in ("help", "choices")}
        metadata["help"] = f"[fairness_method {methods}] {metadata.get('help', '')}".strip()
        specs.append((flag, annotation, field(default=shared_default, metadata=metadata)))
    return make_dataclass("FairnessMethodFlags", specs)


def parse_args(
    argv: Optional[Sequence[str]] = None, defaults: Optional[Mapping[str, Any]] = None, *,
    recipe: Optional[str] = None, prog: Optional[str] = None,
) -> Tuple[ExperimentArguments, CSRTrainingArguments]:
    """Parse ``argv`` (default ``sys.argv[1:]``) with HfArgumentParser; ``--config file.yaml`` supplies
    values between the recipe's ``defaults`` and the command line.

    ``recipe`` names the recipe being run (:mod:`hf_csr.recipes`): its defaults apply when ``defaults`` is
    None, and a config whose ``recipe:`` key names another recipe is refused. ``prog``: the program name
    in ``--help`` and errors (default: the script's name)."""
    from .arguments import DefaultsHelpFormatter
    from .recipes import RECIPES, check_recipe, recipe_defaults

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    config = _read_config(known.config) if known.config else {}
    named = config.pop("recipe", None)
    if named is not None:
        check_recipe(named, f"the `recipe:` of {known.config}")
        if recipe is not None and named != recipe:
            raise ValueError(
                f"{known.config} is a config of the recipe {named!r}, not {recipe!r}: run recipes/{named}.py with it "
                f"(or `hf-csr train --config {known.config}`)."
            )
    recipe = recipe or named
    if defaults is None and recipe is not None:
        defaults = recipe_defaults(recipe)
    values: Dict[str, Any] = {**(defaults or {}), **config}
    flags_class = fairness_flags_dataclass()
    parser = HfArgumentParser((ExperimentArguments, CSRTrainingArguments, flags_class), prog=prog,
                              usage="%(prog)s [-h] [--config YAML] [--SETTING VALUE ...]",
                              description=f"The recipe {recipe}: {RECIPES[recipe][0]}." if recipe else None,
                              formatter_class=DefaultsHelpFormatter)
    groups = [[f.name for f in fields(dc) if f.init] for dc in (ExperimentArguments, CSRTrainingArguments, flags_class)]
    valid = {name for group in groups for name in group}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} in {known.config or 'the recipe defaults'}; valid names are the fields of "
            "ExperimentArguments and CSRTrainingArguments and the fairness methods' flags (see --help)."
        )
    values = _check_value_types(values, known.config or "the recipe defaults")
    parser.add_argument("--config", help="YAML file of settings (overridden by command-line flags).")
    _group_help(parser, groups)
    parser.set_defaults(**values)
    if "output_dir" not in values and "--output_dir" not in rest and "--output-dir" not in rest:
        parser.set_defaults(output_dir="outputs/run")
    namespace = vars(parser.parse_args(rest))
    experiment = ExperimentArguments(**{name: namespace[name] for name in groups[0]})
    training_values = {name: namespace[name] for name in groups[1]}
    training_values.update(_method_settings(training_values["fairness_method"], namespace, flags_class))
    return experiment, CSRTrainingArguments(**training_values)


def _group_help(parser: argparse.ArgumentParser, groups: List[List[str]]) -> None:
    """Sort the options of ``--help`` into groups, hf_csr's own first: the experiment (model and data), the
    fairness method, adversarial training and its attack, then the inherited transformers TrainingArguments
    (with the paper's defaults where hf_csr sets them)."""
    from transformers import TrainingArguments

    inherited = {f.name for f in fields(TrainingArguments)}
    experiment, training, flags = (set(g) for g in groups)
    fairness = flags | {"fairness_method", "fairness_config"}
    titles = {
        "experiment": ("experiment (hf_csr.experiment.ExperimentArguments)", "model, data and final evaluation"),
        "fairness": ("fairness method (hf_csr.fairness)", "the method and its settings; each flag names its method(s)"),
        "adversarial": ("adversarial training (hf_csr.CSRTrainingArguments)", "base loss, training attack, AWP, "
                        "augmentation and learning-rate milestones"),
        "inherited": ("training (transformers.TrainingArguments)", "inherited; hf_csr sets the paper's defaults for "
                      "the optimizer, learning rate, batch size and weight decay"),
    }
    targets = {key: parser.add_argument_group(title, description) for key, (title, description) in titles.items()}
    default_group = parser._optionals  # HfArgumentParser puts every dataclass field there
    for action in list(default_group._group_actions):
        dest = action.dest
        if dest in experiment:
            key = "experiment"
        elif dest in fairness:
            key = "fairness"
        elif dest in training and dest not in inherited:
            key = "adversarial"
        elif dest in training:
            key = "inherited"
        else:
            continue  # --help, --config
        default_group._group_actions.remove(action)
        targets[key]._group_actions.append(action)


def _method_settings(method: str, namespace: Dict[str, Any], flags_class) -> Dict[str, Any]:
    """The flag values that go to ``CSRTrainingArguments``: the chosen method's (those set), and any other
    method's flag that was set away from its default (so that the arguments name the mistake)."""
    from .fairness.registry import config_flags, get_fairness_method

    try:
        mine = set(config_flags(get_fairness_method(method)).values())
    except ValueError:
        mine = set()  # CSRTrainingArguments names the unknown method
    settings = {}
    for f in fields(flags_class):
        value = namespace[f.name]
        if value is None:
            continue
        if f.name in mine or value != f.default:
            settings[f.name] = value
    return settings


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

    seed = training.seed if experiment.subset_seed is None else experiment.subset_seed
    common = dict(image_column=experiment.image_column, label_column=experiment.label_column, seed=seed,
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
        train = MixedImageDataset(train, generated, real_fraction=experiment.real_fraction,
                                  batches_per_epoch=experiment.generated_epoch_batches)
    return train, evaluation


def _generated_dataset(experiment: ExperimentArguments, training: CSRTrainingArguments, class_names: List[str]):
    """The generated images, prepared once per launch.

    A directory is used as it is (converted ahead with ``hf-csr convert-data``). ``.npz`` files are
    converted into ``generated_data_dir`` by the main process while the other processes wait, then every
    process memory-maps the shards; a finished conversion of the same files (recognised by the
    ``metadata.json`` the converter writes last) is reused, an interrupted one redone. On several nodes,
    each node's first process then does the same, which finds the conversion on a shared filesystem and
    converts again on a node-local one."""
    from .data.generated import GeneratedImageDataset

    source = experiment.generated_data
    if os.path.isdir(source):
        return GeneratedImageDataset(source)
    names = [s.strip() for s in source.split(",") if s.strip()]
    target = Path(experiment.generated_data_dir or os.path.join(training.output_dir, "generated"))
    state = PartialState()

    def prepare() -> None:
        _convert_or_reuse(names, target, class_names)

    _first_then_others(state, state.is_main_process, prepare, "prepare the generated data")
    _first_then_others(state, state.is_local_main_process and not state.is_main_process, prepare,
                       "prepare the generated data")
    return GeneratedImageDataset(target)


def _convert_or_reuse(names: List[str], target: Path, class_names: List[str]) -> None:
    from .data.generated import convert_generated_data, download_generated_data, find_conversion

    paths = [Path(p) if os.path.exists(p) else download_generated_data(p) for p in names]
    if find_conversion(target, paths, num_classes=len(class_names)) is not None:
        logger.info("reusing the converted generated data in %s", target)
        return
    logger.info("converting %s into %s (the other processes wait)", ", ".join(map(str, paths)), target)
    convert_generated_data(paths, target, class_names=class_names, overwrite=True)


def _first_then_others(state: PartialState, does_work: bool, work, what: str) -> None:
    """``work()`` on the processes with ``does_work`` while the others wait; a failure stops every process
    with the error (instead of leaving the others waiting at a barrier)."""
    error = None
    if does_work:
        try:
            work()
        except Exception as exception:  # re-raised below, after the others heard of it
            if state.num_processes == 1:
                raise
            error = exception
    if state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    failures = [f for f in gather_object([None if error is None else f"{type(error).__name__}: {error}"]) if f]
    if error is not None:
        raise error
    if failures:
        raise RuntimeError(f"another process failed to {what}: {failures[0]}")


def check_launch(training: Optional[CSRTrainingArguments] = None) -> None:
    """Stop at start when the launcher started several processes that did not join one process group.

    ``accelerate launch``/``torchrun`` set ``WORLD_SIZE`` for every process they start; if the state built
    from the training arguments still has one process (e.g. a multi-process CPU launch without
    ``--use_cpu``, where each process finds no GPU and falls back to a single-process run), every process
    would train alone on the full data and they would collide on the output directory."""
    launched = launched_processes()
    if training is not None:
        training.device  # noqa: B018  (sets up the distributed state as the Trainer would)
    joined = PartialState().num_processes
    if launched > 1 and joined == 1:
        raise ValueError(
            f"the launcher started {launched} processes (WORLD_SIZE={os.environ.get('WORLD_SIZE')}) but they did not "
            "form one process group: each would train alone on all the data. On a machine without GPUs add "
            "--use_cpu to the recipe's arguments, e.g. `accelerate launch --config_file "
            "recipes/accelerate_configs/cpu_2proc.yaml recipes/finetune_ddpm_wrn.py ... --use_cpu` (or `torchrun "
            "--nproc_per_node 2 recipes/... --use_cpu`); on GPUs, check that every process sees a GPU "
            "(CUDA_VISIBLE_DEVICES) and that the accelerate config's num_processes matches them."
        )


def build_model(experiment: ExperimentArguments, training: CSRTrainingArguments, train_dataset) -> RobustImageClassifier:
    """A model for ``experiment.model`` whose classes match the training data."""
    from .models.published import PUBLISHED_CHECKPOINTS, load_published

    name, class_names = experiment.model, list(train_dataset.class_names)
    threat = {"norm": training.attack_norm, "eps": float(training.attack_eps)}
    if name in PUBLISHED_CHECKPOINTS or os.path.isfile(name):
        model = load_published(name, backbone=experiment.backbone, class_names=class_names, threat_model=threat)
    elif os.path.isdir(name) or ("/" in name and not timm.is_model(name)):
        model = AutoModelForImageClassification.from_pretrained(name)
    elif timm.is_model(name):
        channels, size = _image_geometry(train_dataset)
        info = DATASETS.get(experiment.dataset)  # a registered dataset's statistics; else the backbone's
        mean, std = (info.mean, info.std) if info is not None and info.num_channels == channels else (None, None)
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


def training_summary(training: CSRTrainingArguments, method=None) -> Dict[str, Any]:
    """The training set-up as the model card shows it; the fairness method's part is its ``card_fields()``
    (``method``: the trainer's method instance; without it, the config's fields under their flags)."""
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
    if training.label_smoothing_factor:
        summary["label_smoothing"] = training.label_smoothing_factor
    if training.max_grad_norm:
        summary["max_grad_norm"] = training.max_grad_norm  # gradient clipping (off by default, as in the originals)
    if method is not None:
        summary.update(method.card_fields())
    else:
        from .fairness.registry import config_flags, get_fairness_method

        flags = config_flags(get_fairness_method(training.fairness_method))
        summary.update({flag: getattr(training.fairness_config, name) for name, flag in flags.items()})
    return summary


# --------------------------------------------------------------------------- the run
class FinalEvaluationFollows(TrainerCallback):
    """The run evaluates once at the end: drop the Trainer's own evaluation of the last step.

    With ``eval_strategy`` ``epoch`` or ``steps`` the Trainer evaluates at the last step (``eval_attacks`` on the
    eval set) just before :func:`run`'s final evaluation of the same set (``final_eval_attacks``, written to
    ``results.json``): the same work twice. The evaluations during training are kept; so is the last one when
    it chooses a checkpoint (``metric_for_best_model`` / ``load_best_model_at_end``)."""

    def _drop_last(self, args, state, control):
        if state.max_steps > 0 and state.global_step >= state.max_steps and args.metric_for_best_model is None:
            control.should_evaluate = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._drop_last(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._drop_last(args, state, control)


def run(experiment: ExperimentArguments, training: CSRTrainingArguments) -> Dict[str, Any]:
    """Train, save, evaluate once (results.json, plots, table), write the card, push if asked.

    Returns the final evaluation's results (``results.json``'s content) and ``training_summary``. With an
    ``eval_strategy``, the evaluations during training stay; the one of the last step is left to the final
    evaluation (:class:`FinalEvaluationFollows`)."""
    check_launch(training)
    # Seed before the model exists: a from-scratch backbone's initial weights come from the global RNG,
    # and the same seed must give the same run (the Trainer only seeds once the model is built).
    set_seed(training.seed)
    train_dataset, eval_dataset = load_datasets(experiment, training)
    train_dataset, validation_dataset = split_training_set(
        train_dataset, validation_size=experiment.validation_size, long_tail_ratio=experiment.long_tail_ratio)
    model = build_model(experiment, training, train_dataset)
    # The final evaluation runs after training: check its attacks now (AutoAttack's APGD-T needs 4 classes).
    from .evaluation.specs import check_attack_list

    check_attack_list(experiment.final_eval_attacks, "final_eval_attacks", num_classes=model.config.num_labels)
    if experiment.validation_size is not None:
        check_attack_list(experiment.validation_attack, "validation_attack", num_classes=model.config.num_labels)
    if experiment.extra_eval:
        check_attack_list(_parse_extra_eval(experiment.extra_eval)[0], "extra_eval", num_classes=model.config.num_labels)
    trainer = CSRTrainer(model=model, args=training, train_dataset=train_dataset, eval_dataset=eval_dataset)
    trainer.add_callback(FinalEvaluationFollows())
    selection = None
    if validation_dataset is not None:
        selection = BestCheckpointCallback(validation_dataset, training.output_dir, experiment.validation_attack)
        selection.trainer = trainer
        trainer.add_callback(selection)
    resume = training.resume_from_checkpoint
    if resume in ("true", "True", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        # A run killed before its first checkpoint simply starts again.
        resume = get_last_checkpoint(training.output_dir) if os.path.isdir(training.output_dir) else None
        logger.info("resuming from %s", resume or "the start (no complete checkpoint yet)")
    if selection is not None and not resume:
        selection.start_fresh()  # a killed earlier attempt's best epoch belongs to weights that are gone
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(_internal_call=True)  # no push yet: one push below, with the evaluation and card
    summary = training_summary(training, trainer.fairness)
    results = trainer.evaluate_and_report(  # the card's training set-up comes from the trainer's own args
        eval_dataset, attacks=experiment.final_eval_attacks, batch_size=experiment.eval_batch_size,
        dataset_name=experiment.dataset,
    )
    results = _final_extras(experiment, training, trainer, eval_dataset, results, selection)
    if training.push_to_hub:
        trainer.push_to_hub()  # on every process: it saves (collectively) first, then the main process uploads
    return {**results, "training_summary": summary}


EXTRA_EVAL_DIR = "extra_eval"


def _final_extras(experiment: ExperimentArguments, training: CSRTrainingArguments, trainer: CSRTrainer, eval_dataset,
                  results: Dict[str, Any], selection) -> Dict[str, Any]:
    """The extra subset evaluation (``extra_eval``) and, with a validation split, the same evaluations of the
    best epoch's weights in ``<output_dir>/best`` (the final weights are put back afterwards).

    When the best epoch is the last one (the best weights equal the final ones, tensor for tensor), the best
    checkpoint's evaluation is the final one: its files are copied into ``best/`` rather than computed again, and
    the selection record says ``same_as_final``."""
    def extra(output_dir: str) -> Dict[str, Any]:
        attacks, examples = _parse_extra_eval(experiment.extra_eval)
        subset = eval_dataset
        if examples < len(eval_dataset):  # seed 0: the same images for every run, whatever its training seed
            from .data.sampling import stratified_subset

            subset = eval_dataset.subset(stratified_subset(eval_dataset.labels.numpy(), examples, seed=0))
        return trainer.evaluate_and_report(subset, attacks=attacks, batch_size=experiment.eval_batch_size,
                                           output_dir=os.path.join(output_dir, EXTRA_EVAL_DIR),
                                           dataset_name=experiment.dataset)

    extra_on_final = bool(experiment.extra_eval) and (selection is None or experiment.extra_eval_on != "best")
    extra_on_best = bool(experiment.extra_eval) and selection is not None and experiment.extra_eval_on != "final"
    if selection is None:
        return {**results, "extra_eval": extra(training.output_dir)} if extra_on_final else results
    model = trainer.accelerator.unwrap_model(trainer.model)
    final_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best_dir = os.path.join(training.output_dir, BEST_DIR)
    record = load_best_weights(model, training.output_dir)
    same = all(torch.equal(value, final_weights[key]) for key, value in model.state_dict().items())
    record = {**record, "same_as_final": same}
    if same:
        # One evaluation serves both: the final one (with the extra one if either checkpoint asks for it).
        model.load_state_dict(final_weights)
        if extra_on_final or extra_on_best:
            results = {**results, "extra_eval": extra(training.output_dir)}
        if trainer.accelerator.is_main_process:
            _copy_evaluation(training.output_dir, best_dir)
            if extra_on_best:
                _copy_evaluation(os.path.join(training.output_dir, EXTRA_EVAL_DIR), os.path.join(best_dir, EXTRA_EVAL_DIR))
            atomic_write_json(Path(best_dir) / "selection.json", record)
        trainer.accelerator.wait_for_everyone()
        best = {k: v for k, v in results.items() if k != "extra_eval" or extra_on_best}
        if not extra_on_final:
            results = {k: v for k, v in results.items() if k != "extra_eval"}
        return {**results, "best": {**best, "selection": record}}
    if extra_on_final:
        model.load_state_dict(final_weights)
        results = {**results, "extra_eval": extra(training.output_dir)}
        load_best_weights(model, training.output_dir)
    best = trainer.evaluate_and_report(eval_dataset, attacks=experiment.final_eval_attacks,
                                       batch_size=experiment.eval_batch_size, output_dir=best_dir,
                                       dataset_name=experiment.dataset)
    if extra_on_best:
        best = {**best, "extra_eval": extra(best_dir)}
    if trainer.accelerator.is_main_process:
        atomic_write_json(Path(best_dir) / "selection.json", record)
    model.load_state_dict(final_weights)
    return {**results, "best": {**best, "selection": record}}


EVALUATION_FILES = ("results.json", "results.md", "classwise_accuracy.png", "confusion_matrix.png", "card.json", "README.md")


def _copy_evaluation(source: str, target: str) -> None:
    """Copy the files an evaluation wrote (results, table, plots, card) from ``source`` to ``target``."""
    os.makedirs(target, exist_ok=True)
    for name in EVALUATION_FILES:
        if os.path.isfile(os.path.join(source, name)):
            atomic_write_bytes(Path(target) / name, Path(source, name).read_bytes())


def main(defaults: Optional[Mapping[str, Any]] = None, argv: Optional[Sequence[str]] = None, *,
         recipe: Optional[str] = None, prog: Optional[str] = None) -> int:
    """A recipe's entry point: one clear error line and a non-zero status for every failure (the
    traceback only with ``--log_level debug``); 143 when SIGTERM stopped the run after its checkpoint.
    ``recipe``: a name of :data:`hf_csr.recipes.RECIPES`, whose defaults apply when ``defaults`` is None."""
    from .cli import run_reporting_errors

    setup_console_logging(logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a.lower() in ("--log_level=debug", "--log-level=debug") for a in argv) or any(
        a in ("--log_level", "--log-level") and i + 1 < len(argv) and argv[i + 1].lower() == "debug"
        for i, a in enumerate(argv))
    return run_reporting_errors(lambda: _main(defaults, argv, recipe, prog), f"{prog}: error" if prog else "error",
                                debug=debug, debug_hint="--log_level debug")


def run_recipe(recipe: str, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run the recipe ``recipe`` (:data:`hf_csr.recipes.RECIPES`) on ``argv``: ``recipes/<recipe>.py`` and
    ``hf-csr train`` are this call."""
    return main(argv=argv, recipe=recipe, prog=prog)


def _main(defaults: Optional[Mapping[str, Any]], argv: Sequence[str], recipe: Optional[str] = None,
          prog: Optional[str] = None) -> int:
    experiment, training = parse_args(argv, defaults, recipe=recipe, prog=prog)
    setup_console_logging(process_log_level(training))  # INFO on the main process, WARNING on the others
    results = run(experiment, training)  # run() checks the launch first
    atomic_write_json(os.path.join(training.output_dir, "run_summary.json"),
                      {"experiment": asdict(experiment), "training": results.get("training_summary") or training_summary(training),
                       "results_file": os.path.join(training.output_dir, "results.json"),
                       "accuracy": {k: v.get("accuracy") for k, v in results.get("attacks", {}).items()}})
    return 0
