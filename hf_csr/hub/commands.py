"""The Hub subcommands of ``hf-csr``: ``convert``, ``convert-data``, ``card`` and ``push``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from ..arguments import add_command, add_option

__all__ = ["add_hub_commands"]

logger = logging.getLogger(__name__)


def _threat_model(text: str) -> dict:
    from ..utils import parse_pixel_value
    from ..validation import NORMS, check_budget

    norm, sep, eps = text.partition(":")
    if not sep or norm not in NORMS:
        raise argparse.ArgumentTypeError(f"expected NORM:EPS with NORM Linf or L2, e.g. Linf:8/255; got {text!r}")
    try:
        return {"norm": norm, "eps": check_budget(parse_pixel_value(eps, "eps"), norm, "--threat_model eps")}
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@contextlib.contextmanager
def _staged_directory(output: Path, overwrite: bool, keep=()) -> Iterator[Path]:
    """A fresh directory beside ``output`` that replaces it only once everything is written. ``--overwrite``
    never deletes an input: a ``keep`` path (the source checkpoint, the cache) inside ``output`` is refused."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ValueError(f"{str(output)!r} already exists and is not empty; pass --overwrite to replace it.")
    if output.exists() or output.is_symlink():
        target = output.resolve()
        for path in keep:
            if path is None:
                continue
            resolved = Path(path).expanduser().resolve()
            if resolved == target or target in resolved.parents:
                raise ValueError(
                    f"{str(output)!r} holds the input {str(path)!r}: replacing it (--overwrite) would delete the input. "
                    "Write to another output directory."
                )
        if output.is_symlink():
            raise ValueError(f"{str(output)!r} is a symbolic link; give a real directory as the output.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield staging
        if output.exists():  # --overwrite: move the old one aside, put the new one in place, then drop the old
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, old / output.name)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert(args: argparse.Namespace) -> int:
    from .cards import write_model_card
    from ..models.published import load_published, resolve_source

    entry, _, repo_id, filename = resolve_source(args.source, args.filename)
    model = load_published(
        args.source, filename=args.filename, backbone=args.backbone, num_classes=args.num_classes,
        dataset=args.dataset, threat_model=args.threat_model, revision=args.revision, cache_dir=args.cache_dir,
    )
    output = Path(args.output_dir)
    with _staged_directory(output, args.overwrite, keep=[Path(args.source), args.cache_dir]) as staging:
        model.save_pretrained(staging)
        license = args.license
        license_name = license_link = None
        if license is None and repo_id:  # a third-party model keeps its original's licence
            license, license_name, license_link = "other", "same-as-base-model", f"https://huggingface.co/{repo_id}"
        write_model_card(
            staging,
            base_model=repo_id,
            dataset=args.dataset or (entry.dataset if entry else None),
            license=license, license_name=license_name, license_link=license_link,
            training={"converted from": f"{repo_id}/{filename}" if repo_id else Path(args.source).name,
                      "backbone": model.config.backbone, **model.config.backbone_kwargs},
        )
    sys.stdout.write(f"wrote {output} ({model.config.backbone}, {model.config.num_labels} classes)\n")
    return 0


def _convert_data(args: argparse.Namespace) -> int:
    from ..data.generated import convert_generated_data, download_generated_data

    paths = [
        Path(source) if Path(source).is_file() else download_generated_data(source, revision=args.revision)
        for source in args.sources
    ]
    dataset = convert_generated_data(
        paths, args.output_dir, dataset=args.dataset, shard_size=args.shard_size, chunk_size=args.chunk_size,
        overwrite=args.overwrite,
    )
    sys.stdout.write(f"wrote {len(dataset)} images ({dataset.num_classes} classes) to {args.output_dir}\n")
    return 0


