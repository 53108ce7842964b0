"""The application layer's console and files: one final evaluation per run, per-class numbers in the logs and
files (not the progress line), INFO on the main process only, the evaluation table shown and returned, files
written with the user's umask, and the quick start's table built from the attacks it evaluated."""

import json
import logging
import os
import stat
from types import SimpleNamespace

import pytest
import torch

from hf_csr import CSRTrainer, CSRTrainingArguments
from hf_csr.experiment import parse_args, run
from hf_csr.quickstart import format_comparison, run_quickstart
from hf_csr.utils import atomic_write_json, process_log_level, quiet_http_logging, set_library_log_level

TINY = {"model": "test_tiny_convnet", "dataset": "fashion_mnist", "train_limit": 64, "eval_limit": 20,
        "max_steps": 2, "per_device_train_batch_size": 16, "attack_steps": 1, "final_eval_attacks": "clean,pgd2",
        "eval_attacks": "clean", "use_cpu": True, "disable_tqdm": True, "save_strategy": "no", "logging_steps": 1}


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=16,
                    per_device_eval_batch_size=32, attack_steps=1, logging_steps=1, save_steps=1, use_cpu=True,
                    disable_tqdm=True, seed=0, eval_attacks="clean,pgd2")
    settings.update(overrides)
    return CSRTrainingArguments(**settings)


@pytest.fixture
def make_trainer(fmnist, fmnist_model):
    """``make_trainer(tmp_path, **overrides)``: a one-step trainer of the tiny conv net on Fashion-MNIST."""

    def make(tmp_path, **overrides):
        torch.manual_seed(0)
        return CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=_args(tmp_path, **overrides),
                          train_dataset=fmnist(limit=32), eval_dataset=fmnist("test", limit=20))

    return make


# --------------------------------------------------------------------------- one evaluation per run
@pytest.mark.parametrize("strategy, expected", [("epoch", 1), ("steps", 2)])
def test_a_recipe_run_evaluates_once_at_the_end(tmp_path, monkeypatch, strategy, expected):
    """eval_strategy epoch: the Trainer's evaluation of the last step is the final evaluation's work again, so
    it is dropped (1 evaluation); steps with eval_steps 1: the step-1 evaluation stays, step 2's is dropped."""
    calls = []
    original = CSRTrainer.robustness_report

    def counting(self, dataset, attacks, **kwargs):
        calls.append((self.state.global_step, attacks))
        return original(self, dataset, attacks, **kwargs)

    monkeypatch.setattr(CSRTrainer, "robustness_report", counting)
    experiment, training = parse_args(["--eval_strategy", strategy, "--eval_steps", "1"],
                                      {**TINY, "output_dir": str(tmp_path / strategy)})
    results = run(experiment, training)
    assert len(calls) == expected, calls
    assert calls[-1] == (2, "clean,pgd2")  # the final evaluation, with final_eval_attacks
    assert set(results["attacks"]) == {"clean", "pgd2", "worst_of_all"}


# --------------------------------------------------------------------------- per-class numbers
def test_logged_metrics_hold_aggregates_and_per_class_goes_to_the_logger_and_a_file(tmp_path, caplog, make_trainer):
    trainer = make_trainer(tmp_path)
    with caplog.at_level(logging.INFO, logger="hf_csr"):
        metrics = trainer.evaluate()
    assert "eval_pgd2_class/Shirt" in metrics and "eval_pgd2_accuracy" in metrics  # returned in full
    logged = trainer.state.log_history[-1]
    assert "eval_pgd2_accuracy" in logged and "eval_clean_worst_class_accuracy" in logged
    assert not [key for key in logged if "class/" in key]  # the progress line and integrations: aggregates only
    assert any("eval_pgd2 accuracy per class: T-shirt/top" in r.getMessage() for r in caplog.records)
    lines = (tmp_path / "out" / "eval_per_class.jsonl").read_text().splitlines()
    entry = json.loads(lines[-1])
    assert entry["step"] == 0 and entry["eval_pgd2_class/Shirt"] == metrics["eval_pgd2_class/Shirt"]


# --------------------------------------------------------------------------- the final evaluation
def test_evaluate_and_report_returns_the_results_and_logs_the_table(tmp_path, caplog, make_trainer):
    trainer = make_trainer(tmp_path)
    with caplog.at_level(logging.INFO, logger="hf_csr"):
        results = trainer.evaluate_and_report(attacks="clean,pgd2", max_examples=20)
    assert set(results["attacks"]) == {"clean", "pgd2", "worst_of_all"} and len(results["class_names"]) == 10
    tables = [r for r in caplog.records if r.name == "hf_csr.trainer" and "| attack | accuracy |" in r.getMessage()]
    assert len(tables) == 1 and tables[0].levelno == logging.INFO
    assert "| pgd2 |" in tables[0].getMessage()


