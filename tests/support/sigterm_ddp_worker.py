"""Under torchrun: only rank ``--signal-rank`` receives SIGTERM (after optimizer step 2); every rank writes
what happened to ``<out>/rank<r>.json`` (run by test_reliability_round2.py)."""

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_csr import CSRTrainer, CSRTrainingArguments  # noqa: E402
from hf_csr.safety import EXIT_SIGTERM, TrainingInterrupted  # noqa: E402
from tests.support.helpers import fmnist, fmnist_model  # noqa: E402


class SignalOneRank(TrainerCallback):
    def __init__(self, rank):
        self.rank = rank

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2 and int(os.environ["RANK"]) == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--signal-rank", type=int, default=1)
    cli = parser.parse_args()
    torch.manual_seed(0)
    args = CSRTrainingArguments(
        output_dir=os.path.join(cli.out, "run"), max_steps=6, per_device_train_batch_size=8, learning_rate=0.01,
        attack_steps=1, augment=False, use_cpu=True, save_steps=100, logging_steps=1, disable_tqdm=True, seed=0,
        ddp_backend="gloo", report_to="none",
    )
    trainer = CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=args, train_dataset=fmnist("train", limit=64),
                         callbacks=[SignalOneRank(cli.signal_rank)])
    record = {"rank": int(os.environ["RANK"]), "interrupted": False}
    try:
        trainer.train()
    except TrainingInterrupted as error:
        record.update(interrupted=True, checkpoint=error.checkpoint)
    record["global_step"] = trainer.state.global_step
    with open(os.path.join(cli.out, f"rank{record['rank']}.json"), "w") as handle:
        json.dump(record, handle)
    return EXIT_SIGTERM if record["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
