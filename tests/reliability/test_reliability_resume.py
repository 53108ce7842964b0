"""Kill and resume (RELIABILITY.md, item 1).

A recipe run (``tests/support/kill_worker.py`` -> ``hf_csr.experiment.main``) is killed with SIGKILL -- at a step,
right after a checkpoint, half-way through writing ``csr_state.pt`` or ``model.safetensors`` of a
checkpoint, half-way through the final save, or from outside at a random moment -- and rerun with
``--resume_from_checkpoint last`` until it finishes. The final weights (``model.safetensors``) and the
confusion estimate must be bit-identical to an uninterrupted run's (CPU, deterministic), and no
half-written file may ever be picked up: the previous checkpoint stays the latest complete one.

The default suite runs one chain (ema source, AWP on, killed mid-save, at a step, in the final save); the full matrix
(ema and epoch sources, AWP, six kill plans, external random kills) is ``-m slow``.
"""

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_csr.safety import EXIT_SIGTERM
from hf_csr.trainer import CSR_STATE_NAME

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "support" / "kill_worker.py"
MAX_STEPS = 6  # 64 training images, batch 16: 4 steps per epoch, so runs cross an epoch boundary
KILLED = -signal.SIGKILL


def recipe_flags(output_dir: Path, source: str, awp: bool):
    return [
        "--model", "preact_resnet_tiny", "--backbone_kwargs", '{"width": 4}',
        "--dataset", "fashion_mnist", "--train_limit", "64", "--eval_limit", "20", "--final_eval_attacks", "clean",
        "--max_steps", str(MAX_STEPS), "--save_steps", "1", "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "32", "--attack_steps", "2", "--learning_rate", "0.05", "--use_cpu",
        "--disable_tqdm", "true", "--seed", "0", "--logging_steps", "2", "--report_to", "none",
        "--csr_confusion_source", source, "--csr_variant", "paper", "--csr_gamma", "0.1",
        "--awp_gamma", "0.005" if awp else "0", "--resume_from_checkpoint", "last", "--output_dir", str(output_dir),
    ]


def worker(output_dir: Path, plan: str, source: str, awp: bool, external_kill_at=None, rng=None):
    """Run the worker once; returns its exit code (``-SIGKILL`` when killed)."""
    cmd = [sys.executable, str(WORKER), "--kill", plan, "--", *recipe_flags(output_dir, source, awp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: a full stderr pipe would block the worker
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        if external_kill_at is not None:
            for line in process.stdout:
                if line.strip() == f"hf_csr-step {external_kill_at}":
                    time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the next step, or in the save of this one
                    process.send_signal(signal.SIGKILL)
                    break
        process.communicate(timeout=300)
        log.seek(0)
        stderr = log.read()
    if process.returncode not in (0, KILLED):
        raise AssertionError(f"worker failed ({process.returncode}):\n{stderr[-3000:]}")
    return process.returncode


def complete_checkpoints(output_dir: Path):
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))


def final_state(output_dir: Path):
    weights = load_file(output_dir / "model.safetensors")
    state = torch.load(output_dir / f"checkpoint-{MAX_STEPS}" / CSR_STATE_NAME, weights_only=True)
    return weights, state["fairness"]["state"]["confusion"]  # CSR is a fairness plug-in: its state sits under "fairness"


def assert_identical(reference, resumed):
    ref_weights, ref_confusion = reference
    weights, confusion = resumed
    assert ref_weights.keys() == weights.keys()
    for key in ref_weights:
        assert torch.equal(ref_weights[key], weights[key]), key
    for key in ("counts", "class_counts"):
        assert torch.equal(ref_confusion[key], confusion[key]), key
    assert ref_confusion["num_updates"] == confusion["num_updates"]
    assert ref_confusion["pass_tag"] == confusion["pass_tag"]


def check_after_kill(output_dir: Path, plan: str):
    """What a kill may leave behind: never a complete-looking checkpoint or final file that is half written."""
    where, _, step = plan.partition(":")
    done = complete_checkpoints(output_dir)
    for number in done:  # every checkpoint in place is complete and loads
        folder = output_dir / f"checkpoint-{number}"
        load_file(folder / "model.safetensors")
        torch.load(folder / CSR_STATE_NAME, weights_only=True)
    if where in ("mid_state", "mid_weights"):
        assert int(step) not in done and max(done) == int(step) - 1
        assert (output_dir / ".incomplete" / f"checkpoint-{step}").is_dir()  # the half-written one, never used
    if where == "mid_final":
        assert not (output_dir / "model.safetensors").exists()
        assert done[-1] == MAX_STEPS


def run_chain(tmp_path: Path, source: str, awp: bool, plans, external=None):
    """Uninterrupted run vs. a run killed at each of ``plans`` in turn (then left to finish)."""
    reference_dir = tmp_path / "reference"
    assert worker(reference_dir, "none", source, awp) == 0
    reference = final_state(reference_dir)
    output_dir = tmp_path / "killed"
    kills = 0
    for plan in plans:
        assert worker(output_dir, plan, source, awp) == KILLED, plan
        check_after_kill(output_dir, plan)
        kills += 1
    rng = random.Random(f"{source}-{awp}")
    for _ in range(external or 0):
        start = max(complete_checkpoints(output_dir) or [0])
        if start >= MAX_STEPS - 1:
            break
        at = min(MAX_STEPS - 1, start + rng.randint(1, 2))  # a step or two after the resume point
        if worker(output_dir, "none", source, awp, external_kill_at=at, rng=rng) == KILLED:
            check_after_kill(output_dir, "external")
            kills += 1
    assert worker(output_dir, "none", source, awp) == 0
    assert_identical(reference, final_state(output_dir))
    assert not (output_dir / ".incomplete").exists() or not any((output_dir / ".incomplete").iterdir())
    return kills


