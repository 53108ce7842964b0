"""Best-checkpoint selection on a held-out validation split (the paper's protocol).

:func:`split_training_set` carves a class-stratified validation set out of the training set (fixed seed,
removed from training) and optionally long-tails what remains; :class:`BestCheckpointCallback` attacks
the validation set at the end of every epoch and keeps the weights of the epoch with the highest robust
accuracy in ``<output_dir>/best/model.safetensors`` (written atomically), with the history in
``<output_dir>/best/selection.json``. The runner (:func:`hf_csr.experiment.run`) then evaluates both
the final and the best weights.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from transformers import TrainerCallback

from .utils import atomic_write_bytes, atomic_write_json

__all__ = ["split_training_set", "BestCheckpointCallback", "load_best_weights", "BEST_DIR", "SPLIT_SEED"]

logger = logging.getLogger(__name__)

BEST_DIR = "best"
SPLIT_SEED = 0  # the same validation split and long tail for every method and seed (paired design)


def split_training_set(train, *, validation_size: Optional[int] = None,
                       long_tail_ratio: Optional[float] = None) -> Tuple[Any, Optional[Any]]:
    """(training set, validation set or None).

    The validation set is a class-stratified subset of ``validation_size`` images drawn with seed 0 and
    removed from training; the long tail (ratio ``long_tail_ratio``, seed 0) is then drawn from the rest,
    so the validation set stays balanced and both are the same for every method and seed."""
    import numpy as np

    from .data.sampling import long_tail_indices, stratified_subset

    if validation_size is None and long_tail_ratio is None:
        return train, None
    if not hasattr(train, "subset") or not hasattr(train, "labels"):
        raise ValueError(
            f"validation_size and long_tail_ratio need an in-memory image dataset (got {type(train).__name__}); "
            "they cannot be combined with generated_data: drop one or the other."
        )
    labels = np.asarray(train.labels)
    validation = None
    if validation_size is not None:
        if validation_size >= len(labels):
            raise ValueError(f"validation_size ({validation_size}) must be smaller than the training set "
                             f"({len(labels)} images); lower it or raise train_limit.")
        held = stratified_subset(labels, validation_size, seed=SPLIT_SEED)
        validation = train.subset(held, name=f"{train.name}[validation {validation_size}]")
        keep = np.setdiff1d(np.arange(len(labels)), held)
        train = train.subset(keep, name=f"{train.name}[minus validation]")
        labels = labels[keep]
    if long_tail_ratio is not None:
        train = train.subset(long_tail_indices(labels, ratio=long_tail_ratio, seed=SPLIT_SEED),
                             name=f"{train.name}[long-tail {long_tail_ratio:g}]")
    return train, validation


def _state_dict_for_saving(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    # clones: safetensors refuses tensors that share storage (e.g. tied normalisation buffers)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _save_weights_atomic(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(_state_dict_for_saving(model)))  # fsync'd, the user's umask, no torn file


def load_best_weights(model: torch.nn.Module, output_dir) -> Dict[str, Any]:
    """Load ``<output_dir>/best/model.safetensors`` into ``model``; returns the selection record."""
    from safetensors.torch import load_file

    folder = Path(output_dir) / BEST_DIR
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"no best checkpoint in {folder}: the run had no validation epoch (set validation_size "
                         "and train at least one epoch).")
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in load_file(str(weights)).items()})
    return json.loads((folder / "selection.json").read_text(encoding="utf-8"))


class BestCheckpointCallback(TrainerCallback):
    """At each epoch end, the robust accuracy under ``attack`` on ``validation``; the best epoch's weights
    are kept (ties keep the earlier epoch). Set :attr:`trainer` before training.

    The record survives a resumed run: an existing ``selection.json`` supplies the best score so far."""

    def __init__(self, validation, output_dir, attack: str = "pgd10"):
        self.validation = validation
        self.attack = attack
        self.folder = Path(output_dir) / BEST_DIR
        self.trainer = None
        record = self.folder / "selection.json"
        self.record: Dict[str, Any] = {"attack": attack, "metric": f"{attack} accuracy on the validation split",
                                       "validation_size": len(validation), "best_epoch": None, "best_score": None,
                                       "history": []}
        if record.is_file() and (self.folder / "model.safetensors").is_file():
            self.record = json.loads(record.read_text(encoding="utf-8"))

    def start_fresh(self) -> None:
        """Forget a record left by an earlier attempt of this run (training starts again from the first step, so
        its best epoch no longer exists): the record is emptied and its weights removed."""
        if self.record["history"]:
            logger.info("training starts from the first step: the best-epoch record left in %s is discarded", self.folder)
        self.record.update(best_epoch=None, best_score=None, history=[])
        self.record.pop("best_step", None)
        for name in ("selection.json", "model.safetensors"):
            (self.folder / name).unlink(missing_ok=True)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise ValueError("BestCheckpointCallback.trainer is not set: assign the trainer before training.")
        report = self.trainer.robustness_report(self.validation, f"clean,{self.attack}")
        decision: List[Any] = [None]
        if report is not None:
            attacks = report.to_dict()["attacks"]
            entry = attacks[self.attack]
            epoch = max(1, math.ceil((state.epoch or 0) - 1e-6))  # 1-based; a partial (max_steps) epoch counts
            score = float(entry["accuracy"])
            history = [h for h in self.record["history"] if h["epoch"] != epoch]
            history.append({"epoch": epoch, "step": state.global_step, "accuracy": score,
                            "worst_class_accuracy": float(entry["worst_class"]["accuracy"]),
                            "clean_accuracy": float(attacks["clean"]["accuracy"])})
            self.record["history"] = sorted(history, key=lambda h: h["epoch"])
            best = self.record["best_score"]
            decision = [best is None or score > best or self.record["best_epoch"] == epoch]
            if decision[0]:
                self.record.update(best_epoch=epoch, best_score=score, best_step=state.global_step)
                _save_weights_atomic(self.trainer.accelerator.unwrap_model(self.trainer.model), self.folder / "model.safetensors")
            atomic_write_json(self.folder / "selection.json", self.record)
            logger.info("epoch %d: validation %s accuracy %.4f (best: epoch %s, %.4f)", epoch, self.attack, score,
                        self.record["best_epoch"], self.record["best_score"])
        self.trainer.accelerator.wait_for_everyone()
        return control
