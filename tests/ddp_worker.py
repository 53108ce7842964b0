"""Trains a tiny model with CSRTrainer; run under torchrun with 1 or 2 processes by test_trainer.py."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hf_csr import CSRTrainer, CSRTrainingArguments  # noqa: E402
from tests.helpers import fmnist, fmnist_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--source", default="ema")
    parser.add_argument("--variant", default="reference")
    parser.add_argument("--base-loss", default="pgd")
    parser.add_argument("--awp-gamma", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=4)
    cli = parser.parse_args()
    torch.manual_seed(0)
    model = fmnist_model("test_tiny_convnet")
    args = CSRTrainingArguments(
        output_dir=cli.out + ".run", max_steps=cli.steps, per_device_train_batch_size=cli.per_device_batch,
        per_device_eval_batch_size=16, learning_rate=0.01, attack_steps=2, csr_confusion_source=cli.source,
        csr_variant=cli.variant, base_loss=cli.base_loss, awp_gamma=cli.awp_gamma, augment=False, use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, ddp_backend="gloo",
    )
    trainer = CSRTrainer(model=model, args=args, train_dataset=fmnist("train", limit=64))
    trainer.train()
    if trainer.is_world_process_zero():
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        state["confusion"] = trainer.fairness.confusion.confusion()
        torch.save(state, cli.out)


if __name__ == "__main__":
    main()
