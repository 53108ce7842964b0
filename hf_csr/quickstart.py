"""The quick start (``hf-csr quickstart``, the README's main job): PGD-AT vs CSR on Fashion-MNIST, on a CPU.

Trains the same small PreAct-ResNet twice with the same seed and budget -- once with plain PGD-AT,
once with CSR on top -- evaluates both clean and under PGD-20, class by class, and prints a
side-by-side table (average and worst class) with where the checkpoints, logs and cards went.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional

from .experiment import parse_args, run
from .utils import quiet_http_logging

__all__ = ["QUICKSTART_SETTINGS", "run_quickstart", "format_comparison", "attack_label"]

logger = logging.getLogger(__name__)

#: Shared by both runs (Fashion-MNIST, Linf eps = 0.1, a 77k-parameter PreAct-ResNet, 80 steps of 128).
QUICKSTART_SETTINGS: Dict[str, Any] = {
    "model": "preact_resnet_tiny",
    "dataset": "fashion_mnist",
    "eval_limit": 1000,
    "final_eval_attacks": "clean,pgd20",
    "max_steps": 80,
    "per_device_train_batch_size": 128,
    "per_device_eval_batch_size": 500,
    "learning_rate": 0.05,
    "attack_eps": "0.1",
    "attack_steps": 10,
    "crop_padding": 2,
    "logging_steps": 10,
    "save_steps": 40,
    "save_total_limit": 1,
    "eval_attacks": "clean,pgd20",
    "seed": 0,
    "use_cpu": True,
    "report_to": "none",
}

RUNS = {
    "pgd_at": {"fairness_method": "none"},
    "csr": {"fairness_method": "csr", "csr_alpha": 0.3, "csr_variant": "reference", "csr_confusion_source": "ema"},
}


def run_quickstart(output_dir: str = "outputs/quickstart", overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run both trainings; returns ``{run: results}`` (the evaluation's results.json of each)."""
    results, timings = {}, {}
    quiet_http_logging(logging.getLogger().getEffectiveLevel())  # no line per HTTP request
    for name, settings in RUNS.items():
        defaults = {**QUICKSTART_SETTINGS, **settings, "output_dir": os.path.join(output_dir, name)}
        experiment, training = parse_args(list(overrides or []), defaults)
        start = time.perf_counter()
        logger.info("quick start: training %s (%s)", name, training.fairness_method)
        results[name] = run(experiment, training)
        timings[name] = time.perf_counter() - start
    summary = {"output_dir": os.path.abspath(output_dir), "seconds": timings, "results": results}
    return summary


def attack_label(attack: str) -> str:
    """How the table names an attack: ``pgd20`` -> ``PGD-20``, ``cw20`` -> ``CW-20``, ``autoattack`` -> ``AutoAttack``."""
    for prefix, name in (("pgd", "PGD"), ("cw", "CW")):
        if attack.startswith(prefix) and attack[len(prefix):].isdigit():
            return f"{name}-{attack[len(prefix):]}"
    return {"autoattack": "AutoAttack", "worst_of_all": "worst of all"}.get(attack, attack)


def _attacks(results: Dict[str, Any]) -> List[str]:
    """The attacks every run evaluated, in evaluation order; ``worst_of_all`` only when it differs from
    the single attack (two or more attacks besides ``clean``)."""
    runs = list(results.values())
    attacks = [a for a in runs[0]["attacks"] if all(a in run["attacks"] for run in runs)]
    if len([a for a in attacks if a not in ("clean", "worst_of_all")]) < 2:
        attacks = [a for a in attacks if a != "worst_of_all"]
    return attacks


def _row(label: str, entry: Dict[str, Any]) -> List[str]:
    return [label, f"{100 * entry['accuracy']:.1f}", f"{100 * entry['worst_class']['accuracy']:.1f}",
            str(entry["worst_class"]["name"])]


def format_comparison(summary: Dict[str, Any]) -> str:
    """The side-by-side table: per run and evaluated attack, average and worst class, then per class."""
    results = summary["results"]
    names = list(results)
    attacks = _attacks(results)
    lines = ["| run | attack | average (%) | worst class (%) | worst class |", "|---|---|---|---|---|"]
    for name in names:
        for attack in attacks:
            cells = _row(attack_label(attack), results[name]["attacks"][attack])
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    class_names = results[names[0]]["class_names"]
    header = "| class | " + " | ".join(f"{n} {attack_label(a)}" for n in names for a in attacks) + " |"
    lines += ["", header, "|---|" + "---|" * (len(names) * len(attacks))]
    for index, cls in enumerate(class_names):
        cells = []
        for name in names:
            for attack in attacks:
                cells.append(f"{100 * results[name]['attacks'][attack]['per_class_accuracy'][index]:.1f}")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    lines.append("")
    for name in names:
        path = os.path.join(summary["output_dir"], name)
        lines.append(
            f"{name}: {summary['seconds'][name]:.0f} s; model, card and results.json in {path}; "
            f"checkpoints in {path}/checkpoint-*; training log in {path}/checkpoint-*/trainer_state.json"
        )
    return "\n".join(lines)
