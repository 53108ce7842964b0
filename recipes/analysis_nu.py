#!/usr/bin/env python
"""nu = ||C||_1 / ||C||_2 over random confusion matrices (paper Sec. 3: max 1.16, mean 1.06 over 10^6
10-class matrices) and over models' own confusion matrices (the ``confusion_matrix`` of every attack in
the results.json files given, e.g. the reproduction's).

    python recipes/analysis_nu.py --count 1000000 --results "outputs/reproduce_fashion_mnist/quick/*/*/seed0/results.json"
"""

import argparse
import glob
import json
import os

from hf_csr_paper.analysis import nu_study, save_json_and_plot


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="Random matrices (paper: 1,000,000).")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheme", choices=["uniform", "dirichlet"], default="uniform",
                        help="Random matrices: i.i.d. uniform entries or normalised Dirichlet columns (hf_csr_paper.analysis).")
    parser.add_argument("--results", default=None, help="Glob of results.json files whose confusion matrices to add.")
    parser.add_argument("--output_dir", default="outputs/analysis")
    args = parser.parse_args(argv)
    matrices = {}
    for path in sorted(glob.glob(args.results)) if args.results else []:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
        tag = os.path.relpath(os.path.dirname(path), os.path.commonpath([os.path.dirname(p) for p in glob.glob(args.results)] + [os.path.dirname(path)]))
        for attack, entry in results["attacks"].items():
            if "confusion_matrix" in entry and attack != "worst_of_all":
                matrices[f"{tag}:{attack}"] = entry["confusion_matrix"]
    study = nu_study(args.count, args.num_classes, args.seed, model_matrices=matrices, scheme=args.scheme)
    values = study.pop("random_values").numpy()

    def plot(ax):
        ax.hist(values, bins=60, color="tab:blue", alpha=0.8, label=f"{len(values)} random matrices ({args.scheme})")
        for i, (name, nu) in enumerate(sorted(study.get("models", {}).items())):
            ax.axvline(nu, color="tab:red", alpha=0.4, lw=1, label="models' own" if i == 0 else None)
        ax.set_xlabel(r"$\nu = \|C\|_1 / \|C\|_2$")
        ax.set_ylabel("count")
        ax.legend()

    paths = save_json_and_plot(args.output_dir, f"nu_study_{args.scheme}", study, plot)
    print(json.dumps(study["random"], indent=1))
    if matrices:
        models = list(study["models"].values())
        print(f"models: {len(models)} matrices, nu in [{min(models):.3f}, {max(models):.3f}]")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
