"""The ``hf-csr`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .hub.commands import add_hub_commands
from .evaluation.command import add_evaluate_parser

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_report, run_demo

    report = run_demo(steps=args.steps, seed=args.seed)
    sys.stdout.write(format_report(report) + "\n")
    return 0


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
    demo = sub.add_parser("demo", help="the CSR penalty and a PGD attack on Fashion-MNIST images (one minute)")
    demo.add_argument("--steps", type=int, default=60, help="clean training steps before the attack")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"hf-csr {args.command}: error: {error}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
