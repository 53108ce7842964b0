"""Evaluation integrity (RELIABILITY.md, item 5).

* the same seed gives identical evaluation results, twice in one process and across processes;
* ``hf-csr evaluate`` killed with SIGKILL midway (a real subprocess, ``tests/support/kill_worker.py``) resumes when
  the same command is run again: its per-attack, per-batch progress (default ``<output_dir>/.progress``)
  is reloaded, finished attacks are not re-run, and the final numbers are identical to an uninterrupted
  run's; ``--no-resume`` keeps no progress.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_csr.cli import main as cli_main
from hf_csr.data import FASHION_MNIST_CLASSES
from hf_csr.evaluation import evaluate_robustness
from hf_csr.models import create_robust_classifier


REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "support" / "kill_worker.py"
BATCHES = 12  # --limit 96 / --batch-size 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_robust_classifier("preact_resnet_tiny", class_names=FASHION_MNIST_CLASSES, width=4)
    directory = tmp_path_factory.mktemp("eval-model") / "model"
    model.save_pretrained(directory)
    return directory


def command(model_dir, output_dir, *extra):
    return ["evaluate", "--model", str(model_dir), "--dataset", "fashion_mnist", "--limit", str(8 * BATCHES),
            "--batch-size", "8", "--attacks", "clean,pgd5,cw5", "--seed", "3", "--device", "cpu", "--no-progress",
            "--output-dir", str(output_dir), *extra]


def run_worker(argv, plan="none"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(WORKER), "--kill", plan, "--", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(result.stderr[-3000:])
    return result


def reloaded(stderr: str):
    """{attack: (reloaded, total)} from the evaluation's INFO log."""
    found = re.findall(r"INFO hf_csr\.evaluation\.robustness: (\S+): (\d+) of (\d+) batches reloaded", stderr)
    return {name: (int(done), int(total)) for name, done, total in found}


def results(output_dir: Path):
    data = json.loads((output_dir / "results.json").read_text())
    data.get("metadata", {}).pop("output_dir", None)
    return data


def test_same_seed_same_results_in_process(fmnist, model_dir):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir)
    data = fmnist("test", limit=24)
    kwargs = dict(attacks="clean,pgd5,cw5", eps=8 / 255, batch_size=8, seed=5, progress=False)
    first = evaluate_robustness(model, data, **kwargs).to_dict()
    assert evaluate_robustness(model, data, **kwargs).to_dict() == first


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """An uninterrupted run in another process, no progress kept: the numbers to reproduce."""
    output_dir = tmp_path_factory.mktemp("eval-reference")
    assert run_worker(command(model_dir, output_dir, "--no-resume")).returncode == 0
    assert not (output_dir / ".progress").exists()
    return results(output_dir)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "plan, done",
    [("eval_mid:18", 17), pytest.param("eval_after:18", 18, marks=pytest.mark.slow)],
    ids=["mid-save", "after-a-save"],
)
def test_killed_evaluation_resumes_without_rerunning_finished_attacks(model_dir, reference, tmp_path, plan, done):
    killed_dir = tmp_path / "killed"
    killed = run_worker(command(model_dir, killed_dir), plan)
    assert killed.returncode == -signal.SIGKILL
    progress = killed_dir / ".progress"
    assert not (killed_dir / "results.json").exists()
    assert len(list(progress.rglob("*.pt"))) == done  # a half-written file is only ever a .tmp
    assert len(list(progress.rglob("*.tmp"))) == (1 if plan.startswith("eval_mid") else 0)

    resumed = run_worker(command(model_dir, killed_dir))
    assert resumed.returncode == 0
    counts = reloaded(resumed.stderr)
    assert counts["clean"] == (BATCHES, BATCHES)  # a finished attack is not re-run
    assert counts["pgd5"] == (done - BATCHES, BATCHES)  # the interrupted one continues where it stopped
    assert counts["cw5"] == (0, BATCHES)
    assert results(killed_dir) == reference
    assert not progress.exists()  # the default progress folder is removed once the evaluation has finished


@pytest.mark.subprocess
def test_same_seed_same_results_across_processes(model_dir, reference, tmp_path, capsys):
    """The same command with the same seed gives the same results.json here as in another process."""
    assert cli_main(command(model_dir, tmp_path / "a")) == 0
    capsys.readouterr()
    assert results(tmp_path / "a") == reference


def test_no_resume_and_resume_dir_exclude_each_other(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(command(model_dir, tmp_path / "x", "--no-resume", "--resume-dir", str(tmp_path / "p")))
    assert "--no_resume and --resume_dir exclude each other" in capsys.readouterr().err
