"""(h) Import time: ``import hf_csr`` and every ``hf-csr ... --help`` against the imports they stand beside.

Each figure is the wall time of a fresh ``python`` process (start-up included), the processes run
interleaved (order rotated every round) after a warm-up of each, and a ratio is the median over rounds of
the per-round ratio, so that a load change on a shared machine hits both sides alike:

* ``python -c "import hf_csr"`` / ``python -c "import torch, timm; from transformers import PreTrainedModel,
  AutoConfig, AutoModelForImageClassification"`` (what ``import hf_csr`` registers its models into):
  target <= 1.1;
* ``python -m hf_csr.cli [COMMAND] --help``, for the top level and every command / ``python -c "import
  torch"``: target <= 0.5 (a ``--help`` imports no torch).

    python benchmarks/bench_import.py --quick
"""

from __future__ import annotations

import os
import subprocess
import sys

import _common as C  # noqa: N812

REFERENCE = "import torch, timm; from transformers import PreTrainedModel, AutoConfig, AutoModelForImageClassification"
COMMANDS = ("", "quickstart", "train", "evaluate", "convert", "convert-data", "card", "push")


def _process(*args: str):
    env = {**os.environ, "PYTHONPATH": str(C.REPO), "OMP_NUM_THREADS": "1"}

    def run() -> None:
        subprocess.run([sys.executable, *args], check=True, cwd=C.REPO, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    return run


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    args.repeats = args.repeats or (5 if args.quick else 9)
    args.warmup = 1 if args.warmup is None else args.warmup
    info = C.machine()
    fns = {
        "import torch": _process("-c", "import torch"),
        "import torch+timm+transformers": _process("-c", REFERENCE),
        "import hf_csr": _process("-c", "import hf_csr"),
    }
    for command in COMMANDS:
        fns[f"hf-csr {command} --help".replace("  ", " ")] = _process("-m", "hf_csr.cli", *filter(None, [command]),
                                                                       "--help")
    times = C.interleaved(fns, warmup=args.warmup, repeats=args.repeats, device=C.pick_device("cpu"))
    rows = [{"variant": name, "median_s": C.median(t)} for name, t in times.items()]
    package = C.paired_ratio(times["import hf_csr"], times["import torch+timm+transformers"])
    targets = [f"target import hf_csr / import torch+timm+transformers classes <= 1.1: {package:.3f} -> "
               f"{'PASS' if package <= 1.1 else 'FAIL'}"]
    helps = {name: C.paired_ratio(t, times["import torch"]) for name, t in times.items() if name.endswith("--help")}
    for name, ratio in helps.items():
        targets.append(f"target {name} / import torch <= 0.5: {ratio:.3f} -> {'PASS' if ratio <= 0.5 else 'FAIL'}")
    C.report("bench_import: import hf_csr and hf-csr --help", args, info, rows, targets)


if __name__ == "__main__":
    main()
