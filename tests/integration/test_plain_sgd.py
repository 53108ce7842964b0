"""No silent gradient clipping: a training step is plain SGD, as in every original (docs/method.md section 8)."""

import pytest
import torch
import torch.nn.functional as F

from hf_csr import CSRTrainer, CSRTrainingArguments
from hf_csr.attacks import pgd_attack


def test_max_grad_norm_defaults_to_off_and_can_be_set(tmp_path):
    assert CSRTrainingArguments(output_dir=str(tmp_path)).max_grad_norm == 0.0
    assert CSRTrainingArguments(output_dir=str(tmp_path), max_grad_norm=1.0).max_grad_norm == 1.0


@pytest.fixture
def _scaled_model(fmnist_model):
    def _scaled_model():
        """A tiny model whose classifier is scaled up, so that the first adversarial step's gradient norm is
        far above 1 (as for a full-width network, e.g. about 4.7 for PreAct-ResNet18 under PGD-AT)."""
        torch.manual_seed(0)
        model = fmnist_model("test_tiny_convnet", width=16)
        with torch.no_grad():
            model.backbone.fc.weight.mul_(30.0)
        return model
    return _scaled_model


@pytest.fixture
def _trainer_step(make_args):
    def _trainer_step(tmp_path, model, data, **overrides):
        args = make_args(tmp_path, max_steps=1, fairness_method="none", augment=False, save_strategy="no",
                         weight_decay=0.0, optim_args="", learning_rate=0.01, logging_steps=1, **overrides)
        trainer = CSRTrainer(model=model, args=args, train_dataset=data)
        order = list(iter(trainer.get_train_dataloader().batch_sampler))[0]
        trainer.state.global_step, trainer._micro_step = 0, 0
        x, y = data.tensors()
        x, y = x[order], y[order]
        noise = trainer._attack_noise(x, 8 / 255)
        trainer.train()
        return trainer, x, y, noise
    return _trainer_step


def test_a_large_gradient_step_is_a_plain_sgd_update(_scaled_model, _trainer_step, assert_same_weights, fmnist, weights, tmp_path):
    data = fmnist(limit=16)
    model = _scaled_model()
    reference = _scaled_model()
    trainer, x, y, noise = _trainer_step(tmp_path / "default", model, data)
    # The same step written out by hand: PGD-AT, plain SGD, no clipping.
    x_adv = pgd_attack(reference, x, y, eps=8 / 255, step_size=2 / 255, steps=2, loss="ce", noise=noise)
    reference.train()
    loss = F.cross_entropy(reference(x_adv).logits, y)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference.parameters())).item()
    assert grad_norm > 5.0, f"the test needs a gradient norm well above 1; got {grad_norm}"
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.01 * p.grad
    assert_same_weights(weights(trainer), reference.state_dict(), atol=1e-6)
    logged = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert logged and logged[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)

    # Clipping is still there for whoever asks for it, and then the step differs from plain SGD.
    clipped, *_ = _trainer_step(tmp_path / "clipped", _scaled_model(), data, max_grad_norm=1.0)
    differences = [(a - b).abs().max().item() for a, b in zip(weights(clipped).values(), reference.state_dict().values())]
    assert max(differences) > 1e-3


def _smooth_cross_entropy(logits, y, smoothing):
    """DM-Improves-AT's label-smoothed cross-entropy: (1 - s) * NLL + s * mean over classes of -log p."""
    log_p = F.log_softmax(logits, dim=1)
    nll = -log_p.gather(1, y[:, None]).squeeze(1)
    return ((1 - smoothing) * nll + smoothing * (-log_p.mean(dim=1))).mean()


@pytest.mark.parametrize("base_loss", ["trades", "pgd"])
def test_label_smoothing_applies_to_the_cross_entropy_term_only(_trainer_step, assert_same_weights, fmnist, fmnist_model, weights, tmp_path, base_loss):
    """DM-Improves-AT trained its checkpoints with --ls 0.1: TRADES' natural CE is smoothed, its KL is not."""
    data = fmnist(limit=16)
    torch.manual_seed(0)
    model = fmnist_model("test_tiny_convnet")
    reference = fmnist_model("test_tiny_convnet")
    reference.load_state_dict(model.state_dict())
    trainer, x, y, noise = _trainer_step(tmp_path, model, data, base_loss=base_loss, label_smoothing_factor=0.1,
                                         trades_beta=5.0)
    loss_name = "kl" if base_loss == "trades" else "ce"
    x_adv = pgd_attack(reference, x, y, eps=8 / 255, step_size=2 / 255, steps=2, loss=loss_name, noise=noise)
    reference.train()
    if base_loss == "trades":
        nat, adv = reference(x).logits, reference(x_adv).logits
        kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="batchmean")
        loss = _smooth_cross_entropy(nat, y, 0.1) + 5.0 * kl
    else:
        loss = _smooth_cross_entropy(reference(x_adv).logits, y, 0.1)
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.01 * p.grad
    assert_same_weights(weights(trainer), reference.state_dict(), atol=1e-6)
