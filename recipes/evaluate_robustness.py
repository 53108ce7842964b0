"""Class-wise robust evaluation of a checkpoint: ``hf-csr evaluate`` as a script.

    python recipes/evaluate_robustness.py --model ./checkpoint --dataset fashion_mnist --split test \\
        --attacks clean,pgd20,cw20,autoattack --norm Linf --eps 8/255 --output_dir eval/

    # CIFAR-10 from the Hub, with the training set for the train-vs-test agreement (paper Fig. 2):
    python recipes/evaluate_robustness.py --model ./cifar10-checkpoint --dataset uoft-cs/cifar10 \\
        --train_dataset uoft-cs/cifar10 --train_limit 10000 --autocast bf16 --output_dir eval-cifar10/

Writes results.json, results.md and the PNG figures to --output_dir and prints the table; see
``hf-csr evaluate --help`` for every option and the input convention (pixel values in [0, 1]).
"""

import os
import sys

from hf_csr.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("evaluate", sys.argv[1:], prog=os.path.basename(sys.argv[0])))
