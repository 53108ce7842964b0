"""Robust checkpoints out: upload a ``save_pretrained`` directory (weights, config, card, results, plots)."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Union

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.utils import httpx
from safetensors import SafetensorError, safe_open

from ..models.modeling_robust import RobustClassifierConfig
from ..utils import atomic_write_text, read_json_object
from ..validation import check_repo_id
from .cards import CARD_METADATA, render_directory_card

__all__ = ["PUSH_PATTERNS", "HubPushError", "check_checkpoint_dir", "push_checkpoint", "regular_files",
           "safe_checkpoint_files"]

logger = logging.getLogger(__name__)

#: What a push uploads. Pickles (``*.bin``, ``*.pt``, ...) never match: weights go up as safetensors only.
#: Weights, config and card are taken from the top level only (not from trainer ``checkpoint-*/`` folders).
PUSH_PATTERNS = (
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "timm_model.safetensors",  # timm's Hub-format weights of a backbone hf_csr does not register (models/timm_format.py)
    "README.md",
    "results.json",
    "*.png",
)


#: The model files of a trainer checkpoint that may leave the machine (no optimizer / RNG / CSR-state pickles).
MODEL_FILE_PATTERNS = ("config.json", "preprocessor_config.json", "model.safetensors", "model-*.safetensors",
                       "model.safetensors.index.json")
CHECKPOINT_PUSH_PATTERNS = MODEL_FILE_PATTERNS + ("trainer_state.json",)


def regular_files(directory: Union[str, os.PathLike]) -> List[Path]:
    """The regular files inside ``directory``, recursively, sorted: symbolic links (to files or folders) are
    never followed nor listed, and hidden entries (``.incomplete`` staging folders, ``.cache``, partial
    files) are skipped, so nothing from outside the folder, and nothing half-written, is ever uploaded."""
    root = Path(directory)
    found = []
    for current, folders, files in os.walk(root, followlinks=False):
        folders[:] = sorted(f for f in folders if not f.startswith(".") and not os.path.islink(os.path.join(current, f)))
        for name in files:
            path = Path(current) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            found.append(path)
    return sorted(found)


def safe_checkpoint_files(checkpoint_dir: Union[str, os.PathLike], *, model_only: bool = False) -> List[str]:
    """Names of the top-level files of a trainer checkpoint that may be pushed (regular files only)."""
    patterns = MODEL_FILE_PATTERNS if model_only else CHECKPOINT_PUSH_PATTERNS
    directory = Path(checkpoint_dir)
    return [p.name for p in regular_files(directory)
            if p.parent == directory and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local checkpoint directory is unchanged and the push can be retried."""


