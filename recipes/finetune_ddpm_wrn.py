"""Fine-tune a published DDPM-data WideResNet with CSR for 2 epochs: paper Table 2.

Downloads the checkpoint (``wzekai99/DM-Improves-AT``) and the generated images (``P2333/DM-Improves-AT``,
e.g. ``cifar10/1m.npz``, converted once to memory-mapped shards) from the Hub; every batch holds 30% real
CIFAR-10 and 70% generated images::

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/finetune_ddpm_wrn.py --config recipes/configs/table2_wrn28_10_linf_csr_gamma0.yaml \
        --per_device_train_batch_size 16

Defaults: TRADES (beta 5, as the checkpoints were trained) + CSR alpha 0.3, lr 0.01, 2 epochs, attacks
crafted with BatchNorm in train mode and running statistics frozen (``attack_bn_mode: train``).
"""

import sys

from hf_csr.experiment import main

DEFAULTS = {
    "model": "wrn28_10_ddpm.dm_cifar10_linf",
    "dataset": "uoft-cs/cifar10",
    "generated_data": "cifar10/1m.npz",
    "real_fraction": 0.3,
    "num_train_epochs": 2,
    "learning_rate": 0.01,
    "per_device_train_batch_size": 128,
    "base_loss": "trades",
    "trades_beta": 5.0,
    "attack_bn_mode": "train",
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "logging_steps": 50,
}

if __name__ == "__main__":
    sys.exit(main(DEFAULTS))
