"""Trains a tiny model with one fairness baseline for 2 epochs; run under torchrun with 1 or 2 processes by
tests/integration/test_baselines.py (2-process runs must equal 1-process runs: per-class statistics are global)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from hf_csr import CSRTrainer, CSRTrainingArguments  # noqa: E402
from tests.support.helpers import fmnist, fmnist_model  # noqa: E402

# strong settings so that every mechanism moves within two short epochs
SETTINGS = {
    "frl": dict(frl_rw_rate=0.5, frl_rm_rate=0.5, frl_tau=0.0, fairness_val_size=20),
    "faal": dict(faal_rho=0.5),
    "cfa": dict(cfa_begin=1, cfa_fawa_threshold=0.0, fairness_val_size=20),
    "wat": dict(wat_eta=1.0, fairness_val_size=20),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--method", required=True, choices=sorted(SETTINGS))
    cli = parser.parse_args()
    torch.manual_seed(0)
    model = fmnist_model("test_tiny_convnet")
    args = CSRTrainingArguments(
        output_dir=cli.out + ".run", num_train_epochs=2, per_device_train_batch_size=cli.per_device_batch,
        per_device_eval_batch_size=8, learning_rate=0.05, attack_steps=2, base_loss="trades",
        fairness_method=cli.method, augment=False, use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, ddp_backend="gloo", **SETTINGS[cli.method],
    )
    # 64 training images: 2 steps of 32 per epoch (FRL, CFA, WAT hold 2 per class out of 84 for validation)
    limit = 64 if cli.method == "faal" else 84
    trainer = CSRTrainer(model=model, args=args, train_dataset=fmnist("train", limit=limit))
    trainer.train()
    if trainer.is_world_process_zero():
        state = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
        for key, value in trainer.fairness.state_dict().items():
            if isinstance(value, torch.Tensor):
                state[f"method.{key}"] = value.detach().clone()
        torch.save(state, cli.out)


if __name__ == "__main__":
    main()
