#!/usr/bin/env python
"""Table 3 on Fashion-MNIST: PGD-AT, TRADES, FRL, FAAL, CFA, WAT and CSR (reference and paper variants,
gamma 0 and 0.1), same budget, 3 seeds, balanced and long-tailed (ratio 100) training sets, AutoAttack class
by class; the table goes into REPRODUCTION.md. Logic: hf_csr_paper.reproduction.

    python recipes/reproduce_fashion_mnist.py --quick                 # about a minute per run (tiny sizes)
    python recipes/reproduce_fashion_mnist.py                         # default (= --size medium): a few hours on 2 CPU cores
    python recipes/reproduce_fashion_mnist.py --size full             # standard AutoAttack: 10-20 min per run
    python recipes/reproduce_fashion_mnist.py --report_only --size quick   # rewrite the table only

Runs whose results.json exists are skipped: rerun the same command to continue an interrupted reproduction.
"""

import argparse
import logging
import os
import shlex
import sys
import time

from hf_csr_paper.reproduction import DATASETS, METHODS, SIZES, run_reproduction, write_report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Same as --size quick.")
    parser.add_argument("--size", choices=sorted(SIZES), default="medium",
                        help="Budget preset (hf_csr_paper.reproduction): quick, medium (the default) or full.")
    parser.add_argument("--output_dir", default=None, help="Where runs go (default outputs/reproduce_fashion_mnist/<size>).")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"Comma-separated subset of {list(DATASETS)}.")
    parser.add_argument("--methods", default=None, help=f"Comma-separated subset of {list(METHODS)} (default: all).")
    parser.add_argument("--seeds", default=None, help="Comma-separated seeds (default 0,1,2).")
    parser.add_argument("--train_examples", type=int, default=None, help="Override the preset's training-set size.")
    parser.add_argument("--eval_examples", type=int, default=None, help="Override the preset's test-set size.")
    parser.add_argument("--epochs", type=int, default=None, help="Override the preset's epochs.")
    parser.add_argument("--report", default="REPRODUCTION.md", help="Markdown file receiving the table.")
    parser.add_argument("--report_only", action="store_true", help="Only rebuild the table from finished runs.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    size = "quick" if args.quick else args.size
    settings = SIZES[size]
    overrides = {k: getattr(args, k) for k in ("train_examples", "eval_examples", "epochs") if getattr(args, k) is not None}
    if overrides:
        import dataclasses

        settings = dataclasses.replace(settings, name=f"{size}*", **overrides)
    output_dir = args.output_dir or os.path.join("outputs", "reproduce_fashion_mnist", size)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = sorted(set(datasets) - set(DATASETS))
    if bad:
        parser.error(f"--datasets: unknown {bad}; choose from {list(DATASETS)}")
    methods = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        parser.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",") if s.strip()]
    start = time.time()
    if not args.report_only:
        run_reproduction(output_dir, settings, datasets=datasets, methods=methods, seeds=seeds)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if argv is None and not args.report_only else ""
    block = write_report(output_dir, args.report, command=command, section=size)
    print(block)
    print(f"done in {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
