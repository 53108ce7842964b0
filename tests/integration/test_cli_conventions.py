"""Lazy imports and the command-line conventions: ``import hf_csr`` and ``--help`` stay light, flags follow
transformers (underscores, dash aliases, ``--log_level`` anywhere, help and groups), ``hf-csr train``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_csr.cli import build_parser, main as cli_main, run_command
from hf_csr.experiment import parse_args
from hf_csr.recipes import RECIPES


REPO = Path(__file__).resolve().parents[2]
HEAVY = ("datasets", "evaluate", "pyautoattack", "autoattack", "matplotlib", "transformers.trainer")
COMMANDS = ("quickstart", "train", "evaluate", "convert", "convert-data", "card", "push")


def _python(code_or_args, **kwargs):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
                          **kwargs)


@pytest.mark.subprocess
def test_import_hf_csr_registers_the_models_and_loads_nothing_else():
    code = f"""
import sys
import hf_csr
loaded = [m for m in {HEAVY!r} if m in sys.modules]
assert not loaded, loaded
import timm
from transformers import AutoConfig
assert "preact_resnet18" in timm.list_models("preact*")
assert type(AutoConfig.for_model("robust_image_classifier")).__name__ == "RobustClassifierConfig"
assert sorted(hf_csr.__all__) == hf_csr.__all__ and "CSRTrainer" in dir(hf_csr)
from hf_csr import CSRTrainer, RobustImageClassifier, pgd_attack  # the lazy names
assert hf_csr.evaluation.evaluate_robustness.__name__ == "evaluate_robustness"
print("ok")
"""
    result = _python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.subprocess
def test_a_package_run_with_dash_m_that_imports_hf_csr_gets_the_registration(tmp_path):
    """Only hf_csr's own ``-m`` modules (and the hf-csr script) defer the registration."""
    package = tmp_path / "user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("import hf_csr\n")
    (package / "probe.py").write_text("import timm\nprint('preact_resnet18' in timm.list_models('preact*'))\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "user_pkg.probe"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ("",) + COMMANDS)
def test_help_imports_no_torch(command):
    """``python -m hf_csr.cli [COMMAND] --help``, the real command; ``-X importtime`` lists every import."""
    result = _python(["-X", "importtime", "-m", "hf_csr.cli", *([command] if command else []), "--help"])
    assert result.returncode == 0 and result.stdout.startswith("usage: hf-csr"), result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "timm", "transformers", *HEAVY}, sorted(imported & {"torch", "timm", "transformers"})


def _help(command: str) -> str:
    return build_parser().commands[command].format_help()


def test_every_option_has_help_and_is_shown_with_underscores():
    for name, parser in build_parser().commands.items():
        for action in parser._actions:
            assert action.help, f"hf-csr {name} {action.option_strings or action.dest} has no help"
            for flag in action.option_strings:
                if flag.startswith("--") and "-" in flag[2:] and name != "convert-data":
                    assert "--" + flag[2:].replace("-", "_") in action.option_strings, (name, flag)
        text = parser.format_help()
        assert "--output-dir" not in text and "--log-level" not in text
    assert "--output_dir OUTPUT_DIR" in _help("evaluate") and "--token TOKEN" in _help("push")


def test_dash_aliases_and_log_level_before_or_after_the_command():
    parser = build_parser()
    both = [parser.parse_args(["evaluate", "--model", "m", "--dataset", "d", flag, "out"])
            for flag in ("--output_dir", "--output-dir")]
    assert both[0].output_dir == both[1].output_dir == "out"
    assert parser.parse_args(["--log-level", "DEBUG", "card", "x"]).log_level == "debug"
    assert parser.parse_args(["card", "x", "--log_level", "warning"]).log_level == "warning"
    assert parser.parse_args(["--log_level", "error", "card", "x"]).log_level == "error"
    assert parser.parse_args(["card", "x"]).log_level == "info"
    evaluate = _help("evaluate")
    assert evaluate.index("\nmodel:") < evaluate.index("\ndata:") < evaluate.index("\nattacks:")


def test_push_passes_the_token(tmp_path, monkeypatch, capsys):
    seen = {}

    class Info:
        commit_url = "https://hub/commit/1"

    def fake_push(local_dir, repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return Info()

    monkeypatch.setattr("hf_csr.hub.push.push_checkpoint", fake_push)
    assert cli_main(["push", str(tmp_path), "me/model", "--token", "hf_x", "--commit-message", "m"]) == 0
    assert seen["token"] == "hf_x" and seen["commit_message"] == "m" and seen["repo_id"] == "me/model"


def test_recipe_help_shows_groups_hf_csr_first_and_its_own_name(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--help"], prog="my_recipe.py")
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: my_recipe.py [-h] [--config YAML]")
    titles = ["experiment (", "fairness method (", "adversarial training (", "training (transformers.TrainingArguments)"]
    positions = [text.index("\n" + title) for title in titles]
    assert positions == sorted(positions)
    assert text.index("--csr_alpha") < positions[2] < text.index("--attack_eps") < positions[3] < text.index("--output_dir")
    with pytest.raises(SystemExit):
        run_command("evaluate", ["--help"], prog="evaluate_robustness.py")
    assert capsys.readouterr().out.startswith("usage: evaluate_robustness.py ")


def test_a_config_names_its_recipe(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("recipe: finetune_ddpm_wrn\ncsr_gamma: 0.1\n")
    experiment, training = parse_args(["--config", str(config)])
    assert experiment.generated_data == RECIPES["finetune_ddpm_wrn"][1]["generated_data"]
    assert training.fairness_config.gamma == 0.1
    with pytest.raises(ValueError, match="a config of the recipe 'finetune_ddpm_wrn', not 'train_from_scratch'"):
        parse_args(["--config", str(config)], recipe="train_from_scratch")
    config.write_text("recipe: table9\n")
    with pytest.raises(ValueError, match=r"unknown recipe 'table9'; the recipes are \["):
        parse_args(["--config", str(config)])


def test_train_runs_a_config_with_overrides(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "recipe: train_from_scratch\nmodel: test_tiny_convnet\ndataset: fashion_mnist\ntrain_limit: 64\n"
        "eval_limit: 30\nmax_steps: 1\nper_device_train_batch_size: 16\nattack_steps: 1\n"
        "final_eval_attacks: clean\neval_strategy: 'no'\nsave_strategy: 'no'\nuse_cpu: true\ndisable_tqdm: true\n"
    )
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(config), "--output-dir", str(out), "--max_steps", "2",
                     "--log_level", "warning"]) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["experiment"]["model"] == "test_tiny_convnet" and "clean" in summary["accuracy"]
    assert summary["training"]["epochs"] == "2 steps"  # the command line overrides the config
    capsys.readouterr()
    assert cli_main(["train", "--config", str(config), "--recipe", "finetune_ddpm_wrn"]) == 2
    assert "hf-csr train: error: " in capsys.readouterr().err
