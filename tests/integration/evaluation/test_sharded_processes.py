"""Sharded evaluation in real processes (slow: each run starts 1-2 Python processes).

* ``hf-csr evaluate`` with 1 process, with 2 (``accelerate launch --multi_gpu --num_processes 2`` on CPUs,
  gloo) and with 2 and another batch size (``torchrun --nproc_per_node 2``): identical per-example outcomes
  and identical ``results.json`` for clean, PGD-20, CW-20 and AutoAttack's APGD-CE, APGD-T and FAB-T;
* only the main process writes: the second process writes nothing but the progress files of its own chunks
  (in ``<output-dir>/.progress``, removed at the end), and the written files are complete;
* a 2-process evaluation killed mid-way resumes under 1 process with the same final results;
* the Trainer's ``evaluate_and_report`` under DDP (2 processes) gives the 1-process results.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
WORKER = REPO / "tests" / "support" / "shard_worker.py"
ATTACKS = "clean,pgd20,cw20,autoattack:apgd-ce+apgd-t+fab-t"
AA_NAME = "autoattack:apgd-ce+apgd-t+fab-t[n_iter=5]"
OUTPUTS = {"results.json", "results.md", "confusion_matrix.png", "classwise_accuracy.png", "README.md"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(kind: str):
    if kind == "python":
        return [sys.executable]
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(_free_port())]


def run(kind, worker_args, argv, expect_ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [*launcher(kind), str(WORKER), *worker_args, "--", *argv]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def model_dir(fmnist_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded") / "model"
    fmnist_model.save_pretrained(directory)
    return directory


def evaluate_argv(model_dir, output_dir, batch_size, limit=32):
    return ["evaluate", "--model", str(model_dir), "--dataset", "fashion_mnist", "--limit", str(limit),
            "--batch-size", str(batch_size), "--attacks", ATTACKS, "--eps", "4/255", "--seed", "3", "--device", "cpu",
            "--no-progress", "--output-dir", str(output_dir)]


def evaluation(kind, model_dir, directory: Path, batch_size, *extra):
    out, outcomes = directory / "out", directory / "outcomes.json"
    result = run(kind, ["--aa-n-iter", "5", "--outcomes", str(outcomes), *extra],
                 evaluate_argv(model_dir, out, batch_size))
    return result, json.loads((out / "results.json").read_text()), json.loads(outcomes.read_text())


def writes(stderr: str):
    return {int(rank): json.loads(paths) for rank, paths in re.findall(r"hf_csr-writes (\d+) (\[.*\])", stderr)}


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """One process, batch 8."""
    _, results, outcomes = evaluation("python", model_dir, tmp_path_factory.mktemp("one"), 8)
    assert set(results["attacks"]) == {"clean", "pgd20", "cw20", AA_NAME, "worst_of_all"}
    assert results["attacks"][AA_NAME]["accuracy"] < results["attacks"]["clean"]["accuracy"]
    assert results["randomness"]["per_chunk"] == []
    return results, outcomes


@pytest.mark.subprocess
def test_two_processes_give_the_one_process_results_and_only_the_main_process_writes(model_dir, reference,
                                                                                      tmp_path):
    result, results, outcomes = evaluation("accelerate", model_dir, tmp_path, 8, "--track-writes")
    assert (results, outcomes) == reference
    # both processes ran and attacked their chunks
    assert re.search(r"clean: \d+ of 2 batches reloaded from .* \(process 1 of 2\)", result.stderr), result.stderr[-3000:]
    out = tmp_path / "out"
    written = writes(result.stderr)
    assert set(written) == {0, 1}
    progress = str(out / ".progress")
    assert written[1] and all(path.startswith(progress + os.sep) for path in written[1]), written[1]
    assert any(path == str(out / "results.json") for path in written[0])
    # the output folder holds the complete outputs, nothing else (the progress folder is gone)
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert results["num_examples"] == 32 and sum(results["attacks"]["clean"]["class_counts"]) == 32
    for name in ("confusion_matrix.png", "classwise_accuracy.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.size[0] > 400
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ("clean", "pgd20", "cw20"))
    assert "pgd20" in (out / "README.md").read_text()


@pytest.mark.subprocess
def test_two_processes_with_another_batch_size_give_the_same_results(model_dir, reference, tmp_path):
    _, results, outcomes = evaluation("torchrun", model_dir, tmp_path, 5)
    assert (results, outcomes) == reference


@pytest.mark.subprocess
def test_a_killed_two_process_evaluation_resumes_under_one_process(model_dir, reference, tmp_path):
    out = tmp_path / "out"
    argv = evaluate_argv(model_dir, out, 8)
    killed = run("torchrun", ["--aa-n-iter", "5", "--kill-after", "5", "--kill-rank", "0"], argv, expect_ok=False)
    assert killed.returncode != 0 and not (out / "results.json").exists()
    saved = len(list((out / ".progress").rglob("*.pt")))
    assert saved >= 5
    outcomes = tmp_path / "outcomes.json"
    resumed = run("python", ["--aa-n-iter", "5", "--outcomes", str(outcomes)], argv)
    found = re.findall(r"(\S+): (\d+) of (\d+) batches reloaded", resumed.stderr)
    assert sum(int(done) for _, done, _ in found) >= 5, found
    assert found[0] == ("clean", "4", "4")  # the clean pass of both processes is reused by the single one
    assert (json.loads((out / "results.json").read_text()), json.loads(outcomes.read_text())) == reference


@pytest.mark.subprocess
def test_trainer_evaluate_and_report_under_ddp(model_dir, tmp_path):
    one = run("python", [], ["trainer", str(model_dir), str(tmp_path / "one"), "8"])
    two = run("torchrun", ["--track-writes"], ["trainer", str(model_dir), str(tmp_path / "two"), "5"])
    first = json.loads((tmp_path / "one" / "results.json").read_text())
    second = json.loads((tmp_path / "two" / "results.json").read_text())
    assert first == second
    accuracies = re.findall(r"hf_csr-results (\d+) (\S+)", two.stderr)
    assert sorted(accuracies) == [("0", json.dumps(first["attacks"]["pgd10"]["accuracy"])),
                                  ("1", json.dumps(first["attacks"]["pgd10"]["accuracy"]))]
    assert re.findall(r"hf_csr-results 0 (\S+)", one.stderr) == [json.dumps(first["attacks"]["pgd10"]["accuracy"])]
    rank1 = writes(two.stderr)[1]
    assert not any(Path(path).name in OUTPUTS for path in rank1), rank1
