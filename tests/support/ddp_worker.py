"""Trains a tiny model with CSRTrainer; run under torchrun with 1 or 2 processes by test_trainer.py."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from hf_csr import CSRTrainer, CSRTrainingArguments  # noqa: E402
from tests.support.helpers import fmnist, fmnist_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--source", default="ema")
    parser.add_argument("--variant", default="reference")
    parser.add_argument("--base-loss", default="pgd")
    parser.add_argument("--awp-gamma", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--method", default="csr")
    parser.add_argument("--augment", action="store_true")
    cli = parser.parse_args()
    if cli.method == "csr":
        method = dict(csr_confusion_source=cli.source, csr_variant=cli.variant)
    else:
        method = {"fairness_val_size": 20} if cli.method in ("frl", "wat", "cfa") else {}
    torch.manual_seed(0)
    model = fmnist_model("test_tiny_convnet")
    args = CSRTrainingArguments(
        output_dir=cli.out + ".run", max_steps=cli.steps, per_device_train_batch_size=cli.per_device_batch,
        per_device_eval_batch_size=16, learning_rate=0.01, attack_steps=2, fairness_method=cli.method, **method,
        base_loss=cli.base_loss, awp_gamma=cli.awp_gamma, augment=cli.augment, use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, ddp_backend="gloo",
    )
    # 64 training images (FRL, WAT and CFA hold 20 of 84 out for validation): whole global batches of 32
    limit = 84 if cli.method in ("frl", "wat", "cfa") else 64
    trainer = CSRTrainer(model=model, args=args, train_dataset=fmnist("train", limit=limit))
    trainer.train()
    if trainer.is_world_process_zero():
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        if cli.method == "csr":
            state["confusion"] = trainer.fairness.confusion.confusion()
        for key, value in trainer.fairness.state_dict().items():
            if isinstance(value, torch.Tensor):
                state[f"method/{key}"] = value
        torch.save(state, cli.out)


if __name__ == "__main__":
    main()
