"""Run safety for :class:`~hf_csr.CSRTrainer`: checks before training, a divergence guard, a graceful
SIGTERM stop, and honest resumes.

* :func:`preflight` -- everything the trainer can check when it is built, before any training or
  evaluation: the data's image geometry against the model, the evaluation attacks against the class count,
  ``load_best_model_at_end`` against the metrics ``evaluate()`` logs, the weights' finiteness, and a
  model-card file already in ``output_dir`` that the final save would choke on.
* :class:`DivergenceGuard` -- a non-finite gradient (so a NaN/inf loss) stops the run *before* the
  optimizer step, non-finite weights right after it and before any checkpoint: the last checkpoint on
  disk is the last good one. transformers replaces a NaN loss in its logs by the running average
  (``logging_nan_inf_filter``), so the log alone would hide it; this raises
  :class:`TrainingDivergedError` instead.
* :class:`GracefulStop` -- SIGTERM (how SLURM, Kubernetes and most schedulers stop jobs) sets a flag; at
  the next optimizer-step boundary the trainer saves a resumable checkpoint and raises
  :class:`TrainingInterrupted` (the recipes exit with 143 = 128 + SIGTERM). Under DDP the flag is
  all-reduced every step, so all ranks stop at the same step even if only one was signalled. A second
  SIGTERM kills at once.
* :func:`check_checkpoint_files`, :func:`restore_csr_state`, :func:`read_trainer_state` -- a resume
  checks the checkpoint's files first (a truncated ``trainer_state.json``, ``optimizer.pt``,
  ``scheduler.pt`` or ``model.safetensors`` is named), warns when it cannot be an exact continuation
  (``optimizer.pt`` / ``scheduler.pt`` missing; a CSR, attack or optimiser setting changed since the
  checkpoint, named with both values) and refuses a changed ``fairness_method``.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import signal
import threading
from typing import Any, Dict, List, Optional

import torch
from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import get_last_checkpoint

from .validation import check_finite_model, non_finite_tensors

__all__ = [
    "TrainingDivergedError",
    "TrainingInterrupted",
    "DivergenceGuard",
    "GracefulStop",
    "attach",
    "preflight",
    "logged_metric_names",
    "resume_settings",
    "check_checkpoint_files",
    "restore_csr_state",
    "read_trainer_state",
    "EXIT_SIGTERM",
]

logger = logging.getLogger(__name__)

#: Exit status of a run stopped by SIGTERM after saving its checkpoint (the shell's 128 + 15).
EXIT_SIGTERM = 128 + signal.SIGTERM


class TrainingDivergedError(RuntimeError):
    """The loss, the gradients or the weights became NaN or inf; the run stopped before saving them."""


class TrainingInterrupted(RuntimeError):
    """The run received SIGTERM and stopped at a step boundary after saving ``checkpoint``."""

    def __init__(self, message: str, checkpoint: Optional[str] = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def _last_checkpoint(output_dir: str) -> Optional[str]:
    try:
        return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    except OSError:
        return None


# --------------------------------------------------------------------------- divergence guard
class DivergenceGuard(TrainerCallback):
    """Stops training at the first non-finite gradient, weight or logged loss (see the module docstring)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def _fail(self, args, state, what: str) -> None:
        last = _last_checkpoint(args.output_dir)
        kept = f"the last checkpoint, {last}, was written before it and is intact" if last else "no checkpoint was written yet"
        message = (
            f"training diverged at optimizer step {state.global_step + 1}: {what}. The run was stopped before "
            f"saving anything from this step; {kept}. Lower learning_rate (or set max_grad_norm), check the data "
            "for NaN/inf, then resume with --resume_from_checkpoint last or start afresh."
        )
        logger.error(message)
        _restore_sigterm_handler()
        raise TrainingDivergedError(message)

    def _scaled_gradients(self) -> bool:
        # fp16 loss scaling makes inf gradients routine (the scaler skips those steps); the weights
        # check after the step still catches a real divergence.
        return getattr(getattr(self.trainer, "accelerator", None), "scaler", None) is not None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = kwargs.get("model") or self.trainer.model
        if self._scaled_gradients():
            return
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
        if not grads:
            return
        flags = torch.stack([torch.isfinite(g).all() for _, g in grads])
        if not bool(flags.all()):
            bad = [n for (n, _), ok in zip(grads, flags.tolist()) if not ok]
            self._fail(args, state, f"the gradients of {len(bad)} tensor(s) ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                                    "are NaN or inf, i.e. the loss was not finite")

    def on_step_end(self, args, state, control, **kwargs):
        model = kwargs.get("model") or self.trainer.model
        bad = non_finite_tensors(model)
        if bad:
            # global_step was already incremented for this step
            state_view = type("S", (), {"global_step": state.global_step - 1})()
            self._fail(args, state_view, f"the weights of {len(bad)} tensor(s) ({', '.join(bad[:3])}) became NaN or inf")

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss", "base_loss", "csr_psi") + (() if self._scaled_gradients() else ("grad_norm",))
        for key in keys:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._fail(args, state, f"the logged {key} is {value}")


# --------------------------------------------------------------------------- SIGTERM
_HANDLER_LOCK = threading.Lock()
_PREVIOUS_HANDLER: Dict[str, Any] = {}


def _restore_sigterm_handler() -> None:
    with _HANDLER_LOCK:
        if "handler" in _PREVIOUS_HANDLER and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _PREVIOUS_HANDLER.pop("handler"))


