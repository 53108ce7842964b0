"""No file in the repository refers to a path outside it.

A clone must be complete on its own: a link, a command or a test that reaches beside the clone (a
sibling folder of the developers' machine) or into a machine's absolute paths works on one machine and
is broken in every other clone. The scan reads every tracked text file and fails on

* a relative link of a Markdown file (``[text](target)``, ``[label]: target``) that resolves outside the
  repository root (from the Markdown file's own folder, as a renderer resolves it);
* a path token that climbs with ``../`` out of the repository, read from the file's folder, or read from the
  repository root (where the commands and scripts run) unless it names a file from the file's folder;
* ``Path(__file__)`` climbing above the root (``.parents[N]`` or ``.parent`` chains), and the parent of
  the root variable (``REPO``, ``REPO_ROOT``, ``ROOT``);
* an absolute path into a machine's own folders (``/work/``, ``/home/``, ``/root/``, ``/Users/``, ``/tmp/`` ...).

URLs are not paths. Deliberately hostile inputs of the tests (a repo id that climbs out of the folder and
must be refused) are listed in ``HOSTILE_INPUTS``, file by file.
"""

import os
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
UP = ".." + "/"  # spelled in two pieces so that this file does not match its own patterns

#: Strings that tests feed to the library as attacks on its path checks (they must stay, and are refused).
HOSTILE_INPUTS = {
    "tests/unit/test_hub_cards.py": {UP + "outside.png", UP + UP.rstrip("/") + "/etc"},
    "tests/reliability/test_reliability_files.py": {UP + UP + "etc/passwd"},
}
MACHINE_ROOTS = ("work", "home", "root", "Users", "tmp", "mnt", "scratch", "srv", "opt")

URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
MD_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
CLIMB = re.compile(r"(?<![\w./-])((?:\.\./)+[\w.@+-][\w./@+-]*)")
ABSOLUTE = re.compile(r"(?<![\w.:/~$-])(/(?:" + "|".join(MACHINE_ROOTS) + r")/[\w.@+-][\w./@+-]*)")
FILE_PARENTS = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?(\.parents\[(\d+)\]|(?:\.parent\b)+)")
ROOT_PARENT = re.compile(r"\b(?:REPO|REPO_ROOT|ROOT|PROJECT_ROOT)\.parent\b")


