"""``hf-csr evaluate`` (or the Trainer's ``evaluate_and_report``) in one of several processes, for
``test_sharded_processes.py``. Run under ``accelerate launch``, ``torchrun`` or plain ``python``:

    python tests/support/shard_worker.py [options] -- evaluate --model ... --output-dir ...
    python tests/support/shard_worker.py [options] -- trainer MODEL_DIR OUTPUT_DIR BATCH_SIZE

Options:
* ``--aa-n-iter N``: AutoAttack components given as ``autoattack:...`` run N iterations (a quick budget);
* ``--outcomes FILE``: the main process also writes the per-example predictions of every attack there;
* ``--track-writes``: at exit, print ``hf_csr-writes RANK [paths]`` on stderr: every file this process
  opened for writing, created, renamed into place or made a folder of;
* ``--kill-after N`` (with ``--kill-rank R``): process R kills itself with SIGKILL right after writing its
  N-th progress file.
"""

import argparse
import atexit
import builtins
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANK = int(os.environ.get("RANK", "0"))
WRITES = []


def track_writes() -> None:
    original_open, original_os_open = builtins.open, os.open
    original_replace, original_rename, original_mkdir = os.replace, os.rename, os.mkdir

    def record(path):
        WRITES.append(os.path.abspath(os.fsdecode(path)))

    def tracked_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(flag in mode for flag in "wax+"):
            record(file)
        return original_open(file, mode, *args, **kwargs)

    def tracked_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            record(path)
        return original_os_open(path, flags, *args, **kwargs)

    def tracked_replace(src, dst, *args, **kwargs):
        record(dst)
        return original_replace(src, dst, *args, **kwargs)

    def tracked_rename(src, dst, *args, **kwargs):
        record(dst)
        return original_rename(src, dst, *args, **kwargs)

    def tracked_mkdir(path, *args, **kwargs):
        if not os.path.isdir(path):
            record(path)
        return original_mkdir(path, *args, **kwargs)

    builtins.open, os.open, os.replace, os.rename, os.mkdir = (
        tracked_open, tracked_os_open, tracked_replace, tracked_rename, tracked_mkdir)
    atexit.register(lambda: sys.stderr.write(f"hf_csr-writes {RANK} {json.dumps(sorted(set(WRITES)))}\n"))


def kill_after(count: int) -> None:
    from hf_csr.evaluation import robustness

    original = robustness._ProgressStore.save
    saved = {"n": 0}

    def save(self, key, payload):
        original(self, key, payload)
        saved["n"] += 1
        if saved["n"] == count:
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    robustness._ProgressStore.save = save


def quick_autoattack(n_iter: int) -> None:
    from hf_csr.evaluation import specs

    original = specs.parse_attack

    def parse_attack(attack, autoattack_version="standard"):
        config = original(attack, autoattack_version)
        if isinstance(config, specs.AutoAttackConfig) and config.version == "custom" and config.n_iter is None:
            config = specs.AutoAttackConfig("custom", config.attacks, n_iter=n_iter)
        return config

    specs.parse_attack = parse_attack


def dump_outcomes(path: str) -> None:
    from hf_csr.evaluation import report

    original = report.RobustnessReport.save

    def save(self, output_dir, **kwargs):
        outcomes = {name: result.predictions.tolist() for name, result in self.attacks.items()}
        Path(path).write_text(json.dumps(outcomes))
        return original(self, output_dir, **kwargs)

    report.RobustnessReport.save = save


def trainer_evaluation(model_dir: str, output_dir: str, batch_size: str) -> int:
    from transformers import AutoModelForImageClassification

    from hf_csr import CSRTrainer, CSRTrainingArguments
    from hf_csr.data import load_fashion_mnist

    model = AutoModelForImageClassification.from_pretrained(model_dir)
    backend = {"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    args = CSRTrainingArguments(output_dir=output_dir, use_cpu=True, seed=3, disable_tqdm=True, report_to=[],
                                per_device_eval_batch_size=int(batch_size), attack_eps=4 / 255, **backend)
    trainer = CSRTrainer(model=model, args=args, eval_dataset=load_fashion_mnist("test", limit=24, seed=0))
    results = trainer.evaluate_and_report(attacks="clean,pgd10,cw10")
    # every process gets the results (broadcast), and they are the main process's
    sys.stderr.write(f"hf_csr-results {RANK} {json.dumps(results['attacks']['pgd10']['accuracy'])}\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--aa-n-iter", type=int, default=None)
    parser.add_argument("--outcomes", default=None)
    parser.add_argument("--track-writes", action="store_true")
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--kill-rank", type=int, default=0)
    known, rest = parser.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest
    import torch

    torch.set_num_threads(1)
    if known.track_writes:
        track_writes()
    if known.kill_after is not None and RANK == known.kill_rank:
        kill_after(known.kill_after)
    if known.aa_n_iter:
        quick_autoattack(known.aa_n_iter)
    if known.outcomes:
        dump_outcomes(known.outcomes)
    if rest[:1] == ["trainer"]:
        return trainer_evaluation(*rest[1:])
    from hf_csr.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
