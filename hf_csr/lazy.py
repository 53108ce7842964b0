"""Lazy exports for hf_csr's packages (standard library only).

A package's ``__init__`` lists its public names and the submodule each comes from; the submodule is
imported when the name is first read (PEP 562 module ``__getattr__``), as timm and transformers do. So
``import hf_csr`` loads only what the registration of its models needs (torch, timm and transformers'
model classes), not datasets, evaluate, AutoAttack, matplotlib or transformers' Trainer.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Callable, Dict, List, Tuple

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the submodule that
    defines it (relative, e.g. ``".trainer"``). A submodule of the package is also reachable as an
    attribute (``hf_csr.evaluation``). Each value is cached on the package once read."""

    def __getattr__(name: str) -> object:
        module = sys.modules[package]
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(module, name, value)
        return value

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