def _card(args: argparse.Namespace) -> int:
    from .cards import write_model_card

    training = None
    if args.training is not None:
        try:
            training = json.loads(Path(args.training).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--training {args.training!r} must be a readable JSON file: {error}") from error
    if training is not None and not isinstance(training, dict):
        raise ValueError(f"--training {args.training!r} must hold a JSON object (setting -> value).")
    path = write_model_card(
        args.checkpoint_dir, repo_id=args.repo_id, base_model=args.base_model, training=training, dataset=args.dataset,
        license=args.license,
    )
    sys.stdout.write(f"wrote {path}\n")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .push import HubPushError, push_checkpoint

    try:
        info = push_checkpoint(
            args.checkpoint_dir, args.repo_id, private=args.private, commit_message=args.commit_message,
            revision=args.revision, create_pr=args.create_pr, token=args.token,
        )
    except HubPushError as error:
        raise SystemExit(f"hf-csr push: error: {error}") from None
    sys.stdout.write(f"pushed {args.checkpoint_dir} to {args.repo_id}: {info.commit_url}\n")
    return 0


def _dataset_name(kind: str):
    """An argparse ``type`` checking a dataset name against the table ``kind`` ("checkpoint": the datasets of
    published checkpoints, "card": those a card can name) when the option is given (not at ``--help``)."""

    def check(text: str) -> str:
        if kind == "card":
            from .cards import CARD_DATASETS as known
        else:
            from ..data.registry import DATASETS as known
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown dataset {text!r}; choose one of {sorted(known)}")
        return text

    check.__name__ = "dataset name"
    return check


def add_hub_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``convert``, ``convert-data``, ``card`` and ``push`` on the ``hf-csr`` subparsers. Only argparse
    is needed here: the Hub modules are imported by the commands themselves."""
    convert = add_command(
        sub, "convert",
        help="convert a published robust checkpoint (DDPM-data, RobustBench, TRADES) into a save_pretrained directory",
        description="Converts a published robust checkpoint into a save_pretrained directory with a class-wise "
        "model card. The known published names are hf_csr.models.published.PUBLISHED_CHECKPOINTS (an unknown name is refused "
        "with the list), e.g. wrn28_10_ddpm.dm_cifar10_linf.",
    )
    convert.add_argument("source", help="a published name, a Hub repo id (with --filename) or a local .pt/.safetensors file")
    convert.add_argument("output_dir", help="the directory to write (save_pretrained layout, README.md card)")
    source = convert.add_argument_group("source")
    add_option(source, "--filename", help="the checkpoint file inside the Hub repo")
    add_option(source, "--revision", help="Hub revision (branch, tag or commit) of the source")
    add_option(source, "--cache_dir", help="Hugging Face cache directory for the download (default: the HF cache)")
    model = convert.add_argument_group("model")
    add_option(model, "--backbone", help="timm backbone name (default: inferred from the keys)")
    add_option(model, "--num_classes", type=int, help="number of classes (default: from --dataset or the weights)")
    add_option(model, "--dataset", type=_dataset_name("checkpoint"),
               help="dataset of the checkpoint, for class names and mean/std, e.g. cifar10 (default: inferred)")
    add_option(model, "--threat_model", type=_threat_model, help="NORM:EPS the model was trained for, e.g. Linf:8/255 or L2:128/255")
    output = convert.add_argument_group("output")
    add_option(output, "--overwrite", action="store_true",
               help="replace output_dir (never allowed when it holds the source file)")
    add_option(output, "--license", help="the card's licence id (default: the original's, via its Hub repo)")
    convert.set_defaults(func=_convert)

    data = add_command(sub, "convert-data", help="stream DDPM-generated .npz images into memory-mapped shards",
                       description="Streams DDPM-generated .npz images (image/label arrays) into memory-mapped "
                       "shards that the recipes read with --generated_data.")
    data.add_argument("sources", nargs="+", help="local .npz files, or files of the Hub dataset P2333/DM-Improves-AT (cifar10/1m.npz)")
    data.add_argument("output_dir", help="the directory of the shards")
    group = data.add_argument_group("conversion")
    add_option(group, "--dataset", type=_dataset_name("checkpoint"), default="cifar10",
               help="dataset whose class names the labels index (default: %(default)s)")
    add_option(group, "--shard_size", type=int, default=1_000_000, help="images per shard (default: %(default)s)")
    add_option(group, "--chunk_size", type=int, default=4096, help="images held in memory at a time (default: %(default)s)")
    add_option(group, "--revision", help="revision of the Hub dataset (default: main)")
    add_option(group, "--overwrite", action="store_true", help="replace an existing output_dir")
    data.set_defaults(func=_convert_data)

    card = add_command(sub, "card", help="(re)write the model card README.md of a checkpoint directory",
                       description="(Re)writes the class-wise model card (README.md) of a checkpoint directory from "
                       "its config, results.json and card.json.")
    card.add_argument("checkpoint_dir", help="a save_pretrained directory")
    group = card.add_argument_group("card")
    add_option(group, "--repo_id", help="the Hub repo id the card names (its loading snippet and title)")
    add_option(group, "--base_model", help="the Hub id of the model this one was fine-tuned or converted from")
    add_option(group, "--training", help="JSON file with the training set-up (setting -> value)")
    add_option(group, "--dataset", type=_dataset_name("card"), help="the training dataset the card names, e.g. cifar10")
    add_option(group, "--license", help="licence id for the card's metadata (default: apache-2.0, or as recorded)")
    card.set_defaults(func=_card)

    push = add_command(sub, "push", help="upload a checkpoint directory (safetensors, config, card, results, plots); the card "
                       "is refreshed for the repo id first; symbolic links are not followed",
                       description="Uploads a checkpoint directory to a Hub model repo (created if needed) in one "
                       "commit: safetensors weights, config, card, results and plots, never a pickle.")
    push.add_argument("checkpoint_dir", help="a save_pretrained directory")
    push.add_argument("repo_id", help="the Hub model repo, namespace/name")
    group = push.add_argument_group("Hub")
    add_option(group, "--token", default=None,
               help="Hugging Face token with write access (default: HF_TOKEN or the `hf auth login` token)")
    add_option(group, "--private", action="store_true", default=None, help="create the repo private (when it is new)")
    add_option(group, "--commit_message", help="the commit message (default: one naming the checkpoint)")
    add_option(group, "--revision", help="branch to push to (created if needed)")
    add_option(group, "--create_pr", action="store_true", help="open a pull request instead of committing to the branch")
    push.set_defaults(func=_push)
