"""Adversarial training from scratch with CSR: paper Tables 3, 5 and 6 (PreAct-ResNet18, 200 epochs).

One GPU::

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/train_from_scratch.py --config recipes/configs/table3_cifar10_csr_gamma0.yaml

Eight GPUs (global batch 128 = 8 x 16)::

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/train_from_scratch.py --config recipes/configs/table3_cifar10_csr_gamma0.yaml \
        --per_device_train_batch_size 16

Any setting can be overridden on the command line (``--csr_gamma 0.1``); ``--help`` lists them all.
Defaults: SGD momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 divided by 10 at epochs 100 and 150,
PGD-10 Linf 8/255 (step 2/255), CSR alpha 0.3. The run ends with a class-wise evaluation (clean,
PGD-20, CW-20, AutoAttack) in ``results.json`` and a model card.
"""

import sys

from hf_csr.experiment import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("train_from_scratch"))  # its defaults: hf_csr.recipes.RECIPES["train_from_scratch"]