def tracked_files(root):
    """The repository's tracked files (git), or every file outside .git/.venv when git is not available."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60)
        return [root / name for name in listed.stdout.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache"}
        found = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            found += [Path(folder) / name for name in files]
        return found


def read_text(path):
    try:
        data = path.read_bytes()
    except OSError:  # a tracked file deleted in the working tree, a dangling link
        return None
    if b"\0" in data[:8192] or len(data) > 4_000_000:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def escapes(root, base, target):
    """Whether ``target`` (relative, POSIX) read from folder ``base`` lands outside ``root``."""
    parts = []
    for part in PurePosixPath(*base.relative_to(root).parts, target).parts:
        if part == "..":
            if not parts:
                return True
            parts.pop()
        elif part != ".":
            parts.append(part)
    return False


def outside_references(root, path, text):
    """``(line, what)`` for each reference of ``text`` (the file ``path`` under ``root``) to a path outside ``root``."""
    found = []
    relative = path.relative_to(root).as_posix()
    allowed = HOSTILE_INPUTS.get(relative, set())
    for number, line in enumerate(text.splitlines(), 1):
        line = URL.sub(" ", line)
        links = set()
        if path.suffix == ".md":
            for match in MD_LINK.finditer(line):
                target = (match.group(1) or match.group(2) or "").split("#")[0]
                if target and not target.startswith(("/", "#", "mailto:")) and escapes(root, path.parent, target):
                    found.append((number, f"link {target!r}"))
                    links.add(target)
        for token in CLIMB.findall(line):
            token = token.rstrip(".,;:")
            if token in allowed or token in links:
                continue
            if escapes(root, path.parent, token) or (escapes(root, root, token) and not (path.parent / token).exists()):
                found.append((number, f"path {token!r}"))
        for token in ABSOLUTE.findall(line):
            found.append((number, f"absolute path {token!r}"))
        if path.suffix == ".py":
            depth = len(path.relative_to(root).parts) - 1  # folders between the root and the file
            for chain, index in FILE_PARENTS.findall(line):
                up = int(index) + 1 if index else chain.count(".parent")
                if up - 1 > depth:
                    found.append((number, f"Path(__file__) {up} levels up, above the repository root"))
            if ROOT_PARENT.search(line):
                found.append((number, "a step from the repository root to its parent folder"))
    return [(relative, number, what) for number, what in found]


def scan(root):
    problems = []
    for path in tracked_files(root):
        text = read_text(path)
        if text is not None:
            problems += outside_references(root, path, text)
    return problems


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    problems = scan(ROOT)
    assert not problems, "files refer to paths outside the repository (keep everything a clone needs inside it; " \
        "name an outside resource by an environment variable instead):\n" + "\n".join(
            f"  {name}:{line}: {what}" for name, line, what in problems)


# ----------------------------------------------------------------------------- the checker itself
def _write(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("name, text", [
    ("README.md", "The contract: [method](" + UP + "shared/METHOD" + ".md).\n"),
    ("docs/guide.md", "See [the top](" + UP + UP + "elsewhere/notes.md).\n"),
    ("docs/guide.md", "[ref]: " + UP + UP + "outside.md\n"),
    ("README.md", "Run `bash " + UP + "shared/peer-tests/timm/run.sh`.\n"),
    ("tests/test_x.py", "SUITE = '" + UP + UP + UP + "shared/run.sh'\n"),
    ("tests/test_x.py", "ROOT = Path(__file__).resolve().parents[2]\n"),
    ("tests/test_x.py", "ROOT = Path(__file__).parent.parent.parent\n"),
    ("tests/test_x.py", "SUITE = REPO_ROOT" + ".parent / 'shared'\n"),
    ("setup.cfg", "cache = /work/" + "cache/x\n"),
    ("docs/guide.md", "Copied from /home/" + "someone/project.\n"),
])
def test_the_checker_finds_outside_references(tmp_path, name, text):
    _write(tmp_path, {name: text})
    assert outside_references(tmp_path, tmp_path / name, text), text


@pytest.mark.parametrize("name, text", [
    ("README.md", "The contract: [method](docs/method.md), [arch](./docs/architecture.md#layers).\n"),
    ("docs/guide.md", "Back to the [README](" + UP + "README.md) and [tests](" + UP + "tests/conftest.py).\n"),
    ("docs/guide.md", "A [link](https://github.com/org/repo/blob/main/" + UP + "x.md) is a URL.\n"),
    ("tests/unit/test_x.py", "ROOT = Path(__file__).resolve().parents[2]\nDATA = '" + UP + "support/data.npz'\n"),
    ("tests/test_x.py", "ROOT = Path(__file__).parent.parent\n"),
    ("README.md", "Data on a shared file system: `hf-csr convert-data x.npz /shared/ddpm-1m`; `/proc/self/status`.\n"),
])
def test_the_checker_accepts_references_inside(tmp_path, name, text):
    _write(tmp_path, {name: text, "README.md": "x", "tests/conftest.py": "x", "tests/support/data.npz": "x"})
    assert outside_references(tmp_path, tmp_path / name, text) == []


def test_the_scan_reads_the_tracked_files(tmp_path):
    """On a real git checkout with an outside link: the scan lists it (so the repository test cannot pass vacuously)."""
    _write(tmp_path, {"README.md": "[m](" + UP + "shared/METHOD" + ".md)\n", "ok.md": "[r](README.md)\n"})
    try:
        subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, timeout=60)
        subprocess.run(["git", "add", "README.md", "ok.md"], cwd=tmp_path, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available")
    assert [(name, line) for name, line, _ in scan(tmp_path)] == [("README.md", 1)]
    assert len(tracked_files(ROOT)) > 50 and ROOT / "README.md" in tracked_files(ROOT)
