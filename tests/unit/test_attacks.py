"""PGD: constraints, strength, input-only gradients, mode and BatchNorm bookkeeping."""

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_csr.attacks import attack_mode, pgd_attack


EPS = {"Linf": 8 / 255, "L2": 0.5}


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
@pytest.mark.parametrize("start", ["uniform", "gaussian", "none"])
def test_stays_in_ball_and_box(trained_toy, norm, loss, start):
    model, x, y = trained_toy
    eps = EPS[norm]
    x_adv = pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=5, norm=norm, loss=loss, random_start=start)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert not x_adv.requires_grad


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_attack_increases_the_loss(trained_toy, norm, loss):
    model, x, y = trained_toy
    eps = EPS[norm] * 4
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        clean_acc = (model(x).argmax(1) == y).float().mean()
    x_adv = pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=10, norm=norm, loss=loss)
    with torch.no_grad():
        adv = F.cross_entropy(model(x_adv), y)
        adv_acc = (model(x_adv).argmax(1) == y).float().mean()
    assert clean_acc > 0.9
    assert float(adv) > float(clean) and float(adv_acc) < float(clean_acc)


def test_kl_attack_moves_the_output_distribution(trained_toy):
    model, x, y = trained_toy
    x_adv = pgd_attack(model, x, y, eps=16 / 255, step_size=4 / 255, steps=10, loss="kl", random_start="gaussian")
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        start = x + 0.001 * torch.randn_like(x)
        kl_start = F.kl_div(F.log_softmax(model(start.clamp(0, 1)), 1), p, reduction="sum")
        kl_adv = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="sum")
    assert float(kl_adv) > 10 * float(kl_start)


def test_gradients_are_taken_with_respect_to_the_input_only(trained_toy):
    model, x, y = trained_toy
    model = copy.deepcopy(model)
    calls = []
    handles = [p.register_hook(lambda g: calls.append(1)) for p in model.parameters()]
    marker = {name: torch.full_like(p, 7.0) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = marker[name].clone()
    pgd_attack(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3)
    for h in handles:
        h.remove()
    assert calls == [], "a parameter gradient was computed during the attack"
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, marker[name])


@pytest.mark.parametrize("bn_mode", ["eval", "train", "train_update"])
@pytest.mark.parametrize("start_training", [True, False])
def test_modes_and_running_statistics(toy_data, toy_net, bn_mode, start_training):
    torch.manual_seed(1)
    model = toy_net()
    x, y = toy_data(32)
    model.train(start_training)
    model.head.eval()  # a mixed state must be restored module by module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    pgd_attack(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3, bn_mode=bn_mode)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert model.bn.track_running_stats
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if bn_mode == "train_update":
        assert set(changed) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
        assert int(after["bn.num_batches_tracked"]) == int(before["bn.num_batches_tracked"]) + 3
    else:
        assert changed == []


def test_train_mode_uses_batch_statistics(toy_data, toy_net):
    torch.manual_seed(2)
    model = toy_net()
    x, _ = toy_data(16)
    model.bn.running_mean.fill_(5.0)  # far from the batch statistics
    with attack_mode(model, "train"):
        assert model.training and not model.bn.track_running_stats
        out_train = model(x)
    with attack_mode(model, "eval"):
        out_eval = model(x)
    assert not torch.allclose(out_train, out_eval)
    assert torch.equal(model.bn.running_mean, torch.full((8,), 5.0))


def test_bf16_autocast_on_cpu(trained_toy):
    model, x, y = trained_toy
    eps = 16 / 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=5)
    assert x_adv.dtype == torch.float32
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    with torch.no_grad():
        assert float(F.cross_entropy(model(x_adv), y)) > float(F.cross_entropy(model(x), y))


def test_seeded_generator_is_reproducible(trained_toy):
    model, x, y = trained_toy
    runs = [
        pgd_attack(model, x, y, eps=8 / 255, step_size=2 / 255, steps=2, generator=torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_bad_attack_arguments(trained_toy):
    model, x, y = trained_toy
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        pgd_attack(model, (x - 0.5) / 0.25, y, eps=0.03, step_size=0.01, steps=1)
    with pytest.raises(ValueError, match="norm must be one of"):
        pgd_attack(model, x, y, eps=0.03, step_size=0.01, steps=1, norm="L1")
    with pytest.raises(ValueError, match="eps must be a finite budget > 0"):
        pgd_attack(model, x, y, eps=0.0, step_size=0.01, steps=1)
    with pytest.raises(ValueError, match="bn_mode must be one of"):
        pgd_attack(model, x, y, eps=0.03, step_size=0.01, steps=1, bn_mode="frozen")
    with pytest.raises(ValueError, match="floating-point"):
        pgd_attack(model, (x * 255).to(torch.uint8), y, eps=0.03, step_size=0.01, steps=1)
