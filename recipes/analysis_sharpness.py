#!/usr/bin/env python
"""Table 8 on Fashion-MNIST: train - test robust gap, worst test class and the sharpness estimate (largest
sigma^2 in {0.01, ..., 1} whose 50 Gaussian weight perturbations keep the training-accuracy drop within 5%),
absolute noise as in the paper and magnitude-relative noise (hf_csr_paper.analysis.run_sharpness).

    python recipes/analysis_sharpness.py --size quick
"""

import argparse

from hf_csr_paper.analysis import run_sharpness, save_json_and_plot
from hf_csr_paper.reproduction import METHODS, SIZES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--methods", default="PGD-AT,TRADES,CSR reference/epoch", help=f"Comma-separated, from {list(METHODS)}.")
    parser.add_argument("--examples", type=int, default=500, help="Training images the accuracy drop is measured on.")
    parser.add_argument("--samples", type=int, default=50, help="Perturbations per sigma^2 (paper: 50).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/analysis")
    args = parser.parse_args(argv)
    out = run_sharpness(args.output_dir, methods=[m.strip() for m in args.methods.split(",")], settings=SIZES[args.size],
                        seed=args.seed, examples=args.examples, num_samples=args.samples)

    def plot(ax):
        names = list(out["methods"])
        for offset, scale in ((-0.2, "absolute"), (0.2, "magnitude")):
            ax.bar([i + offset for i in range(len(names))], [out["methods"][n][f"sharpness_{scale}"]["sigma2"] for n in names],
                   width=0.4, label=f"{scale} noise")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_ylabel(r"largest $\sigma^2$ (drop $\leq$ 5%)")
        ax.legend()

    paths = save_json_and_plot(args.output_dir, "sharpness", out, plot)
    print("| Method | Train - test PGD-20 (%) | Test worst-class PGD-20 (%) | sigma^2 (absolute) | sigma^2 (magnitude) |")
    print("| --- | --- | --- | --- | --- |")
    for method, e in out["methods"].items():
        print(f"| {method} | {100 * e['gap']:.2f} | {100 * e['test_worst_class_pgd20']:.2f} | "
              f"{e['sharpness_absolute']['sigma2']:.2f} | {e['sharpness_magnitude']['sigma2']:.2f} |")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
