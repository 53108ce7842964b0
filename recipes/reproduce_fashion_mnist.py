#!/usr/bin/env python
r"""Table 3 on Fashion-MNIST (PGD-AT, TRADES, FRL, FAAL, CFA, WAT and CSR in four versions, 3 seeds, balanced and
long-tailed training sets) and a small Table 6 sweep, every run through the runner (hf_csr.experiment.run);
the tables go into REPRODUCTION.md. Logic: hf_csr_paper.reproduction (runs) and hf_csr_paper.report (tables).

    python recipes/reproduce_fashion_mnist.py --size power              # Table 3 at the power preset
    python recipes/reproduce_fashion_mnist.py --size power --max_runs 1 # one run per call (a session's piece)
    python recipes/reproduce_fashion_mnist.py --sweep                   # Table 6 sweep (balanced set, 2 seeds)
    python recipes/reproduce_fashion_mnist.py --report_only             # rewrite REPRODUCTION.md's tables only
    python recipes/reproduce_fashion_mnist.py --quick --max_steps 2 --output_dir outputs/smoke \
        --report outputs/smoke.md --figures_dir outputs/smoke_figures  # smoke test of the pipeline

Runs whose run.json exists are skipped; an interrupted run resumes from its last epoch checkpoint: rerun the
same command to continue.
"""

import argparse
import logging
import os
import sys

from hf_csr_paper.report import generate, write_report
from hf_csr_paper.reproduction import (DATASETS, METHODS, SIZES, SWEEP, calibrate_ms_per_unit, estimate_table, override,
                                      parse_list, run_reproduction, settings_table)

logger = logging.getLogger("reproduce_fashion_mnist")
ESTIMATE_MS_PER_UNIT = 0.06  # mlp_tiny's rate measured here: 0.048-0.058 ms per image forward+backward, one thread


def default_output_dir(size: str) -> str:
    """The power and sweep runs go to a tracked folder (docs/reproduction/runs/<size>: results, tables, run
    records; its .gitignore keeps weights, plots and resume points out), so that finished runs are committed and
    a later session continues from them; other sizes go to outputs/."""
    if size in ("power", "sweep"):
        return os.path.join("docs", "reproduction", "runs", size)
    return os.path.join("outputs", "reproduce_fashion_mnist", size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("what to run")
    group.add_argument("--size", choices=sorted(SIZES), default=None,
                       help="Preset (hf_csr_paper.reproduction.SIZES): power (Table 3, the default), sweep, quick.")
    group.add_argument("--quick", action="store_true", help="Same as --size quick (a smoke test).")
    group.add_argument("--sweep", action="store_true", help="The Table 6 sweep: --size sweep with the sweep's methods.")
    group.add_argument("--datasets", default=None, help=f"Comma-separated subset of {list(DATASETS)} (default: the preset's).")
    group.add_argument("--methods", default=None, help="Comma-separated method names (default: all of the preset's table).")
    group.add_argument("--seeds", default=None, help="Comma-separated seeds (default: the preset's).")
    group.add_argument("--max_runs", type=int, default=None, help="Stop after this many new runs (resume later).")
    group.add_argument("--output_dir", default=None, help="Run folders (default docs/reproduction/runs/<size> for power and sweep, "
                       "outputs/reproduce_fashion_mnist/<size> otherwise).")
    group = parser.add_argument_group("overrides of the preset (the preset's name is then marked with *)")
    for name, kind in (("train_examples", int), ("eval_examples", int), ("epochs", int), ("max_steps", int),
                       ("validation_size", int), ("eval_attacks", str), ("extra_eval", str)):
        group.add_argument(f"--{name}", type=kind, default=None, help=f"The preset's {name}.")
    group = parser.add_argument_group("report")
    group.add_argument("--report", default="REPRODUCTION.md", help="Markdown file receiving the tables.")
    group.add_argument("--figures_dir", default=os.path.join("docs", "reproduction"),
                       help="Tracked folder the embedded plots are copied into.")
    group.add_argument("--report_only", action="store_true",
                       help="Only regenerate the tables from the run folders (default: the power and sweep blocks).")
    group.add_argument("--no_report", action="store_true", help="Run without touching the report.")
    group = parser.add_argument_group("wall-time estimate (nothing is trained)")
    group.add_argument("--estimate", action="store_true",
                       help="Print the estimated hours per run and in total for the preset and methods, and exit.")
    group.add_argument("--ms_per_unit", type=float, default=None,
                       help="Milliseconds per image forward+backward (default: measured now on this machine).")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    size = "quick" if args.quick else "sweep" if args.sweep else args.size
    table = SWEEP if args.sweep or size == "sweep" else METHODS
    try:
        methods = parse_list(args.methods, list(table), "--methods") or list(table)
        datasets = parse_list(args.datasets, DATASETS, "--datasets")
    except ValueError as error:
        parser.error(str(error))
    if args.estimate:
        size = size or "power"
        settings = override(SIZES[size], **{k: getattr(args, k) for k in (
            "train_examples", "eval_examples", "epochs", "max_steps", "validation_size", "eval_attacks", "extra_eval")})
        ms = args.ms_per_unit or calibrate_ms_per_unit(settings)
        print(f"{ms:.3f} ms per image forward+backward" + ("" if args.ms_per_unit else " (measured now)"))
        print(estimate_table(settings, methods, ms_per_unit=ms))
        return 0
    if not args.report_only:
        size = size or "power"
        settings = override(SIZES[size], **{k: getattr(args, k) for k in (
            "train_examples", "eval_examples", "epochs", "max_steps", "validation_size", "eval_attacks", "extra_eval")})
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",") if s.strip()]
        run_reproduction(args.output_dir or default_output_dir(size), settings, datasets=datasets, methods=methods,
                         seeds=seeds, max_runs=args.max_runs)
    if args.no_report:
        return 0
    sizes = [size] if size else ["power", "sweep"]
    blocks = {}
    for name in sizes:
        output_dir = args.output_dir or default_output_dir(name)
        blocks[name] = generate(output_dir, label=output_dir, report_path=args.report, figures_dir=args.figures_dir,
                                kind="sweep" if name == "sweep" else "table3")
    if args.output_dir is None:  # the presets' table, from the code (REPRODUCTION.md's "presets" block)
        blocks["presets"] = settings_table([SIZES[name] for name in ("power", "sweep", "quick")])
        blocks["estimates"] = "\n\n".join([
            f"Power preset, at {ESTIMATE_MS_PER_UNIT:g} ms per unit:", estimate_table(SIZES["power"], list(METHODS), ms_per_unit=ESTIMATE_MS_PER_UNIT),
            f"Sweep preset, at {ESTIMATE_MS_PER_UNIT:g} ms per unit:", estimate_table(SIZES["sweep"], list(SWEEP), ms_per_unit=ESTIMATE_MS_PER_UNIT)])
    write_report(args.report, blocks)
    logger.info("wrote the %s block(s) of %s", ", ".join(blocks), args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