def check_checkpoint_dir(local_dir: Union[str, os.PathLike]) -> List[Path]:
    """Check that ``local_dir`` is a loadable hf_csr checkpoint; return the files a push would upload.

    Raises ``ValueError`` / ``FileNotFoundError`` naming the file at fault: a missing or invalid ``config.json``
    (not a ``robust_image_classifier``), missing weights, an unreadable (truncated) safetensors file, an
    invalid ``results.json``.
    """
    directory = Path(local_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist.")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json; save the model with save_pretrained first.")
    config = read_json_object(config_path)
    if config.get("model_type") != RobustClassifierConfig.model_type:
        raise ValueError(
            f"{str(config_path)!r} describes a {config.get('model_type')!r} model, not a "
            f"{RobustClassifierConfig.model_type!r} (hf_csr's RobustImageClassifier)."
        )
    weights = sorted(directory.glob("model*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        hint = f" (found pickles {pickles}, which are never uploaded)" if pickles else ""
        raise FileNotFoundError(f"{str(directory)!r} has no safetensors weights{hint}; save with save_pretrained.")
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"cannot read the weights {str(path)!r}: {error}. The file is truncated or corrupted; save the model again."
            ) from error
    if (directory / "results.json").is_file():
        from .cards import read_results

        read_results(directory / "results.json")
    files = regular_files(directory)
    return [p for p in files if any(fnmatch.fnmatch(p.relative_to(directory).as_posix(), pat) for pat in PUSH_PATTERNS)]


def push_checkpoint(
    local_dir: Union[str, os.PathLike],
    repo_id: str,
    *,
    token: Optional[Union[str, bool]] = None,
    private: Optional[bool] = None,
    commit_message: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    refresh_card: bool = True,
    extra_files: Optional[dict] = None,
) -> CommitInfo:
    """Upload a ``save_pretrained`` checkpoint directory to a Hub model repo (created if needed).

    Uploads, in one commit, the safetensors weights, ``config.json``, ``preprocessor_config.json``, the card
    ``README.md``, ``results.json`` and PNG plots (:data:`PUSH_PATTERNS`); never a pickle. Only regular files
    inside ``local_dir`` are uploaded: a symbolic link is not followed. With ``refresh_card`` (default) the card
    is re-rendered for ``repo_id`` first (its loading snippet, title and model-index name), keeping what
    ``card.json`` recorded. ``extra_files`` maps paths in the repo to local files to add to the same commit.
    The pushed repo loads with ``AutoModelForImageClassification.from_pretrained(repo_id)`` after ``import hf_csr``.

    Raises:
        HubPushError: the Hub refused or the connection failed; ``local_dir`` is left as it was and the
            message says what to retry.
    """
    check_repo_id(repo_id, "repo_id")
    directory = Path(local_dir)
    files = check_checkpoint_dir(directory)
    card = metadata = saved = None
    if refresh_card or not (directory / "README.md").exists():
        # rendered for repo_id now, written locally only once the push has succeeded
        card, metadata, saved = render_directory_card(directory, repo_id=repo_id)
        files = [p for p in files if p.relative_to(directory).as_posix() != "README.md"]
    listed = set(files) | {directory / "README.md"}
    skipped = sorted(p.relative_to(directory).as_posix() for p in regular_files(directory) if p not in listed)
    top_level = [name for name in skipped if "/" not in name]
    if top_level:
        logger.warning("Not uploading %d file(s) outside %s: %s", len(top_level), list(PUSH_PATTERNS), top_level[:10])
    if len(skipped) > len(top_level):
        logger.info("Not uploading %d file(s) in subfolders (checkpoints, caches).", len(skipped) - len(top_level))
    links = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_symlink())
    if links:
        logger.warning("Not following %d symbolic link(s) in %s: %s", len(links), directory, links[:10])
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(directory).as_posix(), path_or_fileobj=str(p))
                  for p in files]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    for path_in_repo, local in (extra_files or {}).items():
        local = Path(local)
        if local.is_symlink() or not local.is_file():
            raise ValueError(f"extra file {str(local)!r} is not a regular file; refusing to upload it.")
        operations.append(CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(local)))

    api = HfApi(token=token)
    step = f"create the repo {repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main") and not create_pr:
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = f"upload {len(operations)} file(s)"
        info = api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload robust checkpoint with hf_csr",
            revision=revision,
            create_pr=create_pr,
        )
    except (httpx.HTTPError, OSError) as error:
        raise HubPushError(
            f"pushing {str(directory)!r} to the Hub repo {repo_id!r} failed while trying to {step}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no details'}\n"
            f"The local checkpoint directory is unchanged. Fix the cause (network, token permissions, Hub status) "
            f"and retry: `hf-csr push {directory} {repo_id}` (files already on the Hub are not uploaded again)."
        ) from error
    if card is not None:
        atomic_write_text(directory / "README.md", str(card))
        if metadata != saved:
            atomic_write_text(directory / CARD_METADATA, json.dumps(metadata, indent=2) + "\n")
    logger.info("Pushed %s to %s (%s).", directory, repo_id, info.commit_url)
    return info
