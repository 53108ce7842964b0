"""``hf-csr evaluate``: class-wise robust evaluation of a checkpoint, written to an output directory."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional, Tuple

from ..arguments import add_command, add_option

__all__ = ["add_evaluate_parser", "add_model_arguments", "run_evaluate"]

logger = logging.getLogger(__name__)


INPUT_CONVENTION = """\
input convention: images are fed to the model as float pixel values in [0, 1] (uint8 / 255), without
normalisation; the model normalises them itself (hf_csr's RobustImageClassifier does, with the mean/std of
its config; a transformers model's image processor or a timm model's pretrained config is folded into the
model; a module:factory model gets --mean/--std), so --eps is in pixel units as in AutoAttack and
RobustBench. Pixel values outside [0, 1] are an error.

outputs (in --output_dir): results.json, results.md (the table, also printed), confusion_matrix.png
(the robust confusion matrix of the headline attack, paper Fig. 3), classwise_accuracy.png and, with
--train_dataset, train_test_scatter.png (paper Fig. 2).

interruptions: progress is kept per attack and per batch in <output_dir>/.progress; if the evaluation is
killed, run the same command again (with any number of processes) and it continues where it stopped, with
identical numbers (--no_resume turns this off). Progress left by an evaluation of another model, data set,
attack list, threat model or seed is removed, with a warning. The folder is removed once the evaluation has
finished.

several processes or machines: launch the same command with `accelerate launch -m hf_csr.cli evaluate ...`
or `torchrun --nproc_per_node N -m hf_csr.cli evaluate ...`. Each process attacks every N-th batch (on its own
GPU, cuda:<local rank>, unless --device says otherwise); the per-example outcomes are gathered and the main
process alone writes the outputs. The random starts are keyed per example, so the numbers do not depend on
the number of processes, and for clean, PGD, CW, APGD and FAB-T not on --batch_size either (results.json's
"randomness" lists what does). With several machines, --output_dir must be on a shared file system.

example:
  hf-csr evaluate --model ./my-checkpoint --dataset fashion_mnist --split test --limit 1000 \\
      --attacks clean,pgd20,cw20,autoattack --norm Linf --eps 8/255 --output_dir eval/
