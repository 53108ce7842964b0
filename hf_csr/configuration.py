"""``CSRTrainingArguments``: the Trainer's arguments plus adversarial training, CSR and AWP settings.

Every field has a ``help`` (shown by ``HfArgumentParser``) and enums list their ``choices``;
``__post_init__`` validates everything with errors that name the argument and the allowed values,
then hands over to ``TrainingArguments.__post_init__``. Budgets accept pixel units: ``8/255`` on the
command line or in YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from .attacks import BN_MODES, NORMS, RANDOM_STARTS
from .evaluation.specs import parse_attacks  # noqa: F401  (re-exported for older imports)
from .regularizer import CONFUSION_SOURCES, VARIANTS
from .utils import parse_pixel_value
from .validation import MAX_ATTACK_STEPS, MAX_CROP_PADDING, check_attack_list

__all__ = ["CSRTrainingArguments", "PixelValue", "BASE_LOSSES", "FAIRNESS_METHODS"]

BASE_LOSSES = ("pgd", "trades")
FAIRNESS_METHODS = ("none", "csr", "frl", "faal", "cfa", "wat")


class PixelValue(float):
    """A float that also parses fractions such as ``8/255`` (used as the argparse type)."""

    def __new__(cls, value):
        return super().__new__(cls, parse_pixel_value(value))


def _choice(default, choices, help_text):
    return field(default=default, metadata={"help": f"{help_text} Choices: {', '.join(map(str, choices))}.", "choices": list(choices)})


@dataclass
class CSRTrainingArguments(TrainingArguments):
    """Arguments for :class:`hf_csr.CSRTrainer` (defaults: the paper's, METHOD.md sections 5, 6 and 8).

    Besides the CSR fields below, the paper's optimiser is the default: SGD with momentum 0.9
    (``optim="sgd"``, ``optim_args="momentum=0.9"``), weight decay 5e-4 on all parameters, batch 128.
    """

    # ------------------------------------------------------------------ objective
    base_loss: str = _choice("pgd", BASE_LOSSES, "Base adversarial-training objective: PGD-AT (Madry et al.) or TRADES.")
    trades_beta: float = field(default=6.0, metadata={"help": "TRADES trade-off beta (weight of the KL term)."})
    fairness_method: str = _choice(
        "csr", FAIRNESS_METHODS,
        "Fairness method on top of the base loss ('none' = plain PGD-AT / TRADES; frl, faal, cfa, wat = the baselines "
        "of hf_csr.baselines, see their docstrings).",
    )
    csr_alpha: float = field(default=0.3, metadata={"help": "Weight alpha of the CSR penalty Psi (0 = the base method)."})
    csr_gamma: float = field(
        default=0.0,
        metadata={"help": "Margin gamma of the confusion estimate (paper: additive logit margin >= 0; "
                          "reference: true-logit shrink factor in [0, 1)). The paper uses 0.0 and 0.1."},
    )
    csr_variant: str = _choice(
        "reference", VARIANTS,
        "'reference' follows the authors' released code (raw counts, min-max scaled weights, (1 - alpha) on the CE "
        "term); 'paper' follows eq. 10-12.",
    )
    csr_confusion_source: str = _choice(
        "ema", CONFUSION_SOURCES,
        "Where C comes from: 'ema' of every step's counts (no extra cost), 'batch' (this step only) or 'epoch' "
        "(a full PGD pass over the training set before each epoch, as the released code).",
    )
    csr_ema_momentum: float = field(default=0.99, metadata={"help": "EMA decay mu of the 'ema' confusion source, in [0, 1)."})
    # ------------------------------------------------------------------ fairness baselines (hf_csr.baselines)
    fairness_val_size: int = field(
        default=1000,
        metadata={"help": "FRL / WAT / CFA-FAWA: size of the class-balanced validation split drawn from the training set "
                          "when trainer.fairness_validation_dataset is not set (set here)."},
    )
    frl_tau_clean: float = field(default=0.05, metadata={"help": "FRL tau1: allowed excess clean error per class (paper: 0.05 or 0.07)."})
    frl_tau_boundary: float = field(default=0.05, metadata={"help": "FRL tau2: allowed excess boundary error per class (paper: 0.05 or 0.07)."})
    frl_rw_rate: float = field(default=0.05, metadata={"help": "FRL reweight multipliers' step size per epoch (0 disables reweighting; set here)."})
    frl_rm_rate: float = field(default=0.05, metadata={"help": "FRL remargin multipliers' step size per epoch (0 disables remargin; set here)."})
    frl_max_eps_factor: float = field(default=2.0, metadata={"help": "FRL: cap of the remargined budget as a multiple of attack_eps (>= 1; set here)."})
    faal_rho: float = field(default=0.1, metadata={"help": "FAAL: radius of the KL ball around uniform class weights (0 = base method; set here)."})
    faal_search_steps: int = field(default=50, metadata={"help": "FAAL: bisection steps of the 1-D search on the dual variable."})
    cfa_ccm: bool = field(default=True, metadata={"help": "CFA: class-wise calibrated margins (eps_c = (cfa_eps_lambda + t_c) * eps)."})
    cfa_ccr: bool = field(default=True, metadata={"help": "CFA: class-wise calibrated TRADES beta (beta_c = (cfa_beta_lambda + t_c) * beta)."})
    cfa_fawa: bool = field(default=True, metadata={"help": "CFA: fairness-aware weight averaging, swapped in at the end of training."})
    cfa_eps_lambda: float = field(default=0.5, metadata={"help": "CFA: base factor of the class-wise budget (set here)."})
    cfa_beta_lambda: float = field(default=0.5, metadata={"help": "CFA: base factor of the class-wise TRADES beta (set here)."})
    cfa_eps_max_factor: Optional[float] = field(default=None, metadata={"help": "CFA: optional cap of eps_c / eps (None: lambda + 1)."})
    cfa_fawa_decay: float = field(default=0.85, metadata={"help": "CFA: decay of the weight average, in [0, 1) (set here)."})
    cfa_fawa_threshold: float = field(default=0.2, metadata={"help": "CFA: minimal worst-class validation robust accuracy for an epoch to enter the average (set here)."})
    cfa_fawa_start: int = field(default=0, metadata={"help": "CFA: first epoch (from 0) that may enter the weight average."})
    wat_eta: float = field(default=0.1, metadata={"help": "WAT: Hedge learning rate on the cumulative class-wise validation loss (0 = base method; set here)."})
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
    awp_warmup: int = field(default=0, metadata={"help": "Epochs of training before AWP starts."})
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
    lr_scheduler_type: SchedulerType | str = field(default="constant", metadata={"help": "Scheduler when lr_milestones is not set."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep pixel_values/labels as given."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to (tensorboard, wandb, ...)."})

    def __post_init__(self):
        self._validate_inherited_fields()
        self._validate_csr_fields()
        super().__post_init__()

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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or not -1 <= self.max_steps < 2**40:
            raise ValueError(f"max_steps must be -1 (use num_train_epochs) or a positive integer below 2**40; got {self.max_steps!r}.")
        check_seed(self.seed, "seed")
        if self.data_seed is not None:
            check_seed(self.data_seed, "data_seed")

    # ------------------------------------------------------------------ validation
    def _validate_csr_fields(self) -> None:
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}; got {value!r}.")

        choice("base_loss", BASE_LOSSES)
        choice("fairness_method", FAIRNESS_METHODS)
        choice("csr_variant", VARIANTS)
        choice("csr_confusion_source", CONFUSION_SOURCES)
        choice("attack_norm", NORMS)
        choice("attack_bn_mode", BN_MODES)
        if self.attack_random_start is not None:
            choice("attack_random_start", RANDOM_STARTS)
        self.attack_eps = PixelValue(self.attack_eps)
        if not math.isfinite(self.attack_eps) or self.attack_eps <= 0:
            raise ValueError(f"attack_eps must be > 0 (pixel units, e.g. 8/255); got {self.attack_eps}.")
        if self.attack_norm == "Linf" and self.attack_eps > 1:
            raise ValueError(f"attack_eps = {self.attack_eps} exceeds 1 for Linf on [0, 1] images; use pixel units like 8/255.")
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
        if not math.isfinite(self.csr_alpha) or self.csr_alpha < 0:
            raise ValueError(f"csr_alpha must be >= 0; got {self.csr_alpha}.")
        if self.csr_variant == "reference" and self.csr_alpha > 1:
            raise ValueError(
                f"csr_alpha must lie in [0, 1] for csr_variant='reference', which scales the CE term by (1 - alpha); "
                f"got {self.csr_alpha}."
            )
        if not math.isfinite(self.csr_gamma) or self.csr_gamma < 0:
            raise ValueError(f"csr_gamma must be >= 0; got {self.csr_gamma}.")
        if self.csr_variant == "reference" and self.csr_gamma >= 1:
            raise ValueError(f"csr_gamma must lie in [0, 1) for csr_variant='reference'; got {self.csr_gamma}.")
        if not isinstance(self.csr_ema_momentum, (int, float)) or not 0 <= self.csr_ema_momentum < 1:
            raise ValueError(f"csr_ema_momentum must lie in [0, 1); got {self.csr_ema_momentum}.")
        if not math.isfinite(self.trades_beta) or self.trades_beta < 0:
            raise ValueError(f"trades_beta must be >= 0; got {self.trades_beta}.")
        if not math.isfinite(self.awp_gamma) or self.awp_gamma < 0:
            raise ValueError(f"awp_gamma must be >= 0 (0 disables AWP); got {self.awp_gamma}.")
        if isinstance(self.awp_warmup, bool) or not isinstance(self.awp_warmup, int) or self.awp_warmup < 0:
            raise ValueError(f"awp_warmup must be >= 0; got {self.awp_warmup}.")
        self._validate_baseline_fields()
        if not self.eval_attack_list:
            raise ValueError(f"eval_attacks must name at least one attack (e.g. 'clean,pgd20'); got {self.eval_attacks!r}.")
        check_attack_list(self.eval_attacks, "eval_attacks")  # names the unknown attack; bounded steps
        if self.eval_max_examples is not None and self.eval_max_examples < 1:
            raise ValueError(f"eval_max_examples must be positive or None; got {self.eval_max_examples}.")
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or not 0 <= self.crop_padding <= MAX_CROP_PADDING:
            raise ValueError(f"crop_padding must be an integer in [0, {MAX_CROP_PADDING}] (pixels); got {self.crop_padding!r}.")
        self.milestone_epochs()  # validates lr_milestones
        if not isinstance(self.lr_decay_factor, (int, float)) or not 0 < self.lr_decay_factor <= 1:
            raise ValueError(f"lr_decay_factor must lie in (0, 1]; got {self.lr_decay_factor}.")

    def _validate_baseline_fields(self) -> None:
        def nonnegative(name):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")

        for name in ("frl_tau_clean", "frl_tau_boundary", "frl_rw_rate", "frl_rm_rate", "faal_rho", "cfa_eps_lambda",
                     "cfa_beta_lambda", "wat_eta"):
            nonnegative(name)
        if not isinstance(self.fairness_val_size, int) or self.fairness_val_size < 1:
            raise ValueError(f"fairness_val_size must be a positive integer; got {self.fairness_val_size!r}.")
        if not math.isfinite(self.frl_max_eps_factor) or self.frl_max_eps_factor < 1:
            raise ValueError(f"frl_max_eps_factor must be >= 1; got {self.frl_max_eps_factor}.")
        if not isinstance(self.faal_search_steps, int) or self.faal_search_steps < 1:
            raise ValueError(f"faal_search_steps must be a positive integer; got {self.faal_search_steps!r}.")
        if self.cfa_eps_max_factor is not None and not (math.isfinite(self.cfa_eps_max_factor) and self.cfa_eps_max_factor > 0):
            raise ValueError(f"cfa_eps_max_factor must be > 0 or None; got {self.cfa_eps_max_factor}.")
        if not 0 <= self.cfa_fawa_decay < 1:
            raise ValueError(f"cfa_fawa_decay must lie in [0, 1); got {self.cfa_fawa_decay}.")
        if not 0 <= self.cfa_fawa_threshold <= 1:
            raise ValueError(f"cfa_fawa_threshold must lie in [0, 1]; got {self.cfa_fawa_threshold}.")
        if not isinstance(self.cfa_fawa_start, int) or self.cfa_fawa_start < 0:
            raise ValueError(f"cfa_fawa_start must be an integer >= 0; got {self.cfa_fawa_start!r}.")
        if self.fairness_method == "cfa" and self.attack_norm == "Linf":
            top = (self.cfa_eps_lambda + 1) if self.cfa_eps_max_factor is None else min(self.cfa_eps_lambda + 1, self.cfa_eps_max_factor)
            if self.cfa_ccm and top * self.attack_eps > 1:
                raise ValueError(f"CFA's largest class budget ({top:g} * attack_eps) exceeds 1 for Linf; lower cfa_eps_lambda or set cfa_eps_max_factor.")

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

    @property
    def csr_enabled(self) -> bool:
        return self.fairness_method == "csr" and self.csr_alpha > 0
