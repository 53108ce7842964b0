#!/usr/bin/env python
"""Phi'(f_w) of Prop. 3.1 (product of squared layer spectral norms x sum of squared Frobenius/spectral
ratios x (B + eps)^2 n^2 h ln(nh)) for adversarially trained Fashion-MNIST models (hf_csr_paper.analysis.run_phi).

    python recipes/analysis_phi.py --size quick
"""

import argparse

from hf_csr_paper.analysis import run_phi, save_json_and_plot
from hf_csr_paper.reproduction import METHODS, SIZES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick", help="Training budget (hf_csr_paper.reproduction).")
    parser.add_argument("--methods", default="PGD-AT,CSR reference/epoch", help=f"Comma-separated, from {list(METHODS)}.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/analysis")
    args = parser.parse_args(argv)
    out = run_phi(args.output_dir, methods=[m.strip() for m in args.methods.split(",")], settings=SIZES[args.size], seed=args.seed)

    def plot(ax):
        for method, entry in out["methods"].items():
            ax.plot(range(1, entry["n"] + 1), entry["spectral_norms"], marker="o",
                    label=f"{method}: log Phi' = {entry['log_phi_prime']:.1f}")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(r"$\|W_l\|_2$")
        ax.legend(fontsize=7)

    paths = save_json_and_plot(args.output_dir, "phi_prime", out, plot)
    for method, entry in out["methods"].items():
        print(f"{method}: log prod ||W||_2^2 = {entry['log_prod_spectral_sq']:.2f}, sum ||W||_F^2/||W||_2^2 = "
              f"{entry['sum_frobenius_over_spectral_sq']:.2f}, log Phi' = {entry['log_phi_prime']:.2f}")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
