"""The training recipes' defaults, by name (standard library and PyYAML only).

``recipes/<name>.py`` (the ``accelerate launch`` entry points) and ``hf-csr train --recipe <name>`` both
run :func:`hf_csr.experiment.run_recipe` with these defaults. Precedence: recipe defaults < ``--config``
YAML < command line. A config names its recipe with a ``recipe:`` key, which ``hf-csr train`` follows and
a recipe script checks.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

__all__ = ["RECIPES", "check_recipe", "config_recipe", "recipe_defaults"]

#: name -> (what it is, its defaults)
RECIPES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "train_from_scratch": (
        "adversarial training from scratch, paper Tables 3, 5, 6 (PreAct-ResNet18, CIFAR-10, 200 epochs)",
        {
            "model": "preact_resnet18",
            "dataset": "uoft-cs/cifar10",
            "num_train_epochs": 200,
            "learning_rate": 0.1,
            "lr_milestones": "100,150",
            "per_device_train_batch_size": 128,
            "save_strategy": "epoch",
            "save_total_limit": 2,
            "logging_steps": 50,
            "eval_strategy": "epoch",
            "eval_limit": 1000,
        },
    ),
    "finetune_ddpm_wrn": (
        "2-epoch fine-tune of a published DDPM-data WideResNet with generated data, paper Table 2",
        {
            "model": "wrn28_10_ddpm.dm_cifar10_linf",
            "dataset": "uoft-cs/cifar10",
            "generated_data": "cifar10/1m.npz",
            "real_fraction": 0.3,
            "num_train_epochs": 2,
            "learning_rate": 0.01,
            "per_device_train_batch_size": 128,
            "base_loss": "trades",
            "trades_beta": 5.0,
            "label_smoothing_factor": 0.1,
            "attack_bn_mode": "train",
            "save_strategy": "steps",
            "save_steps": 500,
            "save_total_limit": 2,
            "logging_steps": 50,
        },
    ),
    "finetune_trades_wrn34": (
        "2-epoch fine-tune of a TRADES(-AWP) WRN-34-10, paper Tables 1 and 4",
        {
            "model": "model-wideres-epoch76.pt",
            "backbone": "wrn34_10_trades",
            "dataset": "uoft-cs/cifar10",
            "num_train_epochs": 2,
            "learning_rate": 0.01,
            "per_device_train_batch_size": 128,
            "base_loss": "trades",
            "trades_beta": 6.0,
            "save_strategy": "epoch",
            "logging_steps": 50,
        },
    ),
}


def check_recipe(name: Any, source: str) -> str:
    if name not in RECIPES:
        raise ValueError(f"{source}: unknown recipe {name!r}; the recipes are {sorted(RECIPES)}.")
    return name


def recipe_defaults(name: str) -> Dict[str, Any]:
    """A copy of the defaults of recipe ``name``."""
    return dict(RECIPES[check_recipe(name, "recipe")][1])


def config_recipe(path: str) -> Optional[str]:
    """The ``recipe:`` a YAML config names (None when it names none, or cannot be read: the runner reports that)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or data.get("recipe") is None:
        return None
    return check_recipe(data["recipe"], f"the `recipe:` of {path}")
