"""Trains a tiny model on mixed real/generated data and records which images every step used.

Run under torchrun with 1 or 2 processes by tests/integration/test_mixing.py (also imported there for in-process runs).
Every image is constant, with value (index + 1) / 4096, so the batches can be read back from the inputs.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from hf_csr import CSRTrainer, CSRTrainingArguments  # noqa: E402
from hf_csr.data import MixedImageDataset, TensorImageDataset  # noqa: E402
from hf_csr.models import create_robust_classifier  # noqa: E402
from tests.support import helpers  # noqa: E402,F401  (registers test_tiny_convnet)

CLASSES = [f"c{i}" for i in range(10)]
SCALE = 4096.0


def indexed_images(start, count):
    values = (torch.arange(start, start + count, dtype=torch.float32) + 1) / SCALE
    images = values.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    return TensorImageDataset(images, torch.arange(start, start + count) % 10, CLASSES)


def mixed_dataset(num_real=50, num_generated=300, batches_per_epoch=None):
    return MixedImageDataset(indexed_images(0, num_real), indexed_images(num_real, num_generated),
                             real_fraction=0.3, batches_per_epoch=batches_per_epoch)


def decode(pixel_values):
    return (pixel_values.reshape(len(pixel_values), -1)[:, 0] * SCALE).round().long().sub(1).tolist()


class RecordingTrainer(CSRTrainer):
    """Records (global step, this process's image indices) of every training micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.seen.append((self.state.global_step, decode(inputs["pixel_values"])))
        return super().compute_loss(model, inputs, *args, **kwargs)


def make_trainer(output_dir, per_device_batch, steps, callbacks=None, accumulation=1, **overrides):
    torch.manual_seed(0)
    model = create_robust_classifier("test_tiny_convnet", class_names=CLASSES, num_channels=1, image_size=8)
    settings = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation, learning_rate=0.01, attack_steps=1, augment=False, use_cpu=True,
        save_strategy="steps", save_steps=3, logging_steps=1, disable_tqdm=True, seed=0,
        csr_confusion_source="ema", report_to="none",
    )
    if "WORLD_SIZE" in os.environ:
        settings["ddp_backend"] = "gloo"
    args = CSRTrainingArguments(**{**settings, **overrides})
    return RecordingTrainer(model=model, args=args, train_dataset=mixed_dataset(), callbacks=callbacks)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    cli = parser.parse_args()
    trainer = make_trainer(cli.out + ".run", cli.per_device_batch, cli.steps, accumulation=cli.accumulation)
    trainer.train()
    torch.save(trainer.seen, f"{cli.out}.rank{trainer.args.process_index}")


if __name__ == "__main__":
    main()
