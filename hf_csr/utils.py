"""Small shared helpers: input checks, pixel-unit parsing, model-output handling, atomic writes."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping, Optional, Union

import torch

__all__ = [
    "parse_pixel_value",
    "check_pixel_values",
    "inputs_prevalidated",
    "input_checks_enabled",
    "as_logits",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save",
    "apply_umask",
    "derived_seed",
    "ensure_writable_dir",
    "process_log_level",
    "set_library_log_level",
    "setup_console_logging",
    "quiet_http_logging",
    "hub_file",
    "public_path",
    "scrub_paths",
    "read_json_object",
]

_INPUT_CHECKS = contextvars.ContextVar("hf_csr_input_checks", default=True)


def parse_pixel_value(value: Union[str, float, int], name: str = "value") -> float:
    """Parse a budget given as a number or a fraction string such as ``"8/255"``.

    Only digits, one ``/`` and a decimal point are accepted (no ``eval``).
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number or a fraction like '8/255'; got {value!r}.")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                frac = Fraction(num.strip()) / Fraction(den.strip())
                return float(frac)
            return float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ValueError(f"{name} must be a number or a fraction like '8/255'; got {value!r}.")


@contextlib.contextmanager
def inputs_prevalidated() -> Iterator[None]:
    """Within this context, models skip their per-forward ``pixel_values`` range check.

    The attacks use it: their iterates are projected onto [0, 1] by construction, and a range check
    per attack step would cost a device synchronisation each time.
    """
    token = _INPUT_CHECKS.set(False)
    try:
        yield
    finally:
        _INPUT_CHECKS.reset(token)


def input_checks_enabled() -> bool:
    return _INPUT_CHECKS.get()


def check_pixel_values(
    pixel_values: Any, *, num_channels: Optional[int] = None, name: str = "pixel_values"
) -> None:
    """Raise ``ValueError`` unless ``pixel_values`` is a finite float (N, C, H, W) tensor in [0, 1].

    hf_csr's convention (AutoAttack's too): images are in [0, 1] and the model normalises them
    itself, so that ``eps`` is in pixel units.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, C, H, W); got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"{name} must have shape (N, C, H, W); got {tuple(pixel_values.shape)}. "
            "Add a batch dimension (x[None]) or a channel dimension (x[:, None]) as needed."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor in [0, 1]; got dtype {pixel_values.dtype}. "
            "Convert uint8 images with x.float() / 255."
        )
    if num_channels is not None and pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"{name} has {pixel_values.shape[1]} channels but the model expects num_channels = {num_channels} "
            f"(shape {tuple(pixel_values.shape)}, channels first)."
        )
    if pixel_values.numel() == 0:
        return
    lo, hi = torch.aminmax(pixel_values.detach())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf values; images must be finite and in [0, 1].")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1] (hf_csr models normalise with mean/std internally); got values in "
            f"[{lo:.4g}, {hi:.4g}]. Pass un-normalised images (e.g. drop transforms.Normalize, divide uint8 by 255)."
        )


def as_logits(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, a ``ModelOutput``/dict with ``logits``, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"cannot find logits in the model output of type {type(output).__name__}; the model must return "
            "a tensor, a tuple whose first element is the logits, or an object with a `logits` field."
        )
    return logits


def current_umask() -> int:
    """The process's umask, read at each call (it can change while the process runs)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # Linux: read without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(*paths: Union[str, Path]) -> None:
    """Give files the permissions ``open()`` would have given them (``0o666 & ~umask``).

    Writers that go through a temporary file (``tempfile.mkstemp``, safetensors' ``save_file``) create it
    with mode 0600; the final file should be readable as any other file the user writes. A directory
    applies to every file under it (for folders written in full just before, e.g. a staged checkpoint)."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        path = Path(path)
        files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()] if path.is_dir() else [path]
        for file in files:
            os.chmod(file, mode)


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        apply_umask(tmp)  # mkstemp creates 0600; the file gets what open() would give it
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch`` / ``torchrun``) started: the largest of
    ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` (1 for a plain run or an unreadable value)."""
    counts = []
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        try:
            counts.append(int(os.environ.get(name, "1") or 1))
        except ValueError:
            counts.append(1)
    return max(max(counts), 1)


