"""Fine-tune a TRADES or TRADES-AWP WRN-34-10 with CSR for 2 epochs: paper Tables 1 and 4.

The TRADES (``model-wideres-epoch76.pt``) and TRADES-AWP WRN-34-10 checkpoints are distributed outside
the Hub; pass the downloaded file (any of the TRADES key layouts, with or without ``module.``)::

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/finetune_trades_wrn34.py --config recipes/configs/table1_trades_csr_gamma0.yaml \
        --model /path/to/model-wideres-epoch76.pt

Defaults: TRADES beta 6 + CSR alpha 0.3, lr 0.01, 2 epochs, SGD momentum 0.9, weight decay 5e-4,
batch 128, PGD-10 Linf 8/255 crafted in eval mode (as the released code).
"""

import sys

from hf_csr.experiment import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("finetune_trades_wrn34"))  # its defaults: hf_csr.recipes.RECIPES["finetune_trades_wrn34"]
