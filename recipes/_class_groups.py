"""Shared by ``analysis_clean_fairness.py`` (Table 7) and ``analysis_long_tail.py`` (Table 9): clean training
without and with CSR, test accuracy of three class groups; writes a JSON, a bar plot and prints a table."""

import argparse
from typing import Optional, Sequence

from hf_csr_paper.analysis import run_clean_fairness, save_json_and_plot


def main(argv, *, description: str, name: str, groups: Sequence[str], long_tail_ratio: Optional[float]) -> int:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_examples", type=int, default=6000, help="Class-balanced training subset (before any long tail).")
    parser.add_argument("--test_examples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--csr_alpha", type=float, default=0.3)
    parser.add_argument("--csr_gamma", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/analysis")
    args = parser.parse_args(argv)
    out = run_clean_fairness(args.output_dir, train_examples=args.train_examples, test_examples=args.test_examples,
                             epochs=args.epochs, width=args.width, csr_alpha=args.csr_alpha, csr_gamma=args.csr_gamma,
                             seed=args.seed, long_tail_ratio=long_tail_ratio)

    def plot(ax):
        for i, method in enumerate(out["methods"]):
            entry = out["methods"][method]
            values = [100 * entry["groups"][g] for g in groups] + [100 * entry["accuracy"]]
            ax.bar([j + (i - 0.5) * 0.4 for j in range(len(groups) + 1)], values, width=0.4, label=method)
        ax.set_xticks(range(len(groups) + 1))
        ax.set_xticklabels(list(groups) + ["all"])
        ax.set_ylabel("test accuracy (%)")
        ax.legend()

    paths = save_json_and_plot(args.output_dir, name, out, plot)
    print("| Method | " + " | ".join(f"{g} (%)" for g in groups) + " | All (%) |")
    print("| --- " * (len(groups) + 2) + "|")
    for method, entry in out["methods"].items():
        print(f"| {method} | " + " | ".join(f"{100 * entry['groups'][g]:.1f}" for g in groups)
              + f" | {100 * entry['accuracy']:.1f} |")
    print("wrote", *paths)
    return 0
