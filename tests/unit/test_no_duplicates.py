"""One place for each piece of code: no run of six or more identical lines appears twice in the package.

The ``evaluate`` metric scripts under ``hf_csr/metrics/<name>/`` are exempt: ``evaluate`` copies each
script alone into its cache, so each carries its own copy of the helpers it shares with the others.
Those copies sit between ``# --- shared copy: NAME`` / ``# --- end of shared copy: NAME`` markers, and
the second test keeps every copy of a NAME identical.
"""

import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hf_csr"
METRIC_SCRIPTS = PACKAGE / "metrics"
RUN = 6
#: Lines too thin to make a run by themselves (closing brackets and the like).
TRIVIAL = re.compile(r"^[\s()\[\]{},:;]*$")
#: Runs that are the same shape on purpose, each with the reason; empty today.
ALLOWED: dict = {}


def _package_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.parent == METRIC_SCRIPTS:  # hf_csr/metrics/<name>/*.py: self-contained scripts
            continue
        yield path


def _lines(path: Path):
    """(line number, stripped text) of the lines that count: code that is not blank, a comment, a closing
    bracket, a bare docstring quote or part of an import statement."""
    in_import = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if in_import:
            in_import = ")" not in text
            continue
        if text.startswith(("import ", "from ")) and (text.startswith("import ") or " import " in text):
            in_import = text.endswith("(")
            continue
        if text and not text.startswith("#") and not TRIVIAL.match(text) and text not in ('"""', "'''"):
            yield number, text


def test_no_run_of_six_identical_lines_appears_twice_in_the_package():
    places = defaultdict(list)
    for path in _package_files():
        lines = list(_lines(path))
        for start in range(len(lines) - RUN + 1):
            window = tuple(text for _, text in lines[start : start + RUN])
            places[window].append(f"{path.relative_to(PACKAGE.parent)}:{lines[start][0]}")
    repeated = {window: where for window, where in places.items() if len(where) > 1 and window not in ALLOWED}
    report = "\n".join(f"  {' = '.join(where)}:\n    " + "\n    ".join(window) for window, where in repeated.items())
    assert not repeated, (
        f"{len(repeated)} run(s) of {RUN} identical lines appear more than once in hf_csr/ (write the code once and "
        f"call it from both places):\n{report}"
    )


def test_the_metric_scripts_shared_copies_are_identical():
    begin = re.compile(r"^# --- shared copy: (\w+)")
    copies = defaultdict(dict)
    scripts = sorted(METRIC_SCRIPTS.glob("*/*.py"))
    for path in scripts:
        name, block = None, []
        for line in path.read_text(encoding="utf-8").splitlines():
            match = begin.match(line)
            if match:
                assert name is None, f"{path}: shared copy {match.group(1)} opens inside {name}"
                name, block = match.group(1), []
            elif name is not None and line == f"# --- end of shared copy: {name}":
                assert name not in copies or path not in copies[name], f"{path}: two shared copies named {name}"
                copies[name][path] = "\n".join(block)
                name = None
            elif name is not None:
                block.append(line)
        assert name is None, f"{path}: shared copy {name} is never closed"
    assert {"citation", "check_labels"} <= set(copies), sorted(copies)
    assert len(copies["citation"]) == len([p for p in scripts if p.name != "__init__.py"])
    for name, texts in copies.items():
        assert len(texts) >= 2, f"the shared copy {name} appears only in {list(texts)}"
        first_path, first = next(iter(texts.items()))
        for path, text in texts.items():
            assert text == first, f"the shared copy {name} differs between {first_path} and {path}; make them equal"
