"""``CSRTrainingArguments``: the Trainer's arguments plus adversarial training, AWP and the choice of
fairness method.

Every field has a ``help`` (shown by ``HfArgumentParser``) and enums list their ``choices``;
``__post_init__`` validates everything with errors that name the argument and the allowed values,
then hands over to ``TrainingArguments.__post_init__``. Budgets accept pixel units: ``8/255`` on the
command line or in YAML.

A fairness method's own settings (CSR's ``alpha``, FRL's ``tau_clean`` ...) are not fields here: they
are the method's config dataclass (:mod:`hf_csr.fairness`), held in ``fairness_config``. For
convenience the constructor also takes them as keywords under their flag names, exactly as on the
command line -- ``CSRTrainingArguments(..., csr_alpha=0.3, csr_gamma=0.1)`` is
``CSRTrainingArguments(..., fairness_config=CSRConfig(alpha=0.3, gamma=0.1))``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from .attacks import BN_MODES, NORMS, RANDOM_STARTS
from .fairness.registry import reserve_setting_names
from .utils import parse_pixel_value
from .validation import MAX_ATTACK_STEPS, MAX_CROP_PADDING, check_budget, check_choice, check_positive_int

__all__ = ["CSRTrainingArguments", "PixelValue", "BASE_LOSSES", "resolve_fairness_config"]

BASE_LOSSES = ("pgd", "trades")


class PixelValue(float):
    """A float that also parses fractions such as ``8/255`` (used as the argparse type)."""

    def __new__(cls, value):
        return super().__new__(cls, parse_pixel_value(value))


def _choice(default, choices, help_text):
    return field(default=default, metadata={"help": f"{help_text} Choices: {', '.join(map(str, choices))}.", "choices": list(choices)})


@dataclass
class CSRTrainingArguments(TrainingArguments):
    """Arguments for :class:`hf_csr.CSRTrainer` (defaults: the paper's, docs/method.md sections 5, 6 and 8).

    Besides the CSR fields below, the paper's optimiser is the default: SGD with momentum 0.9
    (``optim="sgd"``, ``optim_args="momentum=0.9"``), weight decay 5e-4 on all parameters, batch 128.
    """

    # ------------------------------------------------------------------ objective
    base_loss: str = _choice("pgd", BASE_LOSSES, "Base adversarial-training objective: PGD-AT (Madry et al.) or TRADES.")
    trades_beta: float = field(default=6.0, metadata={"help": "TRADES trade-off beta (weight of the KL term)."})
    fairness_method: str = field(
        default="csr",
        metadata={"help": "Fairness method on top of the base loss, by its registered name: 'none' (plain PGD-AT / "
                          "TRADES), 'csr', or the baselines 'frl', 'faal', 'cfa', 'wat' (hf_csr.fairness); a method "
                          "registered with hf_csr.fairness.register_fairness_method is accepted too. Its settings are "
                          "its own flags (--csr_alpha, --frl_tau_clean, ...)."},
    )
    fairness_config: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "The fairness method's settings: its config dataclass (Python), a dict or a JSON string of its "
                          "fields (or flags); None = its defaults. On the command line, prefer the method's own flags."},
    )
    # ------------------------------------------------------------------ training attack
    attack_norm: str = _choice("Linf", NORMS, "Threat model of the training (and evaluation) attack.")
    attack_eps: PixelValue = field(
        default=PixelValue("8/255"), metadata={"help": "Attack budget in pixel units, e.g. 8/255 (Linf) or 0.5 (L2)."}
    )
    attack_step_size: Optional[PixelValue] = field(
        default=None, metadata={"help": "PGD step size (default eps/4: 2/255 for Linf 8/255)."}
    )
    attack_steps: int = field(default=10, metadata={"help": "PGD steps of the training attack."})
    attack_random_start: Optional[str] = field(
        default=None,
        metadata={"help": f"PGD start: {', '.join(RANDOM_STARTS)} (default: uniform for pgd, gaussian for trades).",
                  "choices": list(RANDOM_STARTS)},
    )
    attack_bn_mode: str = _choice(
        "eval", BN_MODES,
        "BatchNorm while crafting training attacks: eval (running stats), train (batch stats, running stats "
        "frozen; DDPM-data recipes) or train_update.",
    )
    # ------------------------------------------------------------------ AWP
    awp_gamma: float = field(default=0.0, metadata={"help": "Adversarial weight perturbation size (0 disables AWP; released code 0.005)."})
    awp_warmup: int = field(
        default=0,
        metadata={"help": "AWP starts in epoch awp_warmup, epochs counted from 1 as in the released AWP/CSR loops "
                          "(`if epoch >= awp_warmup`): 0 and 1 both mean from the first epoch, 10 = after 9 epochs."},
    )
    # ------------------------------------------------------------------ evaluation
    eval_attacks: str = field(
        default="clean,pgd20",
        metadata={"help": "Comma-separated attacks for trainer.evaluate(): clean, pgd<steps> (pgd20), cw<steps> "
                          "(cw20), autoattack or autoattack:<components> (hf_csr.evaluation.specs)."},
    )
    eval_max_examples: Optional[int] = field(
        default=None, metadata={"help": "Evaluate on this many examples of the eval set (class-balanced); None = all."}
    )
    # ------------------------------------------------------------------ data and schedule
    augment: bool = field(default=True, metadata={"help": "Random crop with padding (+ flip) on training batches."})
    crop_padding: int = field(default=4, metadata={"help": "Zero padding of the random crop (pixels)."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips (turn off for digits/text)."})
    lr_milestones: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated epochs at which the learning rate is multiplied by lr_decay_factor "
                          "(paper from scratch: '100,150'); overrides lr_scheduler_type."},
    )
    lr_decay_factor: float = field(default=0.1, metadata={"help": "Learning-rate factor at each milestone."})

    # ------------------------------------------------------------------ paper defaults for inherited fields
    learning_rate: float = field(default=0.1, metadata={"help": "Initial learning rate (paper: 0.1 from scratch, 0.01 fine-tuning)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay (paper: 5e-4, on all parameters)."})
    optim: OptimizerNames | str = field(default="sgd", metadata={"help": "Optimizer (paper: SGD)."})
    optim_args: str | None = field(default="momentum=0.9", metadata={"help": "Optimizer arguments (paper: momentum 0.9)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch size per device (paper: 128)."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size per device."})
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Gradient clipping norm; 0 = off (the default). The paper's training is plain SGD: none of the "
                          "originals (released CSR code, TRADES, AWP, PGD-AT, FRL, FAAL, CFA, WAT) clips gradients, while "
                          "transformers' own default of 1.0 would clip almost every adversarial-training step (a "
                          "PreAct-ResNet18's PGD-AT gradient norm is about 4.7 at initialisation). Set it to clip anyway."},
    )
    lr_scheduler_type: SchedulerType | str = field(default="constant", metadata={"help": "Scheduler when lr_milestones is not set."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep pixel_values/labels as given."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to (tensorboard, wandb, ...)."})

    def __post_init__(self):
        self._validate_inherited_fields()
        self._validate_csr_fields()
        super().__post_init__()
        import torch

        if self.dataloader_pin_memory and not torch.accelerator.is_available():
            # No GPU (or other accelerator): pinned memory has no use, and torch would warn at every DataLoader.
            self.dataloader_pin_memory = False

    def _validate_inherited_fields(self) -> None:
        """The Trainer's own settings that would otherwise reach training: a NaN learning rate trains a NaN
        model (logged as loss 0.0), a negative one ascends the loss; unbounded counts never finish."""
        from .validation import check_finite_number, check_seed

        check_finite_number(self.learning_rate, "learning_rate", minimum=0)
        check_finite_number(self.weight_decay, "weight_decay", minimum=0)
        check_finite_number(self.max_grad_norm, "max_grad_norm", minimum=0)
        check_finite_number(self.num_train_epochs, "num_train_epochs", minimum=0, maximum=1e6)
        check_finite_number(self.warmup_steps, "warmup_steps", minimum=0)
        for name in ("adam_beta1", "adam_beta2"):
            check_finite_number(getattr(self, name), name, minimum=0, maximum=1)
        check_finite_number(self.adam_epsilon, "adam_epsilon", minimum=0)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_positive_int(getattr(self, name), name)
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or not -1 <= self.max_steps < 2**40:
            raise ValueError(f"max_steps must be -1 (use num_train_epochs) or a positive integer below 2**40; got {self.max_steps!r}.")
        check_seed(self.seed, "seed")
        if self.data_seed is not None:
            check_seed(self.data_seed, "data_seed")

    # ------------------------------------------------------------------ validation
    def _validate_csr_fields(self) -> None:
        check_choice("base_loss", self.base_loss, BASE_LOSSES)
        self.fairness_config = resolve_fairness_config(
            self.fairness_method, self.fairness_config, self.__dict__.pop("_method_settings", None) or {})
        check_choice("attack_norm", self.attack_norm, NORMS)
        check_choice("attack_bn_mode", self.attack_bn_mode, BN_MODES)
        if self.attack_random_start is not None:
            check_choice("attack_random_start", self.attack_random_start, RANDOM_STARTS)
        self.attack_eps = PixelValue(check_budget(float(PixelValue(self.attack_eps)), self.attack_norm, "attack_eps"))
        if self.attack_step_size is None:
            self.attack_step_size = PixelValue(self.attack_eps / 4)
        self.attack_step_size = PixelValue(self.attack_step_size)
        if not math.isfinite(self.attack_step_size) or self.attack_step_size <= 0:
            raise ValueError(f"attack_step_size must be > 0; got {self.attack_step_size}.")
        if self.attack_step_size > self.attack_eps:
            raise ValueError(
                f"attack_step_size ({self.attack_step_size:.4g}) must not exceed attack_eps ({self.attack_eps:.4g}); "
                "the paper uses eps/4."
            )
        if isinstance(self.attack_steps, bool) or not isinstance(self.attack_steps, int) or not 1 <= self.attack_steps <= MAX_ATTACK_STEPS:
            raise ValueError(f"attack_steps must be an integer in [1, {MAX_ATTACK_STEPS}]; got {self.attack_steps!r}.")
        if not math.isfinite(self.trades_beta) or self.trades_beta < 0:
            raise ValueError(f"trades_beta must be >= 0; got {self.trades_beta}.")
        if not math.isfinite(self.awp_gamma) or self.awp_gamma < 0:
            raise ValueError(f"awp_gamma must be >= 0 (0 disables AWP); got {self.awp_gamma}.")
        if isinstance(self.awp_warmup, bool) or not isinstance(self.awp_warmup, int) or self.awp_warmup < 0:
            raise ValueError(f"awp_warmup must be >= 0; got {self.awp_warmup}.")
        if not self.eval_attack_list:
            raise ValueError(f"eval_attacks must name at least one attack (e.g. 'clean,pgd20'); got {self.eval_attacks!r}.")
        from .evaluation.specs import check_attack_list  # local import: keeps `import hf_csr` light

        check_attack_list(self.eval_attacks, "eval_attacks")  # names the unknown attack; bounded steps
        if self.eval_max_examples is not None and self.eval_max_examples < 1:
            raise ValueError(f"eval_max_examples must be positive or None; got {self.eval_max_examples}.")
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or not 0 <= self.crop_padding <= MAX_CROP_PADDING:
            raise ValueError(f"crop_padding must be an integer in [0, {MAX_CROP_PADDING}] (pixels); got {self.crop_padding!r}.")
        self.milestone_epochs()  # validates lr_milestones
        if not isinstance(self.lr_decay_factor, (int, float)) or not 0 < self.lr_decay_factor <= 1:
            raise ValueError(f"lr_decay_factor must lie in (0, 1]; got {self.lr_decay_factor}.")

    @property
    def eval_attack_list(self) -> List[str]:
        return [a.strip() for a in str(self.eval_attacks).split(",") if a.strip()]

    def milestone_epochs(self) -> List[float]:
        if not self.lr_milestones:
            return []
        try:
            epochs = [float(v) for v in str(self.lr_milestones).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"lr_milestones must be comma-separated epochs like '100,150'; got {self.lr_milestones!r}.") from None
        if any(e <= 0 for e in epochs) or epochs != sorted(epochs):
            raise ValueError(f"lr_milestones must be increasing positive epochs; got {self.lr_milestones!r}.")
        return epochs

    @property
    def random_start(self) -> str:
        if self.attack_random_start is not None:
            return self.attack_random_start
        return "gaussian" if self.base_loss == "trades" else "uniform"

    def to_dict(self) -> Dict[str, Any]:
        """``TrainingArguments.to_dict`` with the fairness config as a plain dict (JSON-serialisable)."""
        d = super().to_dict()
        config = d.get("fairness_config")
        if config is not None and not isinstance(config, (dict, str)):
            d["fairness_config"] = config.to_dict()
        return d


_FIELD_NAMES = frozenset(f.name for f in fields(CSRTrainingArguments))
reserve_setting_names(_FIELD_NAMES, "CSRTrainingArguments")  # no fairness method's flag may take a field's name
_dataclass_init = CSRTrainingArguments.__init__


@functools.wraps(_dataclass_init)
def _init_with_method_settings(self, *args, **kwargs):
    """The dataclass ``__init__``, also taking the fairness methods' settings by flag name (``csr_alpha=0.3``),
    which ``__post_init__`` routes into ``fairness_config``."""
    settings = {key: kwargs.pop(key) for key in list(kwargs) if key not in _FIELD_NAMES}
    self.__dict__["_method_settings"] = settings
    _dataclass_init(self, *args, **kwargs)


CSRTrainingArguments.__init__ = _init_with_method_settings


def resolve_fairness_config(method: str, config: Any, settings: Dict[str, Any]):
    """The config dataclass instance of fairness method ``method``.

    ``config``: None (defaults), an instance of the method's config class, a dict or a JSON string of
    its fields (by field or flag name). ``settings``: flag-named values (``csr_alpha``) that override it.
    A setting of another registered method, or an unknown name, is an error that names it."""
    from .fairness.base import FairnessConfig
    from .fairness.registry import all_method_flags, config_flags, get_fairness_method

    if not isinstance(method, str):
        raise ValueError(f"fairness_method must be a method name (str); got {method!r}.")
    method_class = get_fairness_method(method)
    config_class = method_class.config_class
    flags = config_flags(method_class)  # field -> flag
    by_flag = {flag: name for name, flag in flags.items()}

    def to_fields(values: Dict[str, Any], where: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, value in values.items():
            if key in by_flag:
                out[by_flag[key]] = value
            elif key in flags:
                out[key] = value
            else:
                owners = sorted({m for m, _, _ in all_method_flags().get(key, [])})
                if owners:
                    raise ValueError(
                        f"{key} is a setting of fairness_method {' / '.join(map(repr, owners))}, but fairness_method is "
                        f"{method!r}; drop it or set fairness_method to that method."
                    )
                known = sorted(by_flag) or ["(none)"]
                raise TypeError(
                    f"{where} got an unexpected setting {key!r}; fairness_method {method!r} takes {known} and "
                    "CSRTrainingArguments its own fields."
                )
        return out

    overrides = to_fields(settings, "CSRTrainingArguments")
    if isinstance(config, FairnessConfig):
        if not isinstance(config, config_class):
            raise ValueError(
                f"fairness_config is a {type(config).__name__} but fairness_method {method!r} takes a {config_class.__name__}."
            )
        return dataclasses.replace(config, **overrides) if overrides else config
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as error:
            raise ValueError(f"fairness_config must be a JSON object of {method!r}'s settings; got {config!r} ({error}).") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError(f"fairness_config must be a {config_class.__name__}, a dict or a JSON object; got {type(config).__name__}.")
    values = {**to_fields(config, "fairness_config"), **overrides}
    return config_class(**values)
