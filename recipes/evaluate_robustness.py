"""Class-wise robust evaluation of a checkpoint: ``hf-csr evaluate`` as a script.

    python recipes/evaluate_robustness.py --model ./checkpoint --dataset fashion_mnist --split test \\
        --attacks clean,pgd20,cw20,autoattack --norm Linf --eps 8/255 --output-dir eval/

    # CIFAR-10 from the Hub, with the training set for the train-vs-test agreement (paper Fig. 2):
    python recipes/evaluate_robustness.py --model ./cifar10-checkpoint --dataset uoft-cs/cifar10 \\
        --train-dataset uoft-cs/cifar10 --train-limit 10000 --autocast bf16 --output-dir eval-cifar10/

Writes results.json, results.md and the PNG figures to --output-dir and prints the table; see
``hf-csr evaluate --help`` for every option and the input convention (pixel values in [0, 1]).
"""

import sys

from hf_csr.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