class GracefulStop(TrainerCallback):
    """SIGTERM -> save a resumable checkpoint at the next step boundary, then raise :class:`TrainingInterrupted`."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.requested = False
        self.stopping = False

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second SIGTERM: stop now, the default way
            logger.warning("second SIGTERM: exiting without waiting for the checkpoint")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.requested = True
        logger.warning("SIGTERM received: saving a checkpoint at the end of this optimizer step, then stopping")

    def on_train_begin(self, args, state, control, **kwargs):
        self.requested = self.stopping = False
        if threading.current_thread() is not threading.main_thread():
            logger.info("training outside the main thread: SIGTERM is not intercepted")
            return
        with _HANDLER_LOCK:
            _PREVIOUS_HANDLER.setdefault("handler", signal.getsignal(signal.SIGTERM))
            signal.signal(signal.SIGTERM, self._handle)

    def _agreed(self) -> bool:
        """Whether any process was signalled (all-reduced, so every rank decides alike)."""
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            self.requested = self.stopping = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:
            self._interrupt(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        _restore_sigterm_handler()
        if self.stopping:  # no save happened (should not occur); still never report a finished run
            self._interrupt(args, state)

    def _interrupt(self, args, state) -> None:
        _restore_sigterm_handler()
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint):
            checkpoint = _last_checkpoint(args.output_dir)
        message = (
            f"stopped by SIGTERM after optimizer step {state.global_step}; the checkpoint {checkpoint} holds the "
            "run: rerun the same command with --resume_from_checkpoint last (or trainer.train("
            "resume_from_checkpoint=True)) to continue exactly."
        )
        logger.warning(message)
        self.stopping = False
        raise TrainingInterrupted(message, checkpoint)


def attach(trainer) -> None:
    """Add the divergence guard and the SIGTERM stop to ``trainer`` (before its other callbacks run)."""
    trainer.add_callback(DivergenceGuard(trainer))
    trainer.add_callback(GracefulStop(trainer))


# --------------------------------------------------------------------------- before training
def logged_metric_names(attacks, prefixes: List[str], class_names: List[str]) -> List[str]:
    """The metric names ``CSRTrainer.evaluate()`` returns for ``attacks`` (see ``_flatten_report``; all but the
    per-class ones are also logged), which ``metric_for_best_model`` may name."""
    from .evaluation.specs import WORST_OF_ALL, parse_attacks

    configs = parse_attacks(attacks)
    names = [c.name for c in configs] + ([WORST_OF_ALL] if len(configs) > 1 else [])
    metrics = []
    for prefix in prefixes:
        for name in names:
            key = f"{prefix}_{name}"
            metrics += [f"{key}_accuracy", f"{key}_worst_class_accuracy", f"{key}_spectral_norm"]
            metrics += [f"{key}_class/{c}" for c in class_names]
    return metrics


def preflight(trainer, train_dataset, eval_dataset) -> None:
    """Checks :class:`~hf_csr.CSRTrainer` runs when it is built (see the module docstring)."""
    args, model = trainer.args, trainer.model
    # The images' geometry and the card files in output_dir are checked by the trainer before this
    # (hf_csr.models.loading.prepare_training_data, hf_csr.hub.cards.check_card_inputs).
    from .evaluation.specs import check_attack_list

    check_attack_list(args.eval_attacks, "eval_attacks", num_classes=trainer.num_classes)
    if args.load_best_model_at_end:
        metric = args.metric_for_best_model or "loss"
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        prefixes = ["eval"] if not isinstance(eval_dataset, dict) else [f"eval_{k}" for k in eval_dataset]
        logged = logged_metric_names(args.eval_attacks, prefixes, trainer.class_names)
        if key not in logged:
            robust = [m for m in logged if m.endswith("_worst_class_accuracy")]
            raise ValueError(
                f"load_best_model_at_end needs metric_for_best_model to be a metric evaluate() logs; "
                f"{metric!r} ({key}) never is (CSRTrainer.evaluate logs no eval_loss). With eval_attacks = "
                f"{args.eval_attacks!r} it logs e.g. {robust[-1] if robust else logged[0]!r} (set greater_is_better=True)."
            )
    check_finite_model(model, "the model to train")


# --------------------------------------------------------------------------- resume
_RESUME_PREFIXES = ("csr_", "attack_", "awp_", "frl_", "faal_", "cfa_", "wat_", "trades_", "fairness_", "lr_")
_RESUME_NAMES = (
    "base_loss", "augment", "crop_padding", "horizontal_flip", "learning_rate", "weight_decay", "optim", "optim_args",
    "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "lr_scheduler_type",
)
_PLAIN = (str, int, float, bool, type(None))


def resume_settings(args) -> Dict[str, Any]:
    """The settings that decide what a training step does, as plain values (saved in ``csr_state.pt``); the
    fairness method's own settings under their command-line flags (``csr_alpha``, ``frl_tau_clean`` ...)."""
    names = [n for n in vars(args) if n.startswith(_RESUME_PREFIXES) and n != "fairness_config"]
    names += [n for n in _RESUME_NAMES if hasattr(args, n)]
    values = {name: getattr(args, name) for name in names}
    config = getattr(args, "fairness_config", None)
    if config is not None and not isinstance(config, (dict, str)):
        from .fairness.registry import config_flags, get_fairness_method

        for name, flag in config_flags(get_fairness_method(args.fairness_method)).items():
            values[flag] = getattr(config, name)
    settings = {}
    for name in sorted(values):
        value = values[name]
        if isinstance(value, enum.Enum):  # SchedulerType, OptimizerNames: plain values for weights_only loading
            value = value.value
        if isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, float):
            value = float(value)  # PixelValue -> float
        elif isinstance(value, int):
            value = int(value)
        elif isinstance(value, str):
            value = str.__str__(value)
        else:
            value = str(value)
        settings[name] = value
    return settings