"""


def add_model_arguments(parser) -> None:
    """``--model`` and the options of a plain PyTorch classifier (read by
    :func:`hf_csr.models.loading.load_model_from_args`)."""
    add_option(
        parser, "--model", required=True,
        help="an hf_csr or transformers model (directory or Hub repo; a transformers model's image processor is folded "
             "in), a published checkpoint name or .pt/.safetensors file, a timm model (timm/<name>, hf-hub:..., "
             "local-dir:<folder>, a timm-format folder), or package.module:factory with --weights")
    add_option(parser, "--weights", default=None, help="state-dict file for --model package.module:factory")
    add_option(parser, "--input_size", default=None,
               help="C,H,W the model expects (package.module:factory; inputs are resized to H x W)")
    add_option(parser, "--num_classes", type=int, default=None, help="number of classes (module:factory)")
    add_option(parser, "--class_names", default=None, help="comma-separated class names (module:factory)")
    add_option(parser, "--mean", default=None, help="comma-separated per-channel mean the model expects on [0, 1] "
                                                    "inputs (module:factory; default: no normalisation)")
    add_option(parser, "--std", default=None, help="comma-separated per-channel std (with --mean)")
    add_option(parser, "--factory_kwargs", default=None, help="JSON object of keyword arguments for the factory")


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``hf-csr`` subparsers (argparse only: the evaluation is imported when it runs)."""
    parser = add_command(
        subparsers, "evaluate",
        help="clean, PGD-20, CW-20 and AutoAttack accuracy of a checkpoint, class by class",
        description="Evaluate an image classifier clean and under attacks, reporting average and per-class "
        "accuracy, the worst class and the robust confusion matrix with its norms.",
        epilog=INPUT_CONVENTION,
    )
    add_model_arguments(parser.add_argument_group("model"))
    data = parser.add_argument_group("data")
    add_option(data, "--dataset", required=True,
               help="fashion_mnist, a .npz file (image/label arrays), a .parquet file, a local datasets "
               "folder (imagefolder, save_to_disk) or a Hub dataset id such as uoft-cs/cifar10")
    add_option(data, "--split", default="test", help="dataset split (default: test)")
    add_option(data, "--image_column", default=None, help="image column (default: auto-detected)")
    add_option(data, "--label_column", default=None, help="label column (default: auto-detected)")
    add_option(data, "--limit", type=int, default=None, help="evaluate a class-stratified random subset of N examples")
    add_option(data, "--train_dataset", default=None,
               help="also evaluate this training set (same forms as --dataset) for the train-vs-test "
               "class-wise agreement of paper Fig. 2")
    add_option(data, "--train_split", default="train", help="split of --train_dataset (default: train)")
    add_option(data, "--train_limit", type=int, default=None,
               help="subset size for the training set (default: --limit)")
    attacks = parser.add_argument_group("attacks")
    add_option(attacks, "--attacks", default="clean,pgd20,cw20,autoattack",
               help="comma-separated: clean, pgd<steps>, cw<steps>, autoattack, autoattack:<a>+<b> "
               "(components apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square); default: %(default)s")
    add_option(attacks, "--norm", choices=["Linf", "L2"], default=None,
               help="threat model (default: the model config's threat_model, else Linf)")
    add_option(attacks, "--eps", default=None,
               help="budget in pixel units, e.g. 8/255 (default: the model config's, else 8/255 for Linf, 0.5 for L2)")
    add_option(attacks, "--autoattack_version", choices=["standard", "rand"], default="standard",
               help="the version run by 'autoattack' (rand: for randomised defences, reported as autoattack-rand)")
    add_option(attacks, "--seed", type=int, default=0, help="seed of the random starts and of --limit's subsets")
    output = parser.add_argument_group("output")
    add_option(output, "--output_dir", default="robustness_eval",
               help="where to write the results (default: %(default)s)")
    add_option(output, "--no_card", action="store_true",
               help="do not write the model card (README.md) into --output_dir; by default the card is "
                    "written, and refreshed at every evaluation when --output_dir is the model directory")
    add_option(output, "--no_progress", action="store_true", help="hide the progress bars")
    run = parser.add_argument_group("run")
    add_option(run, "--batch_size", type=int, default=128, help="examples per batch (AutoAttack runs per batch)")
    add_option(run, "--autocast", choices=["bf16", "fp16"], default=None, help="run the model under autocast")
    add_option(run, "--device", default=None, help="e.g. cuda, cuda:1 or cpu (default: cuda if available)")
    add_option(run, "--resume_dir", default=None,
               help="keep per-attack, per-batch progress here; rerun the same command to resume "
               "(default: <output_dir>/.progress, removed once the evaluation has finished)")
    add_option(run, "--no_resume", action="store_true",
               help="keep no progress: an interrupted evaluation starts again from the beginning")
    parser.set_defaults(func=run_evaluate)
    return parser


def _load_model(args, device):
    """Any classifier, in pixel space (hf_csr.models.loading.load_robust_model)."""
    from ..models.loading import load_model_from_args

    return load_model_from_args(args, device)


def _check_eps(text: str, norm: Optional[str]) -> float:
    """--eps is checked before the model is loaded (a typo must not cost a download)."""
    from ..utils import parse_pixel_value

    from ..validation import check_budget

    return check_budget(parse_pixel_value(text, name="--eps"), norm, "--eps")


def _threat_model(model, norm: Optional[str], eps: Optional[float]) -> Tuple[str, float]:
    config = getattr(getattr(model, "config", None), "threat_model", None) or {}
    norm = norm or config.get("norm", "Linf")
    if eps is not None:
        return norm, eps
    if config.get("norm") == norm and "eps" in config:
        return norm, float(config["eps"])
    return norm, 8 / 255 if norm == "Linf" else 0.5


