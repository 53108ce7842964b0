"""CSRTrainer end to end: logging, checkpoints, exact equivalences (alpha = 0, resume, DDP, accumulation)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_csr import CSRTrainer
from hf_csr.attacks import pgd_attack
from hf_csr.data import TensorImageDataset
from hf_csr.trainer import CSR_STATE_NAME


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def train(fmnist, fmnist_model, make_args):
    def train(tmp_path, model=None, dataset=None, callbacks=None, resume=None, **overrides):
        torch.manual_seed(0)
        model = fmnist_model(model) if isinstance(model, str) else (model if model is not None else fmnist_model())
        trainer = CSRTrainer(model=model, args=make_args(tmp_path, **overrides),
                             train_dataset=dataset if dataset is not None else fmnist(limit=64), callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer
    return train


@pytest.mark.parametrize("base_loss", ["pgd", "trades"])
def test_end_to_end_training_logs_and_checkpoints(train, fmnist_model, tmp_path, base_loss):
    torch.manual_seed(0)
    model = fmnist_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = train(tmp_path, model=model, base_loss=base_loss, csr_variant="paper", csr_gamma=0.1, awp_gamma=0.005)
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "weight" in k)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for key in ("base_loss", "csr_psi", "csr_spectral_norm", "adv_accuracy", "adv_worst_class_accuracy"):
        assert all(key in h for h in logged), key
    assert all(0.0 <= h["adv_worst_class_accuracy"] <= h["adv_accuracy"] <= 1.0 for h in logged)
    out = Path(trainer.args.output_dir)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / CSR_STATE_NAME).exists() and (out / "checkpoint-4" / "model.safetensors").exists()
    assert not (out / ".incomplete").exists()
    state = torch.load(out / "checkpoint-4" / CSR_STATE_NAME, weights_only=True)
    assert state["fairness"]["name"] == "csr" and state["fairness"]["state"]["confusion"]["num_updates"] == 4


@pytest.mark.parametrize("base_loss", ["pgd", "trades"])
def test_alpha_zero_is_exactly_the_base_method(train, assert_same_weights, weights, tmp_path, base_loss):
    common = dict(base_loss=base_loss, save_strategy="no")
    plain = train(tmp_path / "plain", fairness_method="none", **common)
    zero = train(tmp_path / "zero", fairness_method="csr", csr_alpha=0.0, **common)
    with_csr = train(tmp_path / "csr", fairness_method="csr", csr_alpha=0.3, **common)
    assert_same_weights(weights(plain), weights(zero))
    assert any(not torch.equal(a, b) for a, b in zip(weights(plain).values(), weights(with_csr).values()))


@pytest.mark.parametrize("base_loss", ["pgd", "trades"])
def test_one_step_matches_a_hand_written_update(assert_same_weights, fmnist, fmnist_model, make_args, weights, tmp_path, base_loss):
    """The alpha = 0 step equals PGD-AT / TRADES written out by hand with the same attack start."""
    torch.manual_seed(0)
    model = fmnist_model("test_tiny_convnet")
    reference = fmnist_model("test_tiny_convnet")
    reference.load_state_dict(model.state_dict())
    data = fmnist(limit=16)
    trainer = CSRTrainer(model=model, args=make_args(tmp_path, max_steps=1, base_loss=base_loss, fairness_method="none",
                                                     augment=False, save_strategy="no", weight_decay=0.0, optim_args=""),
                         train_dataset=data)
    x, y = data.tensors()
    # The trainer's first batch (same sampler seed), and the attack start it draws for step 0.
    order = list(iter(trainer.get_train_dataloader().batch_sampler))[0]
    x, y = x[order], y[order]
    trainer.state.global_step, trainer._micro_step = 0, 0
    noise = trainer._attack_noise(x, 8 / 255)
    trainer.train()
    loss_name = "kl" if base_loss == "trades" else "ce"
    x_adv = pgd_attack(reference, x, y, eps=8 / 255, step_size=2 / 255, steps=2, loss=loss_name, noise=noise)
    reference.train()
    if base_loss == "pgd":
        loss = F.cross_entropy(reference(x_adv).logits, y)
    else:
        nat, adv = reference(x).logits, reference(x_adv).logits
        loss = F.cross_entropy(nat, y) + 6.0 * F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="batchmean")
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.05 * p.grad
    assert_same_weights(weights(trainer), reference.state_dict(), atol=1e-6)


@pytest.mark.parametrize("source, stop", [("ema", 2), ("epoch", 6), ("epoch", 4), ("batch", 2)])
def test_resume_gives_identical_weights(train, StopAt, assert_same_weights, weights, tmp_path, source, stop):
    common = dict(max_steps=8, csr_confusion_source=source, csr_variant="paper", save_steps=2)
    straight = train(tmp_path / "straight", **common)
    interrupted = train(tmp_path / "interrupted", callbacks=[StopAt(stop)], **common)
    assert interrupted.state.global_step == stop
    checkpoint = tmp_path / "interrupted" / "out" / f"checkpoint-{stop}"
    resumed = train(tmp_path / "interrupted", resume=str(checkpoint), **common)
    assert resumed.state.global_step == 8
    assert_same_weights(weights(straight), weights(resumed))
    assert torch.equal(straight.fairness.confusion.confusion(), resumed.fairness.confusion.confusion())


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "extra",
    [["--source", "ema", "--variant", "reference", "--awp-gamma", "0.005"],
     ["--source", "epoch", "--variant", "paper", "--base-loss", "trades"]],
)
def test_two_processes_equal_one_process(run_ddp_workers, assert_same_weights, tmp_path, extra):
    one = run_ddp_workers(tmp_path, 1, 32, extra)
    two = run_ddp_workers(tmp_path, 2, 16, extra)
    assert torch.equal(one.pop("confusion"), two.pop("confusion"))  # counts reduced across processes
    assert_same_weights(one, two, atol=1e-5)


def test_gradient_accumulation_equals_the_large_batch(train, assert_same_weights, weights, tmp_path):
    common = dict(fairness_method="csr", csr_alpha=0.0, save_strategy="no", max_steps=2)
    big = train(tmp_path / "big", model="test_tiny_convnet", per_device_train_batch_size=32, **common)
    accumulated = train(tmp_path / "acc", model="test_tiny_convnet", per_device_train_batch_size=16,
                        gradient_accumulation_steps=2, **common)
    assert_same_weights(weights(big), weights(accumulated), atol=1e-5)


@pytest.mark.parametrize("source", ["ema", "batch"])
def test_confusion_sources_update_per_micro_batch(train, tmp_path, source):
    """Documented behaviour: under accumulation, `ema`/`batch` fold in every micro-batch's counts."""
    trainer = train(tmp_path, model="test_tiny_convnet", per_device_train_batch_size=16,
                    gradient_accumulation_steps=2, max_steps=2, csr_confusion_source=source, save_strategy="no")
    assert trainer.fairness.confusion.num_updates == 4
    if source == "batch":
        # C is the last micro-batch's alone: at most 16 examples in it.
        assert float(trainer.fairness.confusion.class_counts.sum()) == 16