def _describe(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def read_trainer_state(path: str) -> TrainerState:
    """``TrainerState.load_from_json`` with an error that names a truncated or malformed file."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
            raise ValueError("it holds no integer global_step")
        return TrainerState(**data)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:
        raise ValueError(
            f"cannot read {path}: {error} (truncated or corrupted); resume from another checkpoint."
        ) from error


def check_checkpoint_files(trainer, checkpoint: str) -> None:
    """Before a resume loads anything: every file of ``checkpoint`` that will be read is readable (errors
    name the file), and a missing optimizer or scheduler state is reported as an inexact continuation."""
    from safetensors import safe_open

    state_file = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(state_file):
        raise ValueError(f"{checkpoint} has no trainer_state.json: it is not a complete Trainer checkpoint.")
    read_trainer_state(state_file)
    weights = os.path.join(checkpoint, "model.safetensors")
    if os.path.isfile(weights):
        try:
            with safe_open(weights, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # SafetensorError has no stable import path
            raise ValueError(
                f"cannot load {weights}: the file is truncated or corrupted ({str(error).splitlines()[0]}); resume "
                "from another checkpoint."
            ) from error
    missing = []
    for name in ("optimizer.pt", "scheduler.pt"):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            missing.append(name)
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise ValueError(
                f"cannot load {path}: torch.load(weights_only=True) rejected it ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); it is truncated, corrupted or not a tensor "
                "file. Resume from another checkpoint, or delete it to resume without the optimizer state."
            ) from error
    if missing:
        logger.warning(
            "resuming from %s without %s: transformers then restores neither the optimizer (SGD momentum) nor the "
            "learning-rate schedule, which start afresh -- this is NOT an exact continuation of the run, its "
            "weights will differ from an uninterrupted run's.", checkpoint, " and ".join(missing),
        )
        trainer.resume_warnings = getattr(trainer, "resume_warnings", []) + [f"missing {name}" for name in missing]


def restore_csr_state(trainer, checkpoint: str, file_name: str) -> None:
    """Load ``csr_state.pt`` of ``checkpoint`` into ``trainer``, comparing its recorded settings first."""
    path = os.path.join(checkpoint, file_name)
    if not os.path.isfile(path):
        raise ValueError(
            f"{checkpoint} has no {file_name}: it was not written by CSRTrainer (or is incomplete), so the "
            "confusion estimate cannot be restored. Resume from a CSRTrainer checkpoint."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # refused pickle (code in it), truncated or corrupted file
        raise ValueError(
            f"cannot load {path}: torch.load(weights_only=True) rejected it ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). It is truncated, corrupted or holds more than "
            "tensors and plain containers; resume from another checkpoint."
        ) from error
    if not isinstance(state, dict) or not (isinstance(state.get("fairness"), dict) or isinstance(state.get("confusion"), dict)):
        raise ValueError(
            f"{path} is not a CSRTrainer state: expected a dict with a 'fairness' dict (or, from older versions, a "
            f"'confusion' dict), got "
            f"{type(state).__name__}{' with keys ' + str(sorted(map(str, state))) if isinstance(state, dict) else ''}."
        )
    _compare_settings(trainer, state, path)
    estimator = getattr(trainer.fairness, "confusion", None)  # CSR's confusion estimate, if the method keeps one
    momentum = getattr(estimator, "momentum", None)
    try:
        trainer.load_csr_state_dict(state)
    except ValueError as error:
        raise ValueError(f"cannot resume from {path}: {error}") from error
    except (KeyError, TypeError, AttributeError, RuntimeError, IndexError) as error:
        raise ValueError(
            f"{path} is malformed ({type(error).__name__}: {error}); it is not the state of a CSRTrainer with these "
            "settings. Resume from another checkpoint."
        ) from error
    if estimator is not None and momentum is not None:
        estimator.momentum = momentum  # the user's setting wins (a change was warned about above)


def _compare_settings(trainer, state: Dict[str, Any], path: str) -> None:
    args = trainer.args
    saved = state.get("settings")
    if not isinstance(saved, dict):
        # Checkpoints from before the settings record: what the state itself tells.
        fairness = state.get("fairness")
        name = fairness.get("name") if isinstance(fairness, dict) else None
        confusion = state.get("confusion")
        if not isinstance(confusion, dict):  # plug-in layout: CSR's estimate inside the method's state
            method_state = fairness.get("state") if isinstance(fairness, dict) else None
            confusion = method_state.get("confusion") if isinstance(method_state, dict) else None
        confusion = confusion if isinstance(confusion, dict) else {"source": "batch"}
        # Only CSR keeps an 'ema' / 'epoch' estimate; a 'batch' one may be CSR's or that of plain PGD-AT/TRADES.
        if name is None and confusion.get("source") in ("ema", "epoch"):
            name = "csr"
        if name is None:
            name = args.fairness_method if args.fairness_method in ("none", "csr") else "csr or none"
        saved = {"fairness_method": name}
        if confusion.get("source") != "batch" or args.fairness_method == "csr":
            saved.update({"csr_ema_momentum": confusion.get("momentum"), "csr_gamma": confusion.get("gamma"),
                          "csr_variant": confusion.get("variant")})
            if confusion.get("source") != "batch":
                saved["csr_confusion_source"] = confusion.get("source")
    current = resume_settings(args)
    old_method, new_method = saved.get("fairness_method"), current.get("fairness_method")
    if old_method is not None and old_method != new_method:
        raise ValueError(
            f"fairness_method changed: the checkpoint {path} was trained with {old_method!r}, this run has "
            f"{new_method!r}; their states do not carry over. Resume with fairness_method={old_method!r} or start "
            "a new run in another output_dir."
        )
    fixed = ["csr_variant", "csr_gamma"] + (["csr_confusion_source"] if new_method == "csr" else [])
    for key in fixed:  # the confusion estimate cannot carry over to other values of these
        if saved.get(key) is not None and key in current and saved[key] != current[key]:
            raise ValueError(
                f"{key} changed: the checkpoint {path} was trained with {_describe(saved[key])}, this run has "
                f"{_describe(current[key])}; the confusion estimate does not carry over. Resume with {key}="
                f"{saved[key]!r} or start a new run in another output_dir."
            )
    changed = [(k, saved[k], current[k]) for k in sorted(saved) if k in current and saved[k] is not None
               and saved[k] != current[k] and not (isinstance(saved[k], float) and isinstance(current[k], (int, float))
                                                    and math.isclose(saved[k], current[k], rel_tol=1e-12))]
    if changed:
        text = "; ".join(f"{k}: {_describe(a)} in the checkpoint, {_describe(b)} now" for k, a, b in changed)
        logger.warning(
            "resuming from %s with changed settings (%s): the run continues with the new values, so it is NOT an "
            "exact continuation of the checkpointed run.", path, text,
        )
        trainer.resume_warnings = getattr(trainer, "resume_warnings", []) + [f"{k} changed" for k, _, _ in changed]
