"""Fine-tune a published DDPM-data WideResNet with CSR for 2 epochs: paper Table 2.

Downloads the checkpoint (``wzekai99/DM-Improves-AT``) and the generated images (``P2333/DM-Improves-AT``,
e.g. ``cifar10/1m.npz``, converted once to memory-mapped shards) from the Hub; every batch holds 30% real
CIFAR-10 and 70% generated images::

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/finetune_ddpm_wrn.py --config recipes/configs/table2_wrn28_10_linf_csr_gamma0.yaml \
        --per_device_train_batch_size 16

Defaults: TRADES (beta 5, as the checkpoints were trained) + CSR alpha 0.3, lr 0.01, 2 epochs, attacks
crafted with BatchNorm in train mode and running statistics frozen (``attack_bn_mode: train``).

Batches and epochs follow DM-Improves-AT's sampler: every global batch of B = 128 holds 39 real images
(slices of a fresh shuffle of the real set) and 89 generated ones drawn uniformly with replacement, and an
epoch is ceil(50000 / 128) = 391 batches, so the 2 epochs are 782 optimizer steps whatever the size of the
generated set (``--generated_epoch_batches`` sets another length).

Label smoothing 0.1 (``label_smoothing_factor``): the paper gives no value for this fine-tune, and
DM-Improves-AT trained these checkpoints with ``--ls 0.1``, on the cross-entropy term of TRADES only (the
KL term is not smoothed); hf_csr applies it the same way. ``--label_smoothing_factor 0`` turns it off.

Local files only (no Hub): ``--model file.pt --dataset cifar10_train_test.npz --generated_data 1m.npz``;
on several nodes convert the npz once ahead with ``hf-csr convert-data`` and pass the folder (README).
"""

import sys

from hf_csr.experiment import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("finetune_ddpm_wrn"))  # its defaults: hf_csr.recipes.RECIPES["finetune_ddpm_wrn"]
