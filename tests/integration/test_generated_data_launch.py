"""Generated data prepared once per launch, and launches that do not form one process group stopped at start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate import PartialState

from hf_csr.experiment import _first_then_others, check_launch
from hf_csr.data.generated import convert_generated_data, find_conversion

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def write_npz(path, count, seed):
    rng = np.random.default_rng(seed)
    np.savez(path, image=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), label=np.arange(count) % 10)
    return path


def test_a_finished_conversion_is_recognised_and_an_interrupted_one_redone(tmp_path, caplog):
    npz = write_npz(tmp_path / "gen.npz", 300, 0)
    out = tmp_path / "converted"
    assert find_conversion(out, [npz]) is None
    convert_generated_data(npz, out, shard_size=128, chunk_size=50)
    assert (out / "metadata.json").is_file() and not (out / "index.json").exists()
    found = find_conversion(out, [npz], num_classes=10)
    assert found is not None and len(found) == 300
    assert find_conversion(out, [npz], num_classes=100) is None  # other classes
    other = write_npz(tmp_path / "other.npz", 200, 1)
    assert find_conversion(out, [other]) is None  # other files
    # An interrupted conversion: no metadata, a completed shard and a half-written temporary file.
    (out / "metadata.json").unlink()
    (out / ".images-00001.npy.tmp").write_bytes(b"\x93NUMPY half")
    assert find_conversion(out, [npz]) is None
    again = convert_generated_data(npz, out, shard_size=128, chunk_size=50, overwrite=True)
    assert len(again) == 300 and not list(out.glob(".*.tmp"))
    assert np.array_equal(again.images[:], np.load(npz)["image"])


def test_single_process_preparation_and_launch_check(monkeypatch):
    state = PartialState()
    calls = []
    _first_then_others(state, True, lambda: calls.append(1), "work")
    assert calls == [1]
    with pytest.raises(OSError, match="disk full"):
        _first_then_others(state, True, lambda: (_ for _ in ()).throw(OSError("disk full")), "work")
    check_launch()  # one process, no launcher: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="did not form one process group.*--use_cpu"):
        check_launch()


def recipe_command(tmp_path, real, generated, out, *extra):
    return [*ACCELERATE, "--config_file", str(REPO / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"),
            "--main_process_port", str(_free_port()),
            str(REPO / "recipes" / "finetune_ddpm_wrn.py"), "--model", "wrn28_10_ddpm",
            "--backbone_kwargs", '{"depth": 10, "width": 1}', "--dataset", str(real), "--train_limit", "100",
            "--eval_limit", "20", "--generated_data", str(generated), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--attack_steps", "1", "--final_eval_attacks", "clean",
            "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", *extra]


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_process_ddpm_recipe_converts_once_and_a_second_launch_reuses_it(tmp_path):
    real = write_npz(tmp_path / "cifar_like.npz", 200, 0)
    generated = write_npz(tmp_path / "generated_100k.npz", 100_000, 1)
    out = tmp_path / "run"
    first = subprocess.run(recipe_command(tmp_path, real, generated, out, "--use_cpu"), cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    log = first.stdout + first.stderr
    assert log.count("converting ") == 1 and "reusing the converted generated data" not in log, log[-4000:]
    assert "Converted 100000 generated images" in log
    metadata = json.loads((out / "generated" / "metadata.json").read_text())
    assert metadata["num_examples"] == 100_000
    shards = sorted((out / "generated").glob("*.npy"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    assert not list((out / "generated").glob(".*.tmp"))
    assert (out / "results.json").exists() and (out / "model.safetensors").exists()
    assert first.stdout.count("'loss'") == 2  # two logged training steps, from the main process
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["training"]["epochs"] == "2 steps"

    second = subprocess.run(recipe_command(tmp_path, real, generated, out, "--use_cpu"), cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    log = second.stdout + second.stderr
    assert "reusing the converted generated data" in log and "converting " not in log, log[-4000:]
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "generated").glob("*.npy"))} == stamps


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_launch_whose_processes_do_not_form_one_group_stops_at_start(tmp_path):
    """cpu_2proc.yaml without --use_cpu on a machine without GPUs starts two independent single-process runs."""
    real = write_npz(tmp_path / "cifar_like.npz", 200, 0)
    generated = write_npz(tmp_path / "gen.npz", 500, 1)
    out = tmp_path / "run"
    result = subprocess.run(recipe_command(tmp_path, real, generated, out), cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "did not form one process group" in result.stderr and "--use_cpu" in result.stderr
    # stopped before any data was prepared or any training step ran
    assert not (out / "generated").exists() and not list(out.glob("checkpoint-*"))
    assert "converting " not in result.stderr and "'loss'" not in result.stdout
