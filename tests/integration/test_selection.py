"""The runner's held-out validation split, best-checkpoint selection and long tail (hf_csr.selection)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hf_csr.experiment as experiment_module
from hf_csr.data import TensorImageDataset
from hf_csr.experiment import parse_args, run
from hf_csr.selection import BestCheckpointCallback, split_training_set

TINY = ["--model", "preact_resnet18", "--backbone_kwargs", '{"width": 4, "num_blocks": [1, 1, 1, 1]}',
        "--dataset", "fashion_mnist", "--train_limit", "64", "--eval_limit", "30",
        "--per_device_train_batch_size", "16", "--attack_steps", "2", "--final_eval_attacks", "clean,pgd3",
        "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no", "--logging_steps", "1"]


def labelled(n=200, k=4):
    labels = torch.arange(n) % k
    return TensorImageDataset(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), labels, [str(c) for c in range(k)], name="toy")


def test_split_is_stratified_disjoint_fixed_and_long_tail_after_it():
    data = labelled()
    train, validation = split_training_set(data, validation_size=40)
    assert np.bincount(validation.labels.numpy()).tolist() == [10, 10, 10, 10]
    assert len(train) == 160
    again, validation2 = split_training_set(data, validation_size=40)
    assert torch.equal(validation.labels, validation2.labels)
    lt, validation3 = split_training_set(data, validation_size=40, long_tail_ratio=10)
    counts = np.bincount(lt.labels.numpy()).tolist()
    assert counts[0] == 40 and counts[-1] == 4 and torch.equal(validation3.labels, validation.labels)
    assert split_training_set(data) == (data, None)
    with pytest.raises(ValueError, match="smaller than the training set"):
        split_training_set(data, validation_size=200)


def test_validation_keeps_the_best_epoch_not_the_last(tmp_path, monkeypatch):
    scores = {1: 0.2, 2: 0.9, 3: 0.4}  # the validation accuracies the selection sees, by epoch
    weights_at = {}

    class Scripted(BestCheckpointCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            real = self.trainer.robustness_report
            epoch = int(round(state.epoch))
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            weights_at[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}

            def scripted(dataset, attacks, **kw):
                report = real(dataset, attacks, **kw)
                data = report.to_dict()
                data["attacks"][self.attack]["accuracy"] = scores[epoch]
                return type("Scripted", (), {"to_dict": lambda self: data})()

            self.trainer.robustness_report = scripted
            try:
                return super().on_epoch_end(args, state, control, **kwargs)
            finally:
                self.trainer.robustness_report = real

    monkeypatch.setattr(experiment_module, "BestCheckpointCallback", Scripted)
    out = tmp_path / "run"
    experiment, training = parse_args(TINY + ["--num_train_epochs", "3", "--validation_size", "20",
                                              "--validation_attack", "pgd2", "--output_dir", str(out)])
    results = run(experiment, training)
    record = json.loads((out / "best" / "selection.json").read_text())
    assert record["best_epoch"] == 2 and [h["epoch"] for h in record["history"]] == [1, 2, 3]
    assert record["validation_size"] == 20
    best = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(best[k], weights_at[2][k].cpu()) for k in best)
    assert not all(torch.equal(best[k], weights_at[3][k].cpu()) for k in best if k.endswith("weight"))
    best_results = json.loads((out / "best" / "results.json").read_text())
    final_results = json.loads((out / "results.json").read_text())
    assert set(best_results["attacks"]) == set(final_results["attacks"]) >= {"clean", "pgd3"}
    assert results["best"]["selection"]["best_epoch"] == 2
    # the final weights are back in place after the best ones were evaluated
    final = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(final[k], best[k]) for k in best if k in final)


def test_extra_eval_on_a_fixed_subset_and_long_tail(tmp_path):
    out = tmp_path / "run"
    experiment, training = parse_args(TINY + ["--max_steps", "1", "--long_tail_ratio", "4", "--extra_eval", "pgd2@10",
                                              "--output_dir", str(out)])
    results = run(experiment, training)
    assert results["attacks"]["pgd3"]["num_examples"] == 30 and "pgd2" not in results["attacks"]
    assert results["extra_eval"]["attacks"]["pgd2"]["num_examples"] == 10
    extra = json.loads((out / "extra_eval" / "results.json").read_text())
    assert extra["num_examples"] == 10 and (out / "extra_eval" / "classwise_accuracy.png").is_file()
    with pytest.raises(ValueError, match="attacks@examples"):
        parse_args(TINY + ["--extra_eval", "autoattack"])


def _count_evaluations(monkeypatch):
    """Record the output folder of every final evaluation the runner makes."""
    calls = []
    real = experiment_module.CSRTrainer.evaluate_and_report

    def counting(self, dataset, *args, output_dir=None, **kwargs):
        calls.append((output_dir or self.args.output_dir, len(dataset)))
        return real(self, dataset, *args, output_dir=output_dir, **kwargs)

    monkeypatch.setattr(experiment_module.CSRTrainer, "evaluate_and_report", counting)
    return calls


def test_a_best_epoch_equal_to_the_last_is_evaluated_once(tmp_path, monkeypatch):
    # one epoch: the best weights are the final ones, so their evaluation is shared, not recomputed
    calls = _count_evaluations(monkeypatch)
    out = tmp_path / "run"
    experiment, training = parse_args(TINY + ["--num_train_epochs", "1", "--validation_size", "20",
                                              "--validation_attack", "pgd2", "--extra_eval", "pgd2@10",
                                              "--extra_eval_on", "best", "--output_dir", str(out)])
    results = run(experiment, training)
    assert [n for _, n in calls] == [30, 10]  # the test set once, the extra subset once
    record = json.loads((out / "best" / "selection.json").read_text())
    assert record["same_as_final"] is True and results["best"]["selection"]["same_as_final"] is True
    assert json.loads((out / "best" / "results.json").read_text()) == json.loads((out / "results.json").read_text())
    assert (out / "best" / "extra_eval" / "results.json").is_file() and (out / "best" / "classwise_accuracy.png").is_file()
    assert "extra_eval" in results["best"] and "extra_eval" not in results  # extra_eval_on best


def test_extra_eval_on_picks_the_checkpoint(tmp_path, monkeypatch):
    # two epochs with a validation split: unless the last epoch wins, best and final differ; extra_eval_on
    # 'final' evaluates the subset for the final weights only
    calls = _count_evaluations(monkeypatch)
    out = tmp_path / "run"
    experiment, training = parse_args(TINY + ["--num_train_epochs", "2", "--validation_size", "20",
                                              "--validation_attack", "pgd2", "--extra_eval", "pgd2@10",
                                              "--extra_eval_on", "final", "--output_dir", str(out)])
    results = run(experiment, training)
    same = results["best"]["selection"]["same_as_final"]
    folders = [str(f) for f, n in calls if n == 10]
    assert folders == [str(out / "extra_eval")] and "extra_eval" in results and "extra_eval" not in results["best"]
    assert len(calls) == (2 if same else 3)
    with pytest.raises(ValueError, match="extra_eval_on must be one of"):
        experiment_module.ExperimentArguments(extra_eval_on="last")


def test_a_restart_from_the_first_step_forgets_the_earlier_best_epoch(tmp_path):
    # a killed earlier attempt left best/ with a high score but no checkpoint to resume from: its best epoch is
    # gone with it, and must neither beat nor be mixed into the new run's record
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    stale = {"attack": "pgd2", "metric": "x", "validation_size": 20, "best_epoch": 2, "best_score": 1.0,
             "history": [{"epoch": 2, "step": 8, "accuracy": 1.0, "worst_class_accuracy": 1.0, "clean_accuracy": 1.0}]}
    (out / "best" / "selection.json").write_text(json.dumps(stale))
    (out / "best" / "model.safetensors").write_bytes(b"not the weights of this run")
    experiment, training = parse_args(TINY + ["--num_train_epochs", "1", "--validation_size", "20",
                                              "--validation_attack", "pgd2", "--output_dir", str(out),
                                              "--resume_from_checkpoint", "last"])
    results = run(experiment, training)
    record = json.loads((out / "best" / "selection.json").read_text())
    assert record["best_score"] < 1.0 and len(record["history"]) == 1 and record["same_as_final"] is True
    assert results["best"]["selection"]["best_epoch"] == 1
    load_file(str(out / "best" / "model.safetensors"))  # the new run's weights, readable
