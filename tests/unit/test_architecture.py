"""The layers of docs/architecture.md, enforced on the source (AST only: nothing of the package is imported).

Rules:

1. A module imports only modules of its own layer or of a lower one (``LAYERS``, low to high). Every import
   counts: module level or inside a function, absolute or relative; only imports under ``if TYPE_CHECKING:``
   are exempt (they never run). ``hf_csr/__init__.py`` and ``hf_csr/baselines`` are re-export shims and exempt.
2. Nothing in ``hf_csr`` imports ``hf_csr_paper`` (the paper drivers sit on top of the library).
3. No private name crosses modules: ``from .m import _x`` is refused
   outside ``m`` itself. A package's ``__init__`` may re-export a private name of its own submodules
   (``from ._common import x`` is an import of a private *module* by its own package, which is allowed); a
   private module (``models/_common.py``) is imported only inside its own package.

``KNOWN_VIOLATIONS`` lists violations still being removed while a change is under way (empty when none).
A listed violation that no longer exists fails the suite too, so the list cannot go stale.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "hf_csr"
PAPER = "hf_csr_paper"

#: Low to high. A module belongs to the longest prefix listed here; each may import only its layer or lower.
LAYERS = [
    ("L0 foundations", ["hf_csr.utils", "hf_csr.validation", "hf_csr.lazy", "hf_csr.arguments"]),
    ("L1 core maths", ["hf_csr.regularizer", "hf_csr.attacks", "hf_csr.awp"]),
    ("L2 data, models, metrics", ["hf_csr.data", "hf_csr.models", "hf_csr.metrics"]),
    ("L3 fairness, evaluation", ["hf_csr.fairness", "hf_csr.evaluation"]),
    ("L4 hub", ["hf_csr.hub"]),
    ("L5 training", ["hf_csr.configuration", "hf_csr.trainer", "hf_csr.safety", "hf_csr.selection"]),
    ("L6 application", ["hf_csr.experiment", "hf_csr.recipes", "hf_csr.quickstart", "hf_csr.cli",
                        "hf_csr.hub.commands", "hf_csr.evaluation.command"]),
]
#: Re-export shims: they import from every layer by design and hold no logic.
EXEMPT = {"hf_csr", "hf_csr.baselines"}

#: Violations being removed, each (importer, imported, rule), while a change is under way;
#: test_known_violations_still_exist fails as soon as one of them is gone from the code.
KNOWN_VIOLATIONS = set()  # none left


def layer_of(module):
    """(index, name) of the layer of ``module``, by its longest listed prefix; None outside the layers."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    return None if best is None else best[0]


