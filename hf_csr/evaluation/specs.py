"""The evaluation attacks (``docs/method.md`` section 6): their names, their settings and how to parse them.

An attack is named by a string:

* ``clean``: no attack;
* ``pgd<steps>`` (``pgd20``): PGD on the cross-entropy, step ``eps / 4``, uniform random start;
* ``cw<steps>`` (``cw20``): the same on the CW margin ``max_{i != y} z_i - z_y``;
* ``autoattack``: AutoAttack (``pyautoattack``), ``standard`` version (APGD-CE, APGD-T, FAB-T, Square),
  reported as ``autoattack``; with ``autoattack_version="rand"`` (APGD-CE and APGD-DLR with EOT, for
  randomised defences) it is reported as ``autoattack-rand``;
* ``autoattack:<a>+<b>...``: AutoAttack's ``custom`` version with the listed components
  (``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab``, ``fab-t``, ``square``), e.g. ``autoattack:apgd-ce+apgd-t``
  (reported under that name). Commas work too: in a comma-separated list of attacks, the components
  after ``autoattack:`` are collected until the next attack name.

or by a :class:`PGDConfig` / :class:`AutoAttackConfig` instance for other settings (fewer AutoAttack
iterations for a quick check, another step size).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

from ..validation import MAX_ATTACK_STEPS, check_choice, check_positive_int

__all__ = [
    "AUTOATTACK_COMPONENTS",
    "AUTOATTACK_VERSIONS",
    "WORST_OF_ALL",
    "check_attack_list",
    "AttackConfig",
    "AutoAttackConfig",
    "CleanConfig",
    "PGDConfig",
    "parse_attack",
    "parse_attacks",
]

AUTOATTACK_COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AUTOATTACK_VERSIONS = ("standard", "rand")
#: Deterministic per example: APGD with keyed random starts, FAB-T (one restart, no random start).
_KEYED_COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t")
_VERSION_COMPONENTS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "rand": ("apgd-ce", "apgd-dlr")}
#: The report entry that counts an example robust only if it survives every attack run.
WORST_OF_ALL = "worst_of_all"
_PGD_PATTERN = re.compile(r"(pgd|cw)(\d+)")
_NAME_FORMS = (
    "'clean', 'pgd<steps>' (e.g. pgd20), 'cw<steps>' (e.g. cw20), 'autoattack', or "
    f"'autoattack:<a>+<b>' with components from {list(AUTOATTACK_COMPONENTS)}"
)


@dataclass(frozen=True)
class CleanConfig:
    """No attack: the clean predictions. Always evaluated first (robustness is counted pointwise)."""

    uses_gradients = False

    @property
    def name(self) -> str:
        return "clean"

    def describe(self, eps: float) -> Dict[str, Any]:
        return {"type": "clean"}


@dataclass(frozen=True)
class PGDConfig:
    """PGD with ``steps`` steps of size ``step_fraction * eps`` on the ``ce`` or ``cw`` loss (last iterate)."""

    steps: int
    loss: str = "ce"
    step_fraction: float = 0.25
    random_start: str = "uniform"
    uses_gradients = True

    def __post_init__(self) -> None:
        check_positive_int(self.steps, "PGDConfig.steps")
        check_choice("PGDConfig.loss", self.loss, ("ce", "cw"))
        check_choice("PGDConfig.random_start", self.random_start, ("uniform", "none"))
        if not 0 < self.step_fraction <= 1:
            raise ValueError(
                f"PGDConfig.step_fraction must lie in (0, 1] (step = fraction * eps); got {self.step_fraction}."
            )

    @property
    def name(self) -> str:
        base = f"{'pgd' if self.loss == 'ce' else 'cw'}{self.steps}"
        if (self.step_fraction, self.random_start) == (0.25, "uniform"):
            return base
        return f"{base}[step={self.step_fraction:g}eps,start={self.random_start}]"

    def describe(self, eps: float) -> Dict[str, Any]:
        return {"type": "pgd", **asdict(self), "step_size": eps * self.step_fraction}


@dataclass(frozen=True)
class AutoAttackConfig:
    """AutoAttack: ``version`` ``standard`` / ``rand``, or ``custom`` with the ``attacks`` listed.

    ``n_iter`` (APGD and FAB iterations, 100 by default) and ``n_queries`` (Square, 5000) override
    AutoAttack's budgets: for quick checks only, never for reported numbers.
    """

    version: str = "standard"
    attacks: Tuple[str, ...] = ()
    n_iter: Optional[int] = None
    n_queries: Optional[int] = None

    def __post_init__(self) -> None:
        check_choice("AutoAttackConfig.version", self.version, AUTOATTACK_VERSIONS + ("custom",))
        object.__setattr__(self, "attacks", tuple(self.attacks))
        if (self.version == "custom") != bool(self.attacks):
            raise ValueError("AutoAttackConfig.attacks must list the components exactly when version='custom'.")
        for component in self.attacks:
            check_choice("an AutoAttack component", component, AUTOATTACK_COMPONENTS)
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"AutoAttackConfig.attacks lists a component twice: {list(self.attacks)}.")
        for field in ("n_iter", "n_queries"):
            check_positive_int(getattr(self, field), f"AutoAttackConfig.{field}", allow_none=True)

    @property
    def components(self) -> Tuple[str, ...]:
        """The AutoAttack components this config runs, in order."""
        return self.attacks if self.version == "custom" else _VERSION_COMPONENTS[self.version]

    @property
    def uses_gradients(self) -> bool:
        return self.components != ("square",)

    @property
    def name(self) -> str:
        name = "autoattack" if self.version == "standard" else f"autoattack-{self.version}"
        if self.version == "custom":
            name = "autoattack:" + "+".join(self.attacks)
        budget = [f"{k}={v}" for k, v in (("n_iter", self.n_iter), ("n_queries", self.n_queries)) if v is not None]
        return f"{name}[{','.join(budget)}]" if budget else name

    def describe(self, eps: float) -> Dict[str, Any]:
        return {"type": "autoattack", **asdict(self), "attacks": list(self.components)}

    def build(self, model: nn.Module, *, norm: str, eps: float, seed: int, device, num_classes: int):
        """A ``pyautoattack.AutoAttack`` for ``model`` (which must return a logits tensor)."""
        from pyautoattack import AutoAttack

        custom = list(self.attacks) if self.version == "custom" else None
        adversary = AutoAttack(
            model, attacks=custom, device=device, eps=eps, norm=norm, seed=seed, version=self.version
        )
        # The DLR losses need the 3 (untargeted) or 4 (targeted) largest logits.
        for component, least in (("apgd-dlr", 3), ("apgd-t", 4)):
            if component in self.components and num_classes < least:
                raise ValueError(
                    f"AutoAttack's {component} needs at least {least} classes; the model has {num_classes}. "
                    "Use a custom list without it, e.g. 'autoattack:apgd-ce+fab-t+square'."
                )
        # AutoAttack targets the 9 runner-up classes; with K < 10 classes there are only K - 1.
        adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, num_classes - 1)
        adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, num_classes - 1)
        if self.n_iter is not None:
            for apgd in (adversary.apgd, adversary.apgd_targeted):
                # APGD derives its step-size checkpoints from n_iter in its constructor.
                apgd.n_iter = apgd.n_iter_orig = self.n_iter
                apgd.n_iter_2 = max(int(0.22 * self.n_iter), 1)
                apgd.n_iter_min = max(int(0.06 * self.n_iter), 1)
                apgd.size_decr = max(int(0.03 * self.n_iter), 1)
            adversary.fab.n_iter = self.n_iter
        if self.n_queries is not None:
            adversary.square.n_queries = self.n_queries
        if self.version != "rand":
            # Random starts keyed per example (see keyed_apgd): the same start for an example whatever its batch.
            from .keyed_apgd import KeyedAPGD, KeyedAPGDTargeted

            adversary.apgd.__class__ = KeyedAPGD
            adversary.apgd_targeted.__class__ = KeyedAPGDTargeted
        return adversary

    def keyed_components(self) -> Tuple[str, ...]:
        """The components whose randomness is keyed per example (see :mod:`hf_csr.evaluation.sharding`)."""
        if self.version == "rand":
            return ()
        return tuple(c for c in self.components if c in _KEYED_COMPONENTS)


AttackConfig = Union[CleanConfig, PGDConfig, AutoAttackConfig]


def parse_attack(attack: Union[str, AttackConfig], autoattack_version: str = "standard") -> AttackConfig:
    """An attack config from its name (see the module docstring) or the config itself."""
    if isinstance(attack, (CleanConfig, PGDConfig, AutoAttackConfig)):
        return attack
    if not isinstance(attack, str):
        raise ValueError(f"each attack must be a name ({_NAME_FORMS}) or an attack config; got {attack!r}.")
    check_choice("autoattack_version", autoattack_version, AUTOATTACK_VERSIONS)
    text = attack.strip().lower()
    match = _PGD_PATTERN.fullmatch(text)
    if text == "clean":
        return CleanConfig()
    if match and int(match.group(2)) > 0:
        return PGDConfig(steps=int(match.group(2)), loss="ce" if match.group(1) == "pgd" else "cw")
    if text == "autoattack":
        return AutoAttackConfig(version=autoattack_version)
    if text.startswith("autoattack:"):
        components = tuple(part.strip() for part in re.split(r"[+,]", text[len("autoattack:"):]))
        unknown = [c for c in components if c not in AUTOATTACK_COMPONENTS]
        if not unknown:
            return AutoAttackConfig(version="custom", attacks=components)
        raise ValueError(
            f"unknown AutoAttack component(s) {unknown} in {attack!r}; choose from {list(AUTOATTACK_COMPONENTS)}."
        )
    raise ValueError(f"unknown attack {attack!r}; an attack is {_NAME_FORMS}.")


def _split_attack_list(text: str) -> List[str]:
    """Split ``"clean,pgd20,autoattack:apgd-ce,apgd-t"`` at commas, keeping AutoAttack components together."""
    parts: List[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() in AUTOATTACK_COMPONENTS and parts and parts[-1].lower().startswith("autoattack:"):
            parts[-1] += "+" + part
        elif part:
            parts.append(part)
    return parts


def parse_attacks(
    attacks: Union[str, Iterable[Union[str, AttackConfig]]], autoattack_version: str = "standard"
) -> List[AttackConfig]:
    """Parse a list of attacks (or a comma-separated string); ``clean`` first, duplicates dropped."""
    if isinstance(attacks, str):
        attacks = _split_attack_list(attacks)
    configs: List[AttackConfig] = [CleanConfig()]
    for attack in attacks:
        if isinstance(attack, str) and attack.strip().lower() == WORST_OF_ALL:
            raise ValueError(f"'{WORST_OF_ALL}' is not an attack: the report adds it whenever an attack is run.")
        config = parse_attack(attack, autoattack_version)
        if config.name not in {c.name for c in configs}:
            configs.append(config)
    return configs


def check_attack_list(attacks: Any, name: str, *, num_classes: Optional[int] = None, autoattack_version: str = "standard"):
    """Parse an attack list and check it can run: bounded iteration counts and, when ``num_classes`` is
    known, AutoAttack components that the class count supports (APGD-DLR needs 3 classes, APGD-T 4)."""
    configs = parse_attacks(attacks, autoattack_version)
    for config in configs:
        if isinstance(config, PGDConfig) and config.steps > MAX_ATTACK_STEPS:
            raise ValueError(f"{name}: {config.name} has {config.steps} steps, above {MAX_ATTACK_STEPS}; use fewer steps.")
        if isinstance(config, AutoAttackConfig):
            for field in ("n_iter", "n_queries"):
                value = getattr(config, field)
                if value is not None and value > 100 * MAX_ATTACK_STEPS:
                    raise ValueError(f"{name}: {config.name} sets {field} = {value}, above {100 * MAX_ATTACK_STEPS}.")
            if num_classes is not None:
                for component, least in (("apgd-dlr", 3), ("apgd-t", 4)):
                    if component in config.components and num_classes < least:
                        raise ValueError(
                            f"{name}: AutoAttack's {component} needs at least {least} classes and the model has "
                            f"{num_classes}; use a list without it, e.g. 'autoattack:apgd-ce+fab-t+square'."
                        )
    return configs