def _write_card(model: str, output_dir: Path, results: dict, config) -> Path:
    """The class-wise model card of the evaluated model, in ``output_dir/README.md``.

    The training set-up and base model come from the model directory's ``card.json`` (written with its card at
    the end of training or conversion) when ``model`` is a local directory; a Hub id becomes the card's repo id.
    """
    from ..hub.cards import CARD_METADATA, CARD_METADATA_KEYS, write_model_card
    from ..hub.cards import read_card_metadata  # checked: a malformed card.json is a named error

    kwargs = {}
    model_dir = Path(model)
    if model_dir.is_dir():
        if model_dir.resolve() != output_dir.resolve() and (model_dir / CARD_METADATA).is_file():
            saved = read_card_metadata(model_dir / CARD_METADATA)
            kwargs = {key: saved[key] for key in CARD_METADATA_KEYS if saved.get(key) is not None}
    elif model.count("/") == 1:
        kwargs["repo_id"] = model
    config_dict = config.to_dict() if hasattr(config, "to_dict") else None
    return write_model_card(output_dir, results, config=config_dict, **kwargs)


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_image_dataset
    from ..utils import ensure_writable_dir, launched_processes
    from ..validation import check_budget, check_finite_model
    from .specs import check_attack_list
    from .robustness import evaluate_robustness
    from .sharding import Shards

    distributed = launched_processes() > 1
    default_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if distributed:
        from accelerate import PartialState

        # initialises the torch.distributed group (gloo on CPUs, NCCL on GPUs) from the launcher's variables
        on_cpu = not torch.cuda.is_available() or (args.device is not None and torch.device(args.device).type == "cpu")
        state = PartialState(cpu=on_cpu)
        default_device = state.device
    shards = Shards(distributed)
    # Everything that can be checked is checked before the (long) evaluation starts; only the main process
    # creates or writes anything in --output_dir, and its verdict is every process's.
    error = None
    if shards.is_main:
        try:
            ensure_writable_dir(args.output_dir, "--output_dir")
            if not args.no_card:
                from ..hub.cards import check_card_inputs

                check_card_inputs(Path(args.output_dir))  # a malformed card.json / results.json fails now
        except ValueError as failure:
            error = str(failure)
    error = shards.broadcast(error)
    if error:
        raise ValueError(error)
    output_dir = Path(args.output_dir)
    if getattr(args, "no_resume", False) and args.resume_dir is not None:
        raise ValueError("--no_resume and --resume_dir exclude each other; pass one of them.")
    for name in ("limit", "train_limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer; got {value}.")
    attacks = check_attack_list(args.attacks, "--attacks", autoattack_version=args.autoattack_version)  # bounded steps
    eps = None if args.eps is None else _check_eps(args.eps, args.norm)
    device = torch.device(args.device) if args.device else default_device
    model = _load_model(args, device)
    norm, eps = _threat_model(model, args.norm, eps)
    check_budget(eps, norm, "--eps")  # --eps without --norm: the norm came from the model (hf_csr.validation)
    config = getattr(model, "config", None)
    check_finite_model(model)  # a diverged (NaN) checkpoint is refused, not reported as robust
    id2label = getattr(config, "id2label", None) or {}
    model_names = [id2label[i] for i in sorted(id2label)] or None

    def load(name: str, split: str, limit: Optional[int]):
        dataset = load_image_dataset(
            name, split, image_column=args.image_column, label_column=args.label_column, limit=limit,
            seed=args.seed, class_names=model_names, num_channels=getattr(config, "num_channels", None),
        )
        if model_names and list(dataset.class_names) != model_names and len(dataset.class_names) == len(model_names):
            logger.warning("the dataset's class names %s differ from the model's %s: check that the label order "
                           "matches.", dataset.class_names, model_names)
        return dataset

    sets = {"test": (args.dataset, args.split, args.limit)}
    if args.train_dataset:
        train_limit = args.limit if args.train_limit is None else args.train_limit
        sets["train"] = (args.train_dataset, args.train_split, train_limit)
    loaded = {part: load(*source) for part, source in sets.items()}
    # AutoAttack components the class count cannot run (APGD-T needs 4 classes) fail now, not after the clean pass
    check_attack_list(args.attacks, "--attacks", num_classes=getattr(config, "num_labels", None),
                      autoattack_version=args.autoattack_version)
    # Per-attack, per-batch progress: an interrupted run (pre-emption, kill) resumes where it stopped when
    # the same command is run again; finished batches are reloaded, not recomputed.
    if getattr(args, "no_resume", False):
        progress = None
    else:
        from .robustness import PROGRESS_DIR

        progress = Path(args.resume_dir) if args.resume_dir else output_dir / PROGRESS_DIR
    reports = {}
    for part, dataset in loaded.items():
        reports[part] = evaluate_robustness(
            model, dataset, attacks=attacks, norm=norm, eps=eps, batch_size=args.batch_size, seed=args.seed,
            device=device, autocast_dtype=args.autocast, autoattack_version=args.autoattack_version,
            progress=not args.no_progress, resume_dir=None if progress is None else progress / part,
            distributed=distributed,
        )
        name, split, limit = sets[part]
        reports[part].metadata.update(dataset=name, split=split, limit=limit)
    if not shards.is_main:
        return 0  # the main process writes the results; every process holds the same report
    report = reports["test"]
    report.metadata = {"model": args.model, **report.metadata}
    if "train" in reports:
        report.compare_with_train(reports["train"])
    paths = report.save(output_dir)
    if not args.no_card:
        paths.append(_write_card(args.model, output_dir, None, config))  # None: the merged results.json
    if progress is not None and args.resume_dir is None:
        shutil.rmtree(progress, ignore_errors=True)  # the default progress folder has served its purpose
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    sys.stdout.write(report.markdown_table() + "\n")
    return 0
