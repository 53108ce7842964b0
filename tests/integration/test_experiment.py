"""Recipes end to end: --config YAML, mixed real/generated batches, evaluation, card, push."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

from hf_csr import CSRTrainer
from hf_csr.data import MixedBatchOrderSampler, MixedImageDataset
from hf_csr.experiment import ExperimentArguments, parse_args, run


REPO = Path(__file__).resolve().parents[2]
TINY = {"model": "test_tiny_convnet", "dataset": "fashion_mnist", "train_limit": 64, "eval_limit": 30,
        "max_steps": 2, "per_device_train_batch_size": 16, "attack_steps": 2, "final_eval_attacks": "clean,pgd5",
        "use_cpu": True, "disable_tqdm": True, "save_steps": 1, "logging_steps": 1}


def test_config_precedence_and_errors(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("csr_gamma: 0.1\nattack_eps: 8/255\ncsr_variant: paper\nmodel: wrn28_10_ddpm\n")
    experiment, training = parse_args(
        ["--config", str(config), "--csr_gamma", "0.2", "--output_dir", str(tmp_path / "o")],
        defaults={"csr_gamma": 0.0, "model": "preact_resnet18", "learning_rate": 0.01},
    )
    assert training.fairness_config.gamma == 0.2  # command line > YAML > defaults
    assert training.fairness_config.variant == "paper" and experiment.model == "wrn28_10_ddpm"
    assert abs(training.attack_eps - 8 / 255) < 1e-12 and training.learning_rate == 0.01
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("csr_gama: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['csr_gama'\] in .*bad.yaml"):
        parse_args(["--config", str(bad_key)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("csr_gamma: [0.1\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML"):
        parse_args(["--config", str(broken)])
    with pytest.raises(ValueError, match="csr_variant must be one of"):
        parse_args([], defaults={"csr_variant": "spectral"})


def test_every_shipped_config_parses():
    configs = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
    assert len(configs) >= 20
    for config in configs:
        experiment, training = parse_args(["--config", str(config)])
        assert isinstance(experiment, ExperimentArguments) and training.output_dir.startswith("outputs/")


def test_mixed_batches_hold_the_real_fraction(fmnist):
    sampler = MixedBatchOrderSampler(num_real=50, num_generated=700, batch_size=20, real_fraction=0.3, seed=1)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(order) == len(sampler) and len(order) % 20 == 0
    per_batch_real = (order < 50).reshape(-1, 20).sum(1)
    assert (per_batch_real == 6).all()
    # DM-Improves-AT's epoch: ceil(n_real / B) batches, generated images drawn with replacement
    # (the schedule itself is checked against a re-implementation in test_mixing.py)
    assert len(order) == 3 * 20 and ((order >= 50) & (order < 750)).sum() == 3 * 14
    sampler.set_epoch(1)
    assert not np.array_equal(order, np.fromiter(iter(sampler), dtype=np.int64))
    with pytest.raises(ValueError, match="real_fraction must lie in"):
        MixedImageDataset(fmnist(limit=20), fmnist(limit=20), real_fraction=1.0)


def test_generated_data_recipe_end_to_end(tmp_path):
    """A synthetic DDPM-style npz is converted to shards and mixed 30/70 into every training batch."""
    rng = np.random.default_rng(0)
    npz = tmp_path / "generated.npz"
    np.savez(npz, image=rng.integers(0, 256, (160, 28, 28, 1), dtype=np.uint8), label=np.arange(160) % 10)
    seen, samplers = [], []

    class Spy(CSRTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            seen.append(int(inputs["labels"].shape[0]))
            samplers.append(self._get_train_sampler())
            return super().compute_loss(model, inputs, **kwargs)

    defaults = {**TINY, "generated_data": str(npz), "output_dir": str(tmp_path / "out")}
    experiment, training = parse_args([], defaults)
    import hf_csr.experiment as experiment_module

    original = experiment_module.CSRTrainer
    experiment_module.CSRTrainer = Spy
    try:
        results = run(experiment, training)
    finally:
        experiment_module.CSRTrainer = original
    assert seen == [16, 16]
    assert (tmp_path / "out" / "generated").is_dir()
    # Batches come from the 30/70 sampler (its composition is checked in test_mixed_batches_hold_the_real_fraction).
    assert isinstance(samplers[0], MixedBatchOrderSampler) and samplers[0].real_per_batch == 5
    assert set(results["attacks"]) == {"clean", "pgd5", "worst_of_all"}


@pytest.mark.subprocess
def test_recipe_script_writes_model_results_plots_and_card(tmp_path):
    out = tmp_path / "scratch"
    cmd = [sys.executable, str(REPO / "recipes" / "train_from_scratch.py"), "--output_dir", str(out),
           "--model", "preact_resnet_tiny", "--backbone_kwargs", '{"width": 4}',
           "--dataset", "fashion_mnist", "--train_limit", "64", "--eval_limit", "30", "--max_steps", "2",
           "--per_device_train_batch_size", "16", "--attack_steps", "2", "--final_eval_attacks", "clean,pgd5",
           "--eval_strategy", "no", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "results.json", "results.md", "README.md",
                 "confusion_matrix.png", "classwise_accuracy.png", "run_summary.json"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert "csr" in card.content.lower() and results["attacks"]["clean"]["class_counts"] == [3] * 10
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.threat_model["eps"] == pytest.approx(8 / 255)
    bad = subprocess.run([sys.executable, str(REPO / "recipes" / "train_from_scratch.py"), "--csr_alpha", "-1"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "csr_alpha must be >= 0" in bad.stderr


def test_trainer_evaluate_reports_classwise_robustness(fmnist, fmnist_model, make_args, tmp_path):
    torch.manual_seed(0)
    trainer = CSRTrainer(model=fmnist_model(), args=make_args(tmp_path, eval_attacks="clean,pgd5,cw5"),
                         train_dataset=fmnist(limit=64), eval_dataset=fmnist("test", limit=40))
    trainer.train()
    metrics = trainer.evaluate()
    for attack in ("clean", "pgd5", "cw5"):
        assert 0 <= metrics[f"eval_{attack}_worst_class_accuracy"] <= metrics[f"eval_{attack}_accuracy"] <= 1
        assert f"eval_{attack}_class/Shirt" in metrics
    assert metrics["eval_pgd5_accuracy"] <= metrics["eval_clean_accuracy"]
    assert any("eval_pgd5_accuracy" in h for h in trainer.state.log_history)


def test_push_to_hub_uploads_the_run_and_loads_back(fmnist, fmnist_model, make_args, tmp_path, local_hub):  # noqa: F811
    torch.manual_seed(0)
    args = make_args(tmp_path, hub_model_id="me/fmnist-csr", save_strategy="no")
    trainer = CSRTrainer(model=fmnist_model(), args=args, train_dataset=fmnist(limit=64),
                         eval_dataset=fmnist("test", limit=20))
    trainer.train()
    trainer.save_model()
    results = trainer.evaluate_and_report(attacks="clean,pgd5", training={"base_loss": "pgd", "csr_alpha": 0.3})
    trainer.push_to_hub()
    uploaded = set(local_hub.files("me/fmnist-csr"))
    assert {"model.safetensors", "config.json", "README.md", "results.json"} <= uploaded
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in uploaded)
    loaded = AutoModelForImageClassification.from_pretrained("me/fmnist-csr").eval()
    x = fmnist("test", limit=10).tensors()[0]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, trainer.model.eval()(x).logits)
    card = ModelCard.load(Path(args.output_dir) / "README.md")
    assert "me/fmnist-csr" in card.content
    assert results["attacks"]["pgd5"]["accuracy"] <= results["attacks"]["clean"]["accuracy"]
