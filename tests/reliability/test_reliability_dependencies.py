"""Dependencies (RELIABILITY.md, item 6): every requirement is bounded on both sides, the installed set
satisfies setup.py, and ``pip check`` finds no broken requirement. (``./run audit`` -- pip-audit -- needs a
vulnerability service and is opt-in; see RELIABILITY.md.)"""

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def setup_requirements():
    """install_requires and the extras of setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    extras = [r for group in keywords.get("extras_require", {}).values() for r in group]
    return [Requirement(r) for r in keywords["install_requires"] + extras]


@pytest.mark.parametrize("requirement", setup_requirements(), ids=str)
def test_requirement_is_capped_and_satisfied(requirement):
    operators = {spec.operator for spec in requirement.specifier}
    assert ">=" in operators and "<" in operators, f"{requirement}: needs a lower bound and a cap below the next major"
    for spec in requirement.specifier:
        if spec.operator == "<":
            major = spec.version.split(".")[0]
            assert spec.version in (f"{major}", f"{major}.0"), f"{requirement}: cap at a major version"
    installed = metadata.version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True), f"{requirement.name} {installed} violates {requirement}"


@pytest.mark.subprocess
def test_pip_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