@pytest.mark.subprocess
def test_killed_mid_save_at_a_step_and_in_the_final_save_resumes_to_identical_weights(tmp_path):
    """Default suite: ema source, AWP on; killed half-way through a checkpoint's csr_state.pt, then at a step,
    then half-way through the final save (the rerun restores the finished checkpoint-6 and trains no further)."""
    assert run_chain(tmp_path, "ema", True, ["mid_state:3", "step:5", "mid_final:0"]) == 3


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("source", ["ema", "epoch"])
@pytest.mark.parametrize(
    "plans",
    [["step:2", "step:4"], ["after_save:3"], ["mid_weights:2", "mid_state:4"], ["mid_final:0"], ["step:5", "mid_final:0"]],
    ids=["steps", "after-save", "mid-save", "mid-final-save", "step-then-final"],
)
def test_kill_matrix_resumes_to_identical_weights(tmp_path, source, plans):
    run_chain(tmp_path, source, True, plans)


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("source, awp", [("ema", True), ("epoch", True), ("ema", False)])
def test_external_random_sigkill_resumes_to_identical_weights(tmp_path, source, awp):
    """SIGKILL from outside at a random moment (seeded), three times in a row, then run to the end."""
    assert run_chain(tmp_path, source, awp, [], external=3) >= 1  # up to 3 kills; a late one may find the run done


def _recipe_flags(output_dir):
    flags = recipe_flags(output_dir, "ema", True)
    flags[flags.index("--save_steps") + 1] = "100"  # no periodic checkpoint: only SIGTERM's
    return flags


def _run_worker(output_dir, sigterm_after=None):
    cmd = [sys.executable, str(WORKER), "--kill", "none", "--", *_recipe_flags(output_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        if sigterm_after is not None:
            for line in process.stdout:
                if line.strip() == f"hf_csr-step {sigterm_after}":
                    process.send_signal(signal.SIGTERM)
                    break
        process.communicate(timeout=600)
        log.seek(0)
        return process.returncode, log.read()


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_mid_training_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """A real recipe process gets SIGTERM after step 2: it saves checkpoint-N (N = 3, the next step boundary),
    exits 143 without a final model; rerun with --resume_from_checkpoint last, it ends bit-identical."""
    code, log = _run_worker(tmp_path / "reference")
    assert code == 0, log[-3000:]
    code, log = _run_worker(tmp_path / "run", sigterm_after=2)
    assert code == EXIT_SIGTERM, log[-3000:]
    assert "stopped by SIGTERM after optimizer step" in log and "Traceback" not in log
    checkpoints = [p.name for p in (tmp_path / "run").glob("checkpoint-*")]
    assert checkpoints in (["checkpoint-3"], ["checkpoint-4"]), checkpoints
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no final save after a SIGTERM
    code, log = _run_worker(tmp_path / "run")
    assert code == 0, log[-3000:]
    reference = load_file(tmp_path / "reference" / "model.safetensors")
    resumed = load_file(tmp_path / "run" / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


# --------------------------------------------------------------------------- the final evaluation resumes
def test_an_interrupted_final_evaluation_resumes_from_its_finished_batches(tmp_path, fmnist, fmnist_model, make_args):
    """A long final evaluation killed midway (a session's end) continues where it stopped when the same
    weights are evaluated again: finished batches are reloaded, the results equal an uninterrupted run's,
    and the progress folder goes once the results are saved."""
    from hf_csr import CSRTrainer

    torch.manual_seed(0)
    trainer = CSRTrainer(model=fmnist_model(), args=make_args(tmp_path, max_steps=1),
                         train_dataset=fmnist(limit=32), eval_dataset=fmnist("test", limit=40))
    model = trainer.model
    calls = {"n": 0, "fail_after": None}
    forward = model.forward

    def counting_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["fail_after"] is not None and calls["n"] > calls["fail_after"]:
            raise RuntimeError("simulated interruption")
        return forward(*args, **kwargs)

    model.forward = counting_forward
    kwargs = dict(attacks="clean,pgd5", batch_size=8)
    reference = trainer.evaluate_and_report(output_dir=str(tmp_path / "reference"), **kwargs)
    full = calls["n"]
    assert not (tmp_path / "reference" / ".progress").exists()

    calls.update(n=0, fail_after=full // 2)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        trainer.evaluate_and_report(output_dir=str(tmp_path / "run"), **kwargs)
    assert any((tmp_path / "run" / ".progress").rglob("*.pt"))  # finished batches were kept

    calls.update(n=0, fail_after=None)
    resumed = trainer.evaluate_and_report(output_dir=str(tmp_path / "run"), **kwargs)
    assert calls["n"] < full - full // 4  # the finished batches were not recomputed
    assert resumed["attacks"] == reference["attacks"]
    assert not (tmp_path / "run" / ".progress").exists()