def read_json_object(path: Union[str, Path]) -> dict:
    """A JSON file that must hold an object; ``ValueError`` naming the file when it is truncated, corrupted or
    holds something else (the caller adds what the file is for)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read {str(path)!r}: {error}.") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({error}); the file is truncated or corrupted: delete or regenerate it."
        ) from error
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object; got a {type(value).__name__}. Delete or regenerate it.")
    return value


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: never a half-written file."""
    _atomic_replace(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Union[str, Path], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` through a temporary file (the result loads with ``weights_only=True``)."""
    _atomic_replace(Path(path), lambda handle: torch.save(obj, handle))


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed determined by ``parts`` alone (e.g. the run's seed, a purpose, a step): generators
    seeded with it draw the same numbers on every process and after a resume."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def ensure_writable_dir(path: Union[str, Path], name: str, hint: str = "") -> Path:
    """Create ``path`` if needed and check that a file can be written in it, before any long work;
    otherwise a ``ValueError`` naming the argument ``name`` (and ``hint``: what goes there)."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ValueError(f"{name} {str(directory)!r} is not a writable directory ({error}).{hint}") from error
    return directory


# --------------------------------------------------------------------------- console
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
               "critical": logging.CRITICAL}
#: Libraries that log every HTTP request at INFO (huggingface_hub's client): kept at WARNING.
_CHATTY_LOGGERS = ("httpx", "httpcore")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def process_log_level(args: Any) -> int:
    """The log level of this process for training arguments ``args``, as transformers sets its own logger's:
    ``args.log_level`` on the main process (INFO when ``passive``: hf_csr's INFO lines are the run's report),
    ``args.log_level_replica`` on the other processes (WARNING when ``passive``), so that every line appears
    once and the replicas speak up only for warnings. The main process is the one with ``args.should_log``
    (the first process, or each node's first with ``log_on_each_node``)."""
    if args.should_log:
        return _LOG_LEVELS.get(str(args.log_level).lower(), logging.INFO)
    return _LOG_LEVELS.get(str(args.log_level_replica).lower(), logging.WARNING)


class _UntilConfiguredHandler(logging.StreamHandler):
    """Shows hf_csr's records on stderr while the application has not configured logging (the root logger
    has no handler, e.g. a plain Python session); once it has, the root handlers show them (no duplicates)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # the current one (not setStream: it flushes the previous, maybe closed, stream)
        super().emit(record)


def set_library_log_level(level: int) -> None:
    """Set the level of the ``hf_csr`` loggers (and make sure its records are shown somewhere)."""
    library = logging.getLogger(__name__.split(".")[0])
    library.setLevel(level)
    if not any(isinstance(handler, _UntilConfiguredHandler) for handler in library.handlers):
        handler = _UntilConfiguredHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        library.addHandler(handler)


def setup_console_logging(level: int = logging.INFO) -> None:
    """An application's console (the recipes, ``hf-csr``): timestamped lines at ``level`` on stderr, and no
    line per HTTP request (``httpx``/``httpcore`` at WARNING). DEBUG applies to hf_csr's own loggers; the
    other libraries stay at INFO (their DEBUG lines -- fonts, image plugins, connections -- would drown it)."""
    logging.basicConfig(level=level, format=_LOG_FORMAT)
    logging.getLogger().setLevel(max(level, logging.INFO))
    set_library_log_level(level)
    quiet_http_logging(level)


def quiet_http_logging(level: int = logging.INFO) -> None:
    """No line per HTTP request: ``httpx``/``httpcore`` at WARNING (or ``level`` when higher)."""
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def hub_file(repo_id: str, filename: str, *, repo_type: str = "model", revision: Optional[str] = None, **kwargs) -> Path:
    """``hf_hub_download`` (HF cache, ``HF_ENDPOINT``, offline mode), with a clear error when the file is
    neither cached nor reachable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    logging.getLogger(__name__).info("Fetching %s from the Hub %s repo %s (revision %s).", filename, repo_type, repo_id, revision or "main")
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision, **kwargs))
    except RemoteEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{filename!r} does not exist in the Hub {repo_type} repo {repo_id!r} at revision {revision or 'main'!r}."
        ) from error
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{filename!r} of the Hub {repo_type} repo {repo_id!r} is not in the HF cache and the Hub cannot be reached "
            f"(offline mode HF_HUB_OFFLINE=1, local_files_only, or no connection): {error} Download it where the Hub "
            "is reachable (the same cache works offline afterwards) or pass a local file."
        ) from error


def public_path(value: Any) -> Any:
    """A string that names a local file or folder (absolute, or existing here) -> its last component, so
    nothing pushed to the Hub (card, results.json) reveals a local path; Hub ids and other values unchanged."""
    if not isinstance(value, str) or not value or "\n" in value or len(value) > 4096:
        return value
    if value.startswith("local-dir:"):  # timm's local folders
        return "local-dir:" + str(public_path(value[len("local-dir:"):]))
    try:
        local = os.path.isabs(value) or value.startswith(("~", "./", "../")) or os.path.exists(value)
    except (OSError, ValueError):
        return value
    return PurePosixPath(value.replace(os.sep, "/").rstrip("/")).name or value if local else value


def scrub_paths(value: Any) -> Any:
    """:func:`public_path` applied to every string inside ``value`` (dicts, lists)."""
    if isinstance(value, Mapping):
        return {key: scrub_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_paths(item) for item in value]
    return public_path(value)