def test_hf_csr_records_show_without_a_logging_configuration(capsys):
    """A plain Python session (no root handler): hf_csr's INFO lines, e.g. the evaluation table, are shown;
    once the application configures logging, its handlers show them (no duplicates)."""
    root = logging.getLogger()
    library = logging.getLogger("hf_csr")
    saved_handlers, saved_level = root.handlers[:], library.level
    try:
        root.handlers = []
        set_library_log_level(logging.INFO)
        set_library_log_level(logging.INFO)  # idempotent: one handler
        logging.getLogger("hf_csr.trainer").info("the table")
        assert capsys.readouterr().err.count("the table") == 1
        root.addHandler(logging.NullHandler())
        logging.getLogger("hf_csr.trainer").info("handled by the application")
        assert "handled by the application" not in capsys.readouterr().err
    finally:
        root.handlers = saved_handlers
        library.setLevel(saved_level)


# --------------------------------------------------------------------------- log levels per process
def test_info_on_the_main_process_warning_on_the_replicas():
    def args(main, level="passive", replica="warning"):
        return SimpleNamespace(should_log=main, log_level=level, log_level_replica=replica)

    assert process_log_level(args(True)) == logging.INFO
    assert process_log_level(args(False)) == logging.WARNING
    assert process_log_level(args(False, replica="passive")) == logging.WARNING
    assert process_log_level(args(True, level="debug")) == logging.DEBUG
    assert process_log_level(args(False, level="debug", replica="error")) == logging.ERROR
    # the arguments' own defaults, as the Trainer reads them
    defaults = CSRTrainingArguments(output_dir="unused", use_cpu=True)
    assert (defaults.log_level, defaults.log_level_replica) == ("passive", "warning")


def test_no_warning_the_user_cannot_act_on(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path)
    # every parameter of an hf_csr classifier is used: DDP does not search for unused ones (nor warns about it)
    assert trainer.args.ddp_find_unused_parameters is False
    if not torch.accelerator.is_available():
        # no accelerator: no pinned memory (torch warns at every DataLoader otherwise), even without --use_cpu
        assert CSRTrainingArguments(output_dir=str(tmp_path / "a")).dataloader_pin_memory is False
    quiet_http_logging()  # what the recipes and the quick start call: no line per HTTP request
    assert logging.getLogger("httpx").level == logging.WARNING == logging.getLogger("httpcore").level


# --------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_are_written_with_the_users_umask(tmp_path, umask, make_trainer):
    previous = os.umask(umask)
    try:
        trainer = make_trainer(tmp_path, save_strategy="steps")
        trainer.train()  # checkpoint-1
        trainer.save_model()
        atomic_write_json(tmp_path / "out" / "extra.json", {"a": 1})
        direct = tmp_path / "direct"
        trainer.model.save_pretrained(direct)
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] + [p for p in direct.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "config.json", "extra.json", "trainer_state.json"} <= names
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != expected}
    assert not wrong, f"expected {oct(expected)}: {wrong}"


# --------------------------------------------------------------------------- the quick start's table
def _entry(accuracy, per_class):
    return {"accuracy": accuracy, "worst_class": {"accuracy": min(per_class), "name": "b"},
            "per_class_accuracy": per_class}


def test_quickstart_table_lists_the_attacks_evaluated():
    attacks = {"clean": _entry(0.9, [0.95, 0.85]), "pgd10": _entry(0.5, [0.6, 0.4]),
               "worst_of_all": _entry(0.5, [0.6, 0.4])}
    summary = {"output_dir": "/o", "seconds": {"pgd_at": 1.0, "csr": 1.0},
               "results": {name: {"attacks": attacks, "class_names": ["a", "b"]} for name in ("pgd_at", "csr")}}
    table = format_comparison(summary)
    assert "| pgd_at | PGD-10 | 50.0 | 40.0 | b |" in table and "| csr | clean | 90.0 | 85.0 | b |" in table
    assert "pgd_at PGD-10" in table and "worst of all" not in table  # one attack: worst_of_all is that attack
    three = {**attacks, "cw5": _entry(0.45, [0.5, 0.4])}
    summary["results"] = {name: {"attacks": three, "class_names": ["a", "b"]} for name in ("pgd_at", "csr")}
    assert "| csr | CW-5 |" in format_comparison(summary) and "worst of all" in format_comparison(summary)


def test_quickstart_runs_with_other_final_attacks(tmp_path):
    overrides = ["--final_eval_attacks", "clean,pgd10", "--max_steps", "1", "--train_limit", "32", "--eval_limit",
                 "20", "--model", "test_tiny_convnet", "--backbone_kwargs", "{}", "--attack_steps", "1",
                 "--per_device_train_batch_size", "16", "--save_strategy", "no", "--disable_tqdm", "true"]
    summary = run_quickstart(str(tmp_path / "qs"), overrides)
    table = format_comparison(summary)
    assert "| pgd_at | PGD-10 |" in table and "| csr | PGD-10 |" in table and "PGD-20" not in table
