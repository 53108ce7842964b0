"""Data-parallel launch: the shipped accelerate configs start the processes they claim, and a recipe
trained with 2 CPU processes (one machine, or two "machines" on localhost) is one 2-process DDP run."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "accelerate_configs"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TINY_RECIPE = [
    str(REPO / "recipes" / "train_from_scratch.py"), "--model", "preact_resnet18",
    "--backbone_kwargs", '{"width": 4, "num_blocks": [1, 1, 1, 1]}', "--dataset", "fashion_mnist",
    "--train_limit", "64", "--eval_limit", "20", "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
    "--attack_steps", "2", "--final_eval_attacks", "clean", "--eval_strategy", "no", "--use_cpu",
    "--disable_tqdm", "true", "--save_strategy", "no", "--log_level", "info", "--seed", "0",
]


def _launch_args(config: Path, *extra: str):
    """What `accelerate launch --config_file config ...` resolves to (no process is started)."""
    args = launch_command_parser().parse_args(["--config_file", str(config), *extra, "script.py"])
    args, _, _ = _validate_launch_command(args)
    return args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_accelerate_config_parses(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.num_processes >= 1 and config.num_machines >= 1
    assert config.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU), "DDP only (see README: FSDP)"


@pytest.mark.parametrize("name, processes, machines", [
    ("cpu_2proc.yaml", 2, 1), ("cpu_2node.yaml", 2, 2), ("multi_gpu.yaml", 8, 1), ("multi_node.yaml", 16, 2),
])
def test_multi_process_configs_use_the_multi_process_launcher(name, processes, machines):
    # accelerate hands MULTI_CPU configs (and --cpu) to its single-process launcher: such a config
    # would silently train with ONE process. These must resolve to the torchrun-based launcher.
    args = _launch_args(CONFIGS / name)
    assert args.multi_gpu and not args.cpu
    assert (args.num_processes, args.num_machines) == (processes, machines)
    if name.startswith("cpu_"):
        assert args.use_cpu and args.mixed_precision == "no"


def test_single_gpu_config_is_one_process():
    args = _launch_args(CONFIGS / "single_gpu.yaml")
    assert not args.multi_gpu and args.num_processes == 1


def _run(cmd, cwd, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_two_process_run(output: str, out: Path) -> None:
    # 64 examples, 8 per process: 2 processes -> global batch 16, 4 optimizer steps (1 process: 8, 8).
    assert "Total train batch size (w. parallel, distributed & accumulation) = 16" in output, output[-3000:]
    assert "Total optimization steps = 4" in output, output[-3000:]
    assert (out / "results.json").exists() and (out / "model.safetensors").exists()
    # The console: each INFO line once (the main process logs INFO, the other at WARNING, as transformers'
    # log_level_replica), and no warning the user cannot act on.
    assert output.count("INFO hf_csr.evaluation.robustness: clean: accuracy") == 1, output[-3000:]
    assert output.count("Total optimization steps") == 1, output[-3000:]
    assert "find_unused_parameters" not in output and "pin_memory" not in output, output[-3000:]


@pytest.mark.subprocess
@pytest.mark.slow
def test_recipe_under_accelerate_launch_with_two_cpu_processes_and_two_nodes(tmp_path):
    # One machine, 2 processes.
    single = tmp_path / "one_node"
    proc = _run([*ACCELERATE, "--config_file", str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port",
                 str(_free_port()), *TINY_RECIPE, "--output_dir", str(single)], tmp_path)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    _check_two_process_run(output, single)

    # Two "machines" on localhost (machine_rank 0 and 1, one process each), the multi-node rehearsal.
    nodes = tmp_path / "two_nodes"
    port = str(_free_port())
    procs = [
        _run([*ACCELERATE, "--config_file", str(CONFIGS / "cpu_2node.yaml"), "--machine_rank", str(rank),
              "--main_process_ip", "127.0.0.1", "--main_process_port", port, *TINY_RECIPE, "--output_dir", str(nodes)],
             tmp_path)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    _check_two_process_run(outputs[0], nodes)

    # Same seed, same global batches, same all-reduced gradients and confusion counts: the two
    # topologies train the same model.
    a, b = load_file(single / "model.safetensors"), load_file(nodes / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fsdp_is_refused_with_a_clear_error(fmnist, fmnist_model, make_args, tmp_path):
    from hf_csr import CSRTrainer


    class FSDPTrainer(CSRTrainer):  # what accelerate reports when launched with an FSDP config
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.is_fsdp_enabled = True

    with pytest.raises(ValueError, match="DDP only"):
        FSDPTrainer(model=fmnist_model(), args=make_args(tmp_path), train_dataset=fmnist(limit=16))
