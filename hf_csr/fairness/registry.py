"""The registry of fairness methods, by name (``fairness_method=...``).

Built-in methods (``none``, ``csr``, ``frl``, ``faal``, ``cfa``, ``wat``) are registered lazily: looking
one up imports its module (as timm does for its models), so nothing imports a concrete method just
to train with another. A user's method registers with :func:`register_fairness_method` when its
module is imported, before ``CSRTrainingArguments`` names it.

The registry sits below the training arguments (docs/architecture.md): it does not import them. The
arguments reserve their field names here (:func:`reserve_setting_names`) when their module is imported,
and a method's flag may take none of the reserved names, whichever of the two comes first.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Tuple, Type

if TYPE_CHECKING:  # pragma: no cover
    from .base import FairnessConfig, FairnessMethod

__all__ = [
    "FAIRNESS_REGISTRY", "BUILTIN_FAIRNESS_METHODS", "register_fairness_method", "get_fairness_method",
    "available_fairness_methods", "config_flags", "all_method_flags", "load_builtin_methods", "reserve_setting_names",
]

FAIRNESS_REGISTRY: Dict[str, Type["FairnessMethod"]] = {}

# name -> module that registers it on import (lazy, timm-style)
BUILTIN_FAIRNESS_METHODS: Dict[str, str] = {
    "none": "hf_csr.fairness.base",
    "csr": "hf_csr.fairness.csr",
    "frl": "hf_csr.fairness.frl",
    "faal": "hf_csr.fairness.faal",
    "cfa": "hf_csr.fairness.cfa",
    "wat": "hf_csr.fairness.wat",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def config_flags(method: Type["FairnessMethod"]) -> Dict[str, str]:
    """``{config field name: command-line flag}`` of a method's settings (see :class:`FairnessConfig`)."""
    config_class = method.config_class
    prefix = config_class.flag_prefix or method.name
    return {f.name: f.metadata.get("flag", f"{prefix}_{f.name}") for f in dataclasses.fields(config_class) if f.init}


# setting name -> who reserved it (the training arguments' fields: a method's flag may not take them)
_RESERVED: Dict[str, str] = {}


def _clash_error(name: str, clash: List[str], owner: str) -> ValueError:
    return ValueError(f"fairness method {name!r}: setting(s) {clash} collide with {owner} fields; rename them.")


def reserve_setting_names(names, owner: str) -> None:
    """Reserve setting ``names`` (``owner``'s own fields, e.g. ``CSRTrainingArguments``) so that no fairness
    method's flag takes one; a method registered already with such a flag is an error naming it."""
    names = set(names)
    for method_name, method in FAIRNESS_REGISTRY.items():
        clash = sorted(set(config_flags(method).values()) & names)
        if clash:
            raise _clash_error(method_name, clash, owner)
    _RESERVED.update(dict.fromkeys(names, owner))


def register_fairness_method(name: str, *, overwrite: bool = False) -> Callable[[Type["FairnessMethod"]], Type["FairnessMethod"]]:
    """Class decorator: register a :class:`~hf_csr.fairness.FairnessMethod` subclass as ``fairness_method=name``.

    Its ``config_class`` fields become flags ``--{name}_{field}``; a flag may not collide with a
    ``CSRTrainingArguments`` field, and a flag shared with another method must have the same type."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"a fairness method's name must be lower-case letters, digits and '_' (an identifier); got {name!r}.")

    def decorator(cls: Type["FairnessMethod"]) -> Type["FairnessMethod"]:
        from .base import FairnessConfig, FairnessMethod

        if not (isinstance(cls, type) and issubclass(cls, FairnessMethod)):
            raise TypeError(f"register_fairness_method({name!r}) decorates a FairnessMethod subclass; got {cls!r}.")
        config_class = cls.config_class
        if not (isinstance(config_class, type) and issubclass(config_class, FairnessConfig)
                and dataclasses.is_dataclass(config_class)):
            raise TypeError(f"{cls.__name__}.config_class must be a dataclass subclassing FairnessConfig; got {config_class!r}.")
        if name in FAIRNESS_REGISTRY and FAIRNESS_REGISTRY[name] is not cls and not overwrite:
            raise ValueError(
                f"fairness method {name!r} is already registered ({FAIRNESS_REGISTRY[name].__qualname__}); pick another "
                "name or pass overwrite=True."
            )
        previous = cls.__dict__.get("name")
        cls.name = name
        try:
            flags = config_flags(cls)
            clash = sorted(set(flags.values()) & set(_RESERVED))
            if clash:
                raise _clash_error(name, clash, " / ".join(sorted({_RESERVED[flag] for flag in clash})))
            types = {f.name: f.type for f in dataclasses.fields(config_class)}
            for other_name, other in FAIRNESS_REGISTRY.items():
                if other_name == name:
                    continue
                other_types = {f.name: f.type for f in dataclasses.fields(other.config_class)}
                for field_name, flag in config_flags(other).items():
                    for mine, my_flag in flags.items():
                        if my_flag == flag and str(types[mine]) != str(other_types[field_name]):
                            raise ValueError(
                                f"fairness method {name!r}: flag {flag!r} is shared with {other_name!r} but has another "
                                f"type ({types[mine]} vs {other_types[field_name]})."
                            )
        except Exception:
            if previous is None:
                del cls.name
            else:
                cls.name = previous
            raise
        FAIRNESS_REGISTRY[name] = cls
        return cls

    return decorator


def get_fairness_method(name: str) -> Type["FairnessMethod"]:
    """The registered method class ``name`` (importing a built-in on first use)."""
    if name not in FAIRNESS_REGISTRY and name in BUILTIN_FAIRNESS_METHODS:
        importlib.import_module(BUILTIN_FAIRNESS_METHODS[name])
    if name not in FAIRNESS_REGISTRY:
        raise ValueError(
            f"fairness_method must be one of {available_fairness_methods()}; got {name!r}. A method of your own must be "
            "registered (@hf_csr.fairness.register_fairness_method) before the arguments name it."
        )
    return FAIRNESS_REGISTRY[name]


def available_fairness_methods() -> List[str]:
    """Built-in and registered method names."""
    return sorted(set(BUILTIN_FAIRNESS_METHODS) | set(FAIRNESS_REGISTRY))


def load_builtin_methods() -> None:
    """Import every built-in method (for ``--help`` and for routing flat settings)."""
    for name in BUILTIN_FAIRNESS_METHODS:
        get_fairness_method(name)


def all_method_flags() -> Dict[str, List[Tuple[str, str, Any]]]:
    """``{flag: [(method name, config field name, dataclasses.Field), ...]}`` over every registered method
    (built-ins loaded first)."""
    load_builtin_methods()
    flags: Dict[str, List[Tuple[str, str, Any]]] = {}
    for method_name, cls in sorted(FAIRNESS_REGISTRY.items()):
        by_name = {f.name: f for f in dataclasses.fields(cls.config_class)}
        for field_name, flag in config_flags(cls).items():
            flags.setdefault(flag, []).append((method_name, field_name, by_name[field_name]))
    return flags
