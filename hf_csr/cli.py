"""The ``hf-csr`` command."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from typing import Callable, List, Optional

from .hub.commands import add_hub_commands
from .evaluation.command import add_evaluate_parser

__all__ = ["main", "run_reporting_errors"]

logger = logging.getLogger(__name__)


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import format_comparison, run_quickstart

    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    summary = run_quickstart(args.output_dir, overrides)
    sys.stdout.write("\n" + format_comparison(summary) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-csr", description="Confusional Spectral Regularization tools.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser(
        "quickstart",
        help="PGD-AT vs CSR on Fashion-MNIST on a CPU (a few minutes): trains both, evaluates both, prints the table",
        description="Trains a small PreAct-ResNet on Fashion-MNIST twice (PGD-AT, then CSR; same seed and budget), "
        "evaluates both clean and under PGD-20 class by class, and prints a side-by-side table. Extra arguments "
        "override the shared settings, e.g. `hf-csr quickstart -- --max_steps 200`.",
    )
    quick.add_argument("--output-dir", default="outputs/quickstart", help="where the two runs are written")
    quick.add_argument("overrides", nargs=argparse.REMAINDER, help="CSRTrainingArguments/ExperimentArguments flags")
    quick.set_defaults(func=_quickstart)
    add_hub_commands(sub)
    add_evaluate_parser(sub)
    return parser


def run_reporting_errors(
    call: Callable[[], int], prefix: str, *, debug: bool = False, debug_hint: str = "--log-level DEBUG",
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def call() -> int:
        _check_common_arguments(args)
        return args.func(args)

    return run_reporting_errors(call, f"hf-csr {args.command}: error", debug=args.log_level == "DEBUG",
                                debug_hint="--log-level DEBUG", exit_on_error=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
