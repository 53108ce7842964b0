"""A recipe run (``hf_csr.experiment.main``) that can die by SIGKILL at a chosen point (RELIABILITY.md, item 1).

    python tests/support/kill_worker.py --kill PLAN -- <recipe flags>

PLAN is ``none`` or ``<where>:<step>``:

* ``step:K``        right after optimizer step K, before its checkpoint is written;
* ``after_save:K``  right after ``checkpoint-K`` is in place;
* ``mid_state:K``   while ``csr_state.pt`` of checkpoint K is half written (model, optimizer already staged);
* ``mid_weights:K`` while ``model.safetensors`` of checkpoint K is half written;
* ``mid_final:0``   while the final ``model.safetensors`` in the output directory is half written;
* ``eval_after:N``  (``-- evaluate ...``: an ``hf-csr evaluate`` run) right after its N-th progress file;
* ``eval_mid:N``    half-way through writing its N-th progress file.

Every finished optimizer step is announced on stdout as ``hf_csr-step N`` (the test's external, random
kills key on it). The process kills *itself* with SIGKILL: no handler, no ``finally``, no flush runs.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers.modeling_utils  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import hf_csr.experiment  # noqa: E402
from hf_csr.trainer import CSR_STATE_NAME, CSRTrainer  # noqa: E402

STATE = {"step": 0}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def half_write(path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())


class KillAt(TrainerCallback):
    def __init__(self, where: str, step: int) -> None:
        self.where, self.step = where, step

    def on_step_end(self, args, state, control, **kwargs):
        STATE["step"] = state.global_step
        print(f"hf_csr-step {state.global_step}", flush=True)
        if self.where == "step" and state.global_step == self.step:
            die()

    def on_save(self, args, state, control, **kwargs):
        if self.where == "after_save" and state.global_step == self.step:
            assert os.path.isdir(os.path.join(args.output_dir, f"checkpoint-{self.step}"))
            die()


def install(plan: str) -> None:
    if plan == "none":
        where, step = "none", -1
    else:
        where, _, step = plan.partition(":")
        step = int(step)
    original_save, original_safe_save = torch.save, transformers.modeling_utils.safe_save_file

    def save(obj, f, *args, **kwargs):
        if where == "mid_state" and STATE["step"] == step and str(f).endswith(CSR_STATE_NAME):
            import io

            buffer = io.BytesIO()
            original_save(obj, buffer, *args, **kwargs)
            half_write(f, buffer.getvalue())
            die()
        return original_save(obj, f, *args, **kwargs)

    def safe_save(tensors, filename, *args, **kwargs):
        final = "final-model" in str(filename)
        if (where == "mid_weights" and STATE["step"] == step and not final) or (where == "mid_final" and final):
            half_write(filename, safetensors.torch.save(tensors, *args, **kwargs))
            die()
        return original_safe_save(tensors, filename, *args, **kwargs)

    if where.startswith("eval_"):
        from hf_csr.evaluation import robustness
        from hf_csr.utils import atomic_save

        saved = {"count": 0}

        def store_save(self, key, payload):
            saved["count"] += 1
            if where == "eval_mid" and saved["count"] == step:
                import io
                import tempfile

                buffer = io.BytesIO()
                original_save(payload, buffer)
                path = self._path(key)
                path.parent.mkdir(parents=True, exist_ok=True)
                # what atomic_save leaves when killed mid-write: a partial temporary file, never the final name
                _, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
                half_write(tmp, buffer.getvalue())
                die()
            atomic_save(payload, self._path(key))
            if where == "eval_after" and saved["count"] == step:
                die()

        robustness._ProgressStore.save = store_save
    torch.save = save
    transformers.modeling_utils.safe_save_file = safe_save
    callback = KillAt(where, step)

    class Trainer(CSRTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(callback)

    hf_csr.experiment.CSRTrainer = Trainer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill", default="none")
    known, rest = parser.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest
    torch.use_deterministic_algorithms(True)
    install(known.kill)
    if rest[:1] == ["evaluate"]:
        from hf_csr.cli import main as cli_main

        return cli_main(rest)
    return hf_csr.experiment.main(argv=rest)


if __name__ == "__main__":
    sys.exit(main())
