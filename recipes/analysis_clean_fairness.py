#!/usr/bin/env python
"""Table 7 on Fashion-MNIST: clean training without and with CSR (gamma 0), test accuracy of the easy /
medium / hard classes (thirds by the baseline's per-class accuracy; paper: after Cui et al. 2024).

    python recipes/analysis_clean_fairness.py --epochs 5
"""

import argparse

from hf_csr.analysis import run_clean_fairness, save_json_and_plot

GROUPS = ("easy", "medium", "hard")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                             seed=args.seed, long_tail_ratio=None)

    def plot(ax):
        names = list(out["methods"])
        for i, name in enumerate(names):
            values = [100 * out["methods"][name]["groups"][g] for g in GROUPS] + [100 * out["methods"][name]["accuracy"]]
            ax.bar([j + (i - 0.5) * 0.4 for j in range(len(GROUPS) + 1)], values, width=0.4, label=name)
        ax.set_xticks(range(len(GROUPS) + 1))
        ax.set_xticklabels(list(GROUPS) + ["all"])
        ax.set_ylabel("test accuracy (%)")
        ax.legend()

    paths = save_json_and_plot(args.output_dir, "clean_fairness", out, plot)
    print("| Method | " + " | ".join(f"{g} (%)" for g in GROUPS) + " | All (%) |")
    print("| --- " * (len(GROUPS) + 2) + "|")
    for name, entry in out["methods"].items():
        print(f"| {name} | " + " | ".join(f"{100 * entry['groups'][g]:.1f}" for g in GROUPS) + f" | {100 * entry['accuracy']:.1f} |")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