def test_epoch_source_runs_one_pass_per_epoch(train, tmp_path):
    trainer = train(tmp_path, max_steps=8, csr_confusion_source="epoch", save_strategy="no")
    assert trainer.fairness.confusion.pass_tag == 1 and trainer.fairness.confusion.num_updates == 2
    assert float(trainer.fairness.confusion.class_counts.sum()) == 64  # the whole training set


def test_bad_training_input_is_rejected_before_training(fmnist, fmnist_model, make_args, tmp_path):
    data = fmnist(limit=32)
    bad_labels = TensorImageDataset(data.images, data.labels + 5, [str(i) for i in range(15)], name="train")
    with pytest.raises(ValueError, match=r"labels lie in \[5, 14\] but the model has num_classes = 10"):
        CSRTrainer(model=fmnist_model(), args=make_args(tmp_path), train_dataset=bad_labels)
    floats = TensorImageDataset((data.images.float() / 255 - 0.5) / 0.25, data.labels, data.class_names)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        CSRTrainer(model=fmnist_model(), args=make_args(tmp_path), train_dataset=floats)
    without_shirts = data.subset([i for i in range(len(data)) if int(data.labels[i]) != 6])
    with pytest.raises(ValueError, match=r"no examples of class\(es\) \['Shirt'\]"):
        CSRTrainer(model=fmnist_model(), args=make_args(tmp_path), train_dataset=without_shirts)
    with pytest.raises(ValueError, match=r"csr_variant must be one of \['paper', 'reference'\]"):
        make_args(tmp_path, csr_variant="spectral")
    with pytest.raises(ValueError, match="attack_step_size .* must not exceed attack_eps"):
        make_args(tmp_path, attack_eps="8/255", attack_step_size="16/255")
    with pytest.raises(ValueError, match="CSRTrainer needs args=CSRTrainingArguments"):
        from transformers import TrainingArguments

        CSRTrainer(model=fmnist_model(), args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=data)