def module_name(path, root):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(importer, is_package, level, module):
    """The absolute module of ``from <level dots><module> import ...`` inside ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def _type_checking_blocks(tree):
    """Line ranges of ``if TYPE_CHECKING:`` bodies."""
    ranges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                ranges.append((node.body[0].lineno, node.body[-1].end_lineno))
    return ranges


def imports_of(source, importer, is_package):
    """``(imported module, names, line)`` for every import of ``source`` that runs (TYPE_CHECKING blocks aside).

    ``from a.b import c`` yields ``("a.b.c", [], line)`` as well as ``("a.b", ["c"], line)``: ``c`` may be a submodule.
    """
    tree = ast.parse(source)
    skip = _type_checking_blocks(tree)
    found = []
    for node in ast.walk(tree):
        if any(a <= getattr(node, "lineno", 0) <= b for a, b in skip):
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(importer, is_package, node.level, node.module)
            names = [alias.name for alias in node.names]
            found.append((base, names, node.lineno))
            found += [(f"{base}.{name}", [], node.lineno) for name in names if name != "*"]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, [], node.lineno))
    return found


def violations(sources, known_modules=None):
    """``{(importer, imported, rule): line}`` for sources ``{module: (text, is_package)}``.

    ``rule`` is ``"layer"`` (a lower layer imports a higher one), ``"paper"`` (the library imports the paper
    drivers) or ``"private"`` (a private name imported from another module)."""
    known_modules = set(sources) if known_modules is None else known_modules
    found = {}
    for importer, (text, is_package) in sources.items():
        if importer in EXEMPT or importer.split(".")[0] != PACKAGE:
            continue
        mine = layer_of(importer)
        for imported, names, line in imports_of(text, importer, is_package):
            top = imported.split(".")[0]
            if top == PAPER:
                found.setdefault((importer, imported, "paper"), line)
                continue
            if top != PACKAGE:
                continue
            if imported not in known_modules and not names:
                continue  # "from pkg import name" also yields pkg.name, which is not always a module
            theirs = layer_of(imported)
            if mine is not None and theirs is not None and theirs > mine:
                found.setdefault((importer, imported, "layer"), line)
            parts = imported.split(".")
            for depth, part in enumerate(parts[1:], 1):
                owner = ".".join(parts[:depth])  # the package that holds the private module ``part``
                if part.startswith("_") and not part.startswith("__") and not (
                        importer == owner or importer.startswith(owner + ".")):
                    found.setdefault((importer, ".".join(parts[:depth + 1]), "private"), line)
            own_package = importer == imported.rsplit(".", 1)[0] and is_package
            for name in names:
                if name.startswith("_") and not name.startswith("__") and imported != importer:
                    submodule = f"{imported}.{name}"
                    if submodule in known_modules and (importer == imported or own_package):
                        continue  # a package importing its own private submodule
                    if is_package and (imported == importer or imported.startswith(importer + ".")):
                        continue  # a package __init__ re-exporting from its own submodules
                    found.setdefault((importer, f"{imported}.{name}", "private"), line)
    return found


def package_sources(root):
    sources = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        sources[module_name(path, root)] = (path.read_text(), path.name == "__init__.py")
    return sources


def _report(items):
    return "\n".join(f"  {importer} -> {imported} ({rule}, line {line})" for (importer, imported, rule), line in
                     sorted(items.items()))


def test_every_module_has_a_layer():
    missing = [name for name in package_sources(ROOT) if name not in EXEMPT and layer_of(name) is None
               and not name.startswith(("hf_csr.baselines", "hf_csr.metrics"))]
    assert not missing, f"add these modules to a layer of LAYERS (and to docs/architecture.md): {missing}"


def test_imports_respect_the_layers_and_private_names_stay_private():
    found = violations(package_sources(ROOT))
    new = {key: line for key, line in found.items() if key not in KNOWN_VIOLATIONS}
    assert not new, ("imports against docs/architecture.md (a lower layer may not import a higher one, hf_csr may "
                     "not import hf_csr_paper, private names stay in their module):\n" + _report(new))


def test_known_violations_still_exist():
    """Each listed violation must still be in the code: remove it from KNOWN_VIOLATIONS once it is fixed."""
    found = violations(package_sources(ROOT))
    stale = sorted(KNOWN_VIOLATIONS - set(found))
    assert not stale, f"fixed: remove from KNOWN_VIOLATIONS in {Path(__file__).name}: {stale}"


def test_the_paper_drivers_sit_above_the_library():
    assert (ROOT / PAPER).is_dir()
    found = violations(package_sources(ROOT))
    assert not [key for key in found if key[2] == "paper"]


# ----------------------------------------------------------------------------- the checker on synthetic sources
def _check(files):
    """Violations of synthetic ``{module: source}`` (a name ending in ``/`` is a package ``__init__``)."""
    sources = {name.rstrip("/"): (text, name.endswith("/")) for name, text in files.items()}
    return set(violations(sources))


def test_checker_flags_an_upward_import_in_every_form():
    up = ("hf_csr.attacks", "hf_csr.trainer", "layer")
    trainer = {"hf_csr.trainer": "X = 1\n"}
    assert up in _check({**trainer, "hf_csr.attacks": "from hf_csr.trainer import X\n"})
    assert up in _check({**trainer, "hf_csr.attacks": "from .trainer import X\n"})
    assert up in _check({**trainer, "hf_csr.attacks": "import hf_csr.trainer\n"})
    assert up in _check({**trainer, "hf_csr.attacks": "def f():\n    from . import trainer\n    return trainer\n"})
    assert up in _check({**trainer, "hf_csr.attacks": "import importlib\nimportlib.import_module('hf_csr.trainer')\n"})
    assert ("hf_csr.fairness.registry", "hf_csr.configuration", "layer") in _check({
        "hf_csr.configuration": "A = 1\n", "hf_csr.fairness.registry": "def f():\n    from ..configuration import A\n"})


def test_checker_accepts_downward_same_layer_and_type_checking_imports():
    assert not _check({
        "hf_csr.trainer": "from .attacks import pgd\nfrom .configuration import A\nfrom .hub.cards import card\n",
        "hf_csr.attacks": "from .utils import x\n", "hf_csr.utils": "x = 1\n", "hf_csr.configuration": "A = 1\n",
        "hf_csr.hub.cards": "card = 1\n",
        "hf_csr.fairness.context": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..trainer import T\n",
        "hf_csr.cli": "from .experiment import main\n", "hf_csr.experiment": "from .trainer import T\n",
    })


def test_checker_flags_the_paper_drivers_and_private_names():
    assert ("hf_csr.experiment", "hf_csr_paper.reproduction", "paper") in _check(
        {"hf_csr.experiment": "from hf_csr_paper.reproduction import run\n"})
    assert ("hf_csr.hub.push", "hf_csr.hub.cards._read_json", "private") in _check(
        {"hf_csr.hub.cards": "def _read_json(): pass\n", "hf_csr.hub.push": "from .cards import _read_json\n"})
    assert ("hf_csr.trainer", "hf_csr.data.core._helper", "private") in _check(
        {"hf_csr.data.core": "def _helper(): pass\n", "hf_csr.trainer": "from .data.core import _helper\n"})


def test_checker_flags_a_private_module_used_outside_its_package():
    assert ("hf_csr.experiment", "hf_csr.models._common", "private") in _check(
        {"hf_csr.models._common": "X = 1\n", "hf_csr.experiment": "from .models._common import X\n"})


def test_checker_lets_a_package_use_its_own_private_submodules():
    assert not _check({
        "hf_csr.models/": "from ._common import CIFAR10_MEAN\nfrom . import _common\n",
        "hf_csr.models._common": "CIFAR10_MEAN = 1\n",
        "hf_csr.models.wide_resnet": "from ._common import CIFAR10_MEAN\n",
    })


def test_checker_resolves_relative_imports():
    assert resolve("hf_csr.fairness.registry", False, 2, "configuration") == "hf_csr.configuration"
    assert resolve("hf_csr.fairness", True, 1, "registry") == "hf_csr.fairness.registry"
    assert resolve("hf_csr.trainer", False, 1, None) == "hf_csr"
    assert layer_of("hf_csr.hub.commands") == 6 and layer_of("hf_csr.hub.cards") == 4
    assert layer_of("hf_csr.evaluation.command") == 6 and layer_of("hf_csr.evaluation.report") == 3


@pytest.mark.parametrize("module", ["hf_csr", "hf_csr.baselines"])
def test_the_shims_are_exempt(module):
    assert not _check({module + "/": "from .trainer import CSRTrainer\nfrom .experiment import main\n"})


# ----------------------------------------------------------------------------- the test suite's own rule
def cross_module_imports(source):
    """Imports of other test code in a test module's ``source``: relative imports and ``tests.*``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] == "tests"):
            found.append(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "tests"]
    return found


def test_test_modules_share_code_through_fixtures_only():
    """tests/conftest.py (and a folder's conftest.py) hands shared helpers to the tests as fixtures; a test module
    imports neither another test module nor tests/support (only conftest files and the subprocess workers do)."""
    offenders = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        found = cross_module_imports(path.read_text())
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, f"use a fixture of tests/conftest.py instead of importing: {offenders}"
    assert cross_module_imports("from .conftest import ToyNet\nfrom tests.support import helpers\nimport tests.x\n") == [
        ".conftest", "tests.support", "tests.x"]
