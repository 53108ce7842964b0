"""The ``hf-csr`` command.

Building the parser imports nothing heavy (:mod:`hf_csr.arguments`, the commands' argument definitions):
``hf-csr --help`` and every ``hf-csr <command> --help`` answer without loading torch. A command's
implementation is imported by its handler, when it runs.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from typing import Callable, List, Optional

from .arguments import HelpFormatter, add_command, add_log_level, add_option
from .evaluation.command import add_evaluate_parser
from .hub.commands import add_hub_commands
from .recipes import RECIPES

__all__ = ["build_parser", "main", "run_command", "run_reporting_errors"]

logger = logging.getLogger(__name__)


def _parse(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse ``argv``; the options a command does not know go to its ``overrides`` (``train``, ``quickstart``:
    settings of the recipes' parser, with or without a ``--`` before them), and are an error for the others."""
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "overrides"):
        command = getattr(parser, "commands", {}).get(getattr(args, "command", None), parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        if "--" in extra:
            extra.remove("--")
        args.overrides = extra
    return args


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import format_comparison, run_quickstart

    summary = run_quickstart(args.output_dir, args.overrides)
    sys.stdout.write("\n" + format_comparison(summary) + "\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .experiment import run_recipe
    from .recipes import config_recipe

    recipe = args.recipe or (config_recipe(args.config) if args.config else None) or "train_from_scratch"
    argv = (["--config", args.config] if args.config else []) + args.overrides
    return run_recipe(recipe, argv, prog="hf-csr train")


def _add_quickstart_parser(sub: argparse._SubParsersAction) -> None:
    quick = add_command(
        sub, "quickstart",
        help="PGD-AT vs CSR on Fashion-MNIST on a CPU (a few minutes): trains both, evaluates both, prints the table",
        description="Trains a small PreAct-ResNet on Fashion-MNIST twice (PGD-AT, then CSR; same seed and budget), "
        "evaluates both clean and under PGD-20 class by class, and prints a side-by-side table. Extra arguments "
        "override the shared settings (the recipes' settings), e.g. `hf-csr quickstart --max_steps 200`.",
    )
    add_option(quick, "--output_dir", default="outputs/quickstart",
               help="where the two runs are written (default: %(default)s)")
    quick.set_defaults(func=_quickstart, overrides=[])


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    train = add_command(
        sub, "train",
        help="train with a recipe's settings and a YAML config (as `accelerate launch recipes/<recipe>.py --config ...`)",
        description="Runs a training recipe (hf_csr.experiment): the recipe's defaults, then the --config YAML, "
        "then any further option (a setting of the recipe, e.g. --max_steps 100 --output_dir out/), train, "
        "evaluate class by class, write the model card.",
        epilog="examples:\n"
        "  hf-csr train --config recipes/configs/table3_cifar10_csr_gamma0.yaml --max_steps 100\n"
        "  accelerate launch -m hf_csr.cli train --config recipes/configs/table2_wrn28_10_linf_csr_gamma0.yaml\n"
        "  hf-csr train --recipe finetune_ddpm_wrn -- --help     # every setting, in groups",
    )
    group = train.add_argument_group("recipe")
    add_option(group, "--config", default=None,
               help="YAML file of settings, e.g. recipes/configs/table3_cifar10_csr_gamma0.yaml")
    add_option(group, "--recipe", choices=sorted(RECIPES), default=None,
               help="whose defaults apply below the config: " + "; ".join(f"{name}: {doc}" for name, (doc, _) in
                                                                        sorted(RECIPES.items()))
               + " (default: the config's `recipe:` key, else train_from_scratch)")
    train.set_defaults(func=_train, overrides=[])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-csr", description="Confusional Spectral Regularization tools.",
                                     formatter_class=HelpFormatter)
    add_log_level(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quickstart_parser(sub)
    _add_train_parser(sub)
    add_evaluate_parser(sub)
    add_hub_commands(sub)
    parser.commands = sub.choices  # command name -> its parser (run_command)
    return parser


def run_reporting_errors(
    call: Callable[[], int], prefix: str, *, debug: bool = False, debug_hint: str = "--log_level debug",
    exit_on_error: bool = False,
) -> int:
    """Run ``call``; turn any failure into one line on stderr (``{prefix}: ...``) and an exit status.

    2: bad input (``ValueError``, ``FileNotFoundError``: the message names the argument or file and the fix);
    1: the run failed (a full disk or another OS error, out of memory, a diverged training, an unexpected
    exception: a short message and the hint to rerun with ``debug_hint`` for the traceback); 130: Ctrl-C;
    143: SIGTERM stopped a training after its checkpoint. With ``debug`` the traceback is logged too.
    ``exit_on_error`` raises ``SystemExit`` with the status instead of returning it.
    """
    from .safety import EXIT_SIGTERM, TrainingDivergedError, TrainingInterrupted

    try:
        return call()
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - the boundary: every failure becomes one clear line
        if debug:
            logger.error("traceback:\n%s", "".join(traceback.format_exception(error)))
        hint = f" (rerun with {debug_hint} for the traceback)"
        if isinstance(error, (ValueError, FileNotFoundError)):
            code, text = 2, str(error)
        elif isinstance(error, TrainingInterrupted):
            code, text = EXIT_SIGTERM, str(error)
        elif isinstance(error, TrainingDivergedError):
            code, text = 1, str(error)
        elif isinstance(error, KeyboardInterrupt):
            code, text = 130, "interrupted (Ctrl-C)"
        elif isinstance(error, OSError):
            where = f": {error.filename!r}" if getattr(error, "filename", None) else ""
            reason = error.strerror or str(error) or type(error).__name__
            extra = " -- free some space (or write elsewhere) and rerun; finished work is kept" \
                if error.errno == errno.ENOSPC else ""
            code, text = 1, f"{reason}{where}{extra}{hint}"
        elif isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
            code, text = 1, f"out of memory ({str(error).splitlines()[0] if str(error) else type(error).__name__}); " \
                            f"lower the batch size{hint}"
        else:
            first = str(error).splitlines()[0] if str(error) else ""
            code, text = 1, f"unexpected {type(error).__name__}: {first}{hint}"
        sys.stderr.write(f"{prefix}: {text}\n")
        sys.stderr.flush()
        if exit_on_error:
            raise SystemExit(code) from None
        return code


def _check_common_arguments(args: argparse.Namespace) -> None:
    """Arguments several subcommands share, checked before any work (and before any model is loaded)."""
    from .validation import check_device, check_seed

    if getattr(args, "seed", None) is not None:
        check_seed(args.seed, "--seed")
    if getattr(args, "device", None) is not None:
        check_device(args.device, "--device")


def _run(args: argparse.Namespace) -> int:
    from .utils import setup_console_logging  # after parsing: --help loads no torch

    setup_console_logging(getattr(logging, args.log_level.upper()))

    def call() -> int:
        _check_common_arguments(args)
        return args.func(args)

    return run_reporting_errors(call, f"{args.prog}: error", debug=args.log_level == "debug",
                                debug_hint="--log_level debug", exit_on_error=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(build_parser(), argv)
    args.prog = f"hf-csr {args.command}"
    return _run(args)


def run_command(command: str, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """``hf-csr <command> <argv>`` with its own program name (a recipe script that is one command)."""
    sub = build_parser().commands[command]
    if prog:
        sub.prog = prog
    args = _parse(sub, sys.argv[1:] if argv is None else argv)
    args.command, args.prog = command, sub.prog
    args.log_level = getattr(args, "log_level", "info")
    return _run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
