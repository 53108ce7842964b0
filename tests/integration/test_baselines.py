"""Fairness baselines in the trainer: zero strength = the base method, the loss and budgets each method
makes the trainer use (against the originals' formulas, re-implemented in tests/unit/test_baselines_faithful.py),
the epoch updates wired to the validation statistics, held-out splits, checkpoints, the command line, and
2-process runs equal to 1-process runs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_csr import CSRTrainer, CSRTrainingArguments
from hf_csr.data import RobustImageCollator
from hf_csr.fairness import FAIRNESS_REGISTRY, available_fairness_methods, get_fairness_method, rules
from hf_csr.fairness.common import ClassStatistics


REPO = Path(__file__).resolve().parents[2]


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=20, per_device_eval_batch_size=40,
        learning_rate=0.05, attack_steps=2, logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=0, augment=False,
    )
    settings.update(overrides)
    return CSRTrainingArguments(**settings)


@pytest.fixture
def make_trainer(fmnist, fmnist_model):
    def make_trainer(tmp_path, limit=20, validation=None, **overrides):
        torch.manual_seed(0)
        return CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=make_args(tmp_path, **overrides),
                          train_dataset=fmnist(limit=limit), fairness_validation_dataset=validation)
    return make_trainer


@pytest.fixture
def one_step(make_trainer):
    def one_step(tmp_path, steps=1, validation=None, **overrides):
        # 20 examples, 2 per class: the single batch is class-balanced.
        trainer = make_trainer(tmp_path, validation=validation, max_steps=steps, **overrides)
        trainer.train()
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer
    return one_step


def test_registry_and_config_choices():
    assert {"none", "csr", "frl", "faal", "cfa", "wat"} <= set(available_fairness_methods())
    assert all(get_fairness_method(name).name == name for name in ("frl", "faal", "cfa", "wat"))
    assert {"frl", "faal", "cfa", "wat"} <= set(FAIRNESS_REGISTRY)
    with pytest.raises(ValueError, match="fairness_method must be one of"):
        CSRTrainingArguments(output_dir="x", fairness_method="fair")
    with pytest.raises(ValueError, match="faal_rho must be a finite number >= 0"):
        CSRTrainingArguments(output_dir="x", fairness_method="faal", faal_rho=-1.0)
    with pytest.raises(ValueError, match=r"cfa_fawa_decay must lie in \[0, 1\)"):
        CSRTrainingArguments(output_dir="x", fairness_method="cfa", cfa_fawa_decay=1.0)
    with pytest.raises(ValueError, match="frl_limit"):
        CSRTrainingArguments(output_dir="x", fairness_method="frl", frl_limit=1.5)


def test_defaults_are_the_originals():
    frl = CSRTrainingArguments(output_dir="x", fairness_method="frl").fairness_config
    assert (frl.tau, frl.rw_rate, frl.rm_rate, frl.limit, frl.rate_halving, frl.val_attack_steps) == (0.07, 0.05, 0.2, 0.5, 40, 20)
    assert frl.taus == (0.07, 0.07)
    faal = CSRTrainingArguments(output_dir="x", fairness_method="faal").fairness_config
    assert faal.rho == 0.5
    cfa = CSRTrainingArguments(output_dir="x", fairness_method="cfa").fairness_config
    assert (cfa.eps_lambda, cfa.beta_lambda, cfa.begin, cfa.fawa_decay, cfa.fawa_threshold) == (0.5, 0.5, 10, 0.88, 0.24)
    wat = CSRTrainingArguments(output_dir="x", fairness_method="wat").fairness_config
    assert wat.eta == 0.1 and wat.normalize_loss is False


ZERO = {
    "frl": dict(frl_rw_rate=0.0, frl_rm_rate=0.0),
    "faal": dict(faal_rho=0.0),
    "cfa": dict(cfa_ccm=False, cfa_ccr=False, cfa_fawa=False),
    "wat": dict(wat_eta=0.0, wat_normalize_loss=True),
}
STRONG = {
    "frl": dict(frl_rw_rate=5.0, frl_rm_rate=5.0, frl_tau=0.0),
    "faal": dict(faal_rho=0.5),
    "cfa": dict(cfa_fawa=False, cfa_begin=0),
    "wat": dict(wat_eta=5.0),
}


@pytest.mark.parametrize("base_loss", ["pgd", "trades"])
@pytest.mark.parametrize("method", ["frl", "faal", "cfa", "wat"])
def test_zero_strength_is_exactly_the_base_update(one_step, tmp_path, method, base_loss):
    base, _ = one_step(tmp_path / "base", base_loss=base_loss, fairness_method="none")
    zero, trainer = one_step(tmp_path / "zero", base_loss=base_loss, fairness_method=method, **ZERO[method])
    assert len(trainer.train_dataset) == 20  # nothing held out when the method is off
    for key in base:
        assert torch.equal(base[key], zero[key]), key


@pytest.mark.parametrize("method", ["frl", "faal", "wat"])
def test_nonzero_strength_changes_the_update(one_step, fmnist, tmp_path, method):
    validation = fmnist("test", limit=100)  # a given split: the training set stays whole, as the base run's
    base, _ = one_step(tmp_path / "base", base_loss="trades", fairness_method="none")
    strong, _ = one_step(tmp_path / "strong", validation=validation, base_loss="trades", fairness_method=method,
                         **STRONG[method])
    assert any(not torch.equal(base[k], strong[k]) for k in base)


def test_wat_at_default_scale_trains_epoch_zero_with_twice_the_loss(make_trainer, tmp_path):
    """The original's epoch 0: all K + 1 weights 1, each example weighs 2 (w_y + w_avg)."""
    trainer = make_trainer(tmp_path, limit=40, base_loss="trades", fairness_method="wat", fairness_val_size=20)
    assert len(trainer.train_dataset) == 20
    weights = trainer.fairness.example_weights(torch.arange(10), torch.ones(10))
    assert torch.equal(weights, torch.full((10,), 2.0))


# ------------------------------------------------------------------ the loss each method makes the trainer use
def _batch(trainer, n=20):
    data = trainer.train_dataset
    batch = RobustImageCollator(augment=False)([data[i] for i in range(n)])
    return {"pixel_values": batch["pixel_values"].float() / 255.0, "labels": batch["labels"]}


def _trainer_loss(trainer):
    """(the trainer's loss on one batch, adversarial logits, clean logits, labels)."""
    batch = _batch(trainer)
    model = trainer.model
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    with torch.no_grad():
        logits_nat = model(pixel_values=batch["pixel_values"]).logits.double()
    return loss.detach().double(), outputs["logits"].detach().double(), logits_nat, batch["labels"]


def _trades_parts(logits_nat, logits_adv, y):
    ce = F.cross_entropy(logits_nat, y, reduction="none")
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="none").sum(1)
    return ce, kl


def test_frl_loss_and_budgets_in_the_trainer_follow_utils_frl2(originals, make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, limit=40, base_loss="trades", fairness_method="frl", fairness_val_size=20, trades_beta=1.5)
    frl = trainer.fairness
    lam = torch.linspace(0, 0.1, 30, dtype=torch.float64).flip(0)
    frl.multipliers = torch.stack([lam[0:10], lam[10:20], 3 * lam[20:30] - 0.2])
    loss, adv, nat, y = _trainer_loss(trainer)
    diff0, diff1, diff2 = originals.cost_sensitive(frl.multipliers[0], frl.multipliers[1], frl.multipliers[2])
    ce, kl = _trades_parts(nat, adv, y)
    w0, w1 = diff0[y], diff1[y]
    expected = (ce * w0).sum() / w0.sum() + 1.5 * (kl * w1).sum() / w1.sum()  # train_model
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # trades_adv: budget eps * diff2[y]; step max(budget) / 4 (here: the largest class budget; all classes present)
    eps = frl.attack_budget(y)
    assert torch.allclose(eps.double(), 8 / 255 * diff2[y], rtol=1e-6)
    assert frl.attack_step_size(y, eps) == pytest.approx(float((8 / 255 * diff2[y]).max()) / 4, rel=1e-6)


def test_frl_epoch_update_in_the_trainer_follows_frl_train(originals, make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, limit=40, base_loss="trades", fairness_method="frl", fairness_val_size=20)
    frl = trainer.fairness
    clean = torch.linspace(0.05, 0.5, 10, dtype=torch.float64)
    bndy = torch.linspace(0.4, 0.1, 10, dtype=torch.float64)
    counts = torch.tensor([2.0] * 5 + [4.0] * 5, dtype=torch.float64)  # unequal: totals are over images
    seen = {}

    def fake_statistics(images, labels, *, tag, **attack):
        seen.update(attack, tag=tag, n=len(labels))
        return ClassStatistics(clean, clean, bndy, clean, counts)

    monkeypatch.setattr(trainer.fairness_context, "class_statistics", fake_statistics)
    theirs = torch.zeros(30, dtype=torch.float64)
    for epoch in (0, 1):
        frl.on_epoch_begin(epoch)
        total_clean = float((clean * counts).sum() / counts.sum())
        total_bndy = float((bndy * counts).sum() / counts.sum())
        theirs = originals.frl_epoch(theirs, clean, bndy, total_clean, total_bndy, 0.07 * torch.ones(10, dtype=torch.float64),
                                      0.07 * torch.ones(10, dtype=torch.float64), 0.05, 0.2, 0.5)
        assert torch.allclose(frl.multipliers.flatten(), theirs, atol=1e-12)
    assert seen["steps"] == 20 and seen["tag"] == ("frl", 1) and seen["n"] == 20  # PGD-20 on the held-out split


@pytest.mark.parametrize("seed", [0, 1])
def test_faal_loss_in_the_trainer_follows_ft_prn(originals, make_trainer, tmp_path, seed):
    trainer = make_trainer(tmp_path, base_loss="pgd", fairness_method="faal", faal_rho=0.5, seed=seed)
    loss, adv, _, y = _trainer_loss(trainer)
    class_margin = originals.class_margin(adv, y)
    weights = originals.solve_weight(y, class_margin, 0.5)
    expected = (F.cross_entropy(adv, y, reduction="none") * weights[y]).sum() * 10 / len(y)
    assert float(loss) == pytest.approx(float(expected), rel=1e-3)
    assert not torch.allclose(weights, torch.full((10,), 0.1, dtype=torch.float64), atol=1e-3)  # not uniform


@pytest.mark.parametrize("epoch", [0, 1])
def test_cfa_loss_and_budgets_in_the_trainer_follow_train_py(originals, make_trainer, tmp_path, epoch):
    trainer = make_trainer(tmp_path, base_loss="trades", fairness_method="cfa", cfa_begin=1, cfa_fawa=False)
    cfa = trainer.fairness
    cfa.train_accuracy = torch.linspace(0.1, 0.9, 10, dtype=torch.float64)
    cfa._epoch = epoch
    loss, adv, nat, y = _trainer_loss(trainer)
    class_eps, class_beta = originals.cfa_epoch_settings(epoch, 1, cfa.train_accuracy, 8 / 255, 6.0, 0.5, 0.5, ccr=True)
    expected = originals.cw_trades_loss_value(nat, adv, y, class_beta)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    eps = cfa.attack_budget(y)
    if epoch < 1:
        assert eps is None and cfa.attack_step_size(y, 8 / 255) is None  # warm-up: nominal eps and step
    else:
        assert torch.allclose(eps.double(), class_eps[y], rtol=1e-6)
        assert cfa.attack_step_size(y, eps) == pytest.approx(2 / 255)  # fixed step whatever eps_c


def test_the_trainer_attacks_with_the_methods_budget_and_step(make_trainer, tmp_path, monkeypatch):
    """CFA's calibrated budgets reach the training attack with the fixed step (the attack_step_size hook)."""
    trainer = make_trainer(tmp_path, base_loss="trades", fairness_method="cfa", cfa_begin=0, cfa_fawa=False)
    cfa = trainer.fairness
    cfa.train_accuracy = torch.linspace(0.1, 0.9, 10, dtype=torch.float64)
    seen = {}
    attack = trainer._attack

    def spy(model, x, y, **settings):
        seen.update(settings)
        return attack(model, x, y, **settings)

    monkeypatch.setattr(trainer, "_attack", spy)
    _, _, _, y = _trainer_loss(trainer)
    assert seen["step_size"] == pytest.approx(2 / 255)
    assert torch.allclose(seen["eps"].double(), ((0.5 + cfa.train_accuracy) * 8 / 255)[y], rtol=1e-6)


def test_cfa_fawa_in_the_trainer_follows_train_py(originals, make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, limit=40, base_loss="trades", fairness_method="cfa", fairness_val_size=20)
    cfa = trainer.fairness
    worst = iter([0.1, 0.3, 0.5])

    def fake_statistics(images, labels, *, tag, **attack):
        w = next(worst)
        error = torch.full((10,), 1 - w - 0.1, dtype=torch.float64)
        error[3] = 1 - w
        return ClassStatistics(error, error, error, error, torch.full((10,), 2.0, dtype=torch.float64))

    monkeypatch.setattr(trainer.fairness_context, "class_statistics", fake_statistics)
    model = trainer.model
    theirs, seat_init = None, False
    for epoch in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (epoch + 1))
        state = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
        cfa.on_epoch_end(epoch)
        w = [0.1, 0.3, 0.5][epoch]
        if w >= 0.24:
            theirs = originals.weight_average(theirs if seat_init else state, state, 0.88, not seat_init)
            seat_init = True
    assert cfa.averaged_epochs == 2
    for key, value in theirs.items():
        assert torch.allclose(cfa.average[key].double(), value, atol=1e-6), key


def test_wat_loss_and_costs_in_the_trainer_follow_the_original(originals, make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, limit=40, base_loss="trades", fairness_method="wat", fairness_val_size=20)
    wat = trainer.fairness
    loss, adv, nat, y = _trainer_loss(trainer)  # epoch 0: all ones
    ones = torch.ones(11, dtype=torch.float64)
    assert float(loss) == pytest.approx(float(originals.wat_train_loss(adv, nat, y, ones, 6.0, 10)), rel=1e-5)
    sums = torch.linspace(1.0, 3.0, 10, dtype=torch.float64)
    counts = torch.full((10,), 2.0, dtype=torch.float64)
    seen = {}

    def fake_statistics(images, labels, *, tag, **attack):
        seen.update(attack)
        return ClassStatistics(sums, sums, sums, sums, counts, trades_loss=sums / counts)

    monkeypatch.setattr(trainer.fairness_context, "class_statistics", fake_statistics)
    wat.on_epoch_begin(1)
    wat.on_epoch_begin(2)
    assert seen["attack_loss"] == "kl" and seen["random_start"] == "gaussian"  # the TRADES attack
    costs = torch.cat([10 * sums / 20, sums.sum().reshape(1) / 20])  # cost_c = K S_c / M, cost_avg = S / M
    factor = (2 * costs * 0.1).exp()
    theirs = 10 * factor / factor.sum()
    assert torch.allclose(wat.weights, theirs, atol=1e-12)
    loss, adv, nat, y = _trainer_loss(trainer)
    assert float(loss) == pytest.approx(float(originals.wat_train_loss(adv, nat, y, theirs, 6.0, 10)), rel=1e-5)


# ------------------------------------------------------------------ held-out validation splits
@pytest.mark.parametrize("method,per_class", [("frl", 3), ("cfa", 1), ("wat", 2)])
def test_validation_is_held_out_of_the_training_set(make_trainer, fmnist, tmp_path, method, per_class):
    full = fmnist(limit=60)
    trainer = make_trainer(tmp_path, limit=60, base_loss="trades", fairness_method=method, fairness_val_size=10 * per_class)
    images, labels = trainer.fairness._validation
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), per_class))
    assert len(trainer.train_dataset) == 60 - 10 * per_class
    train_images = trainer.train_dataset.tensors()[0].flatten(1)
    held = images.flatten(1)
    # no held-out image is trained on; every image is in exactly one of the two
    matches = (held[:, None, :] == train_images[None, :, :]).all(-1)
    assert not bool(matches.any())
    assert len(full) == len(trainer.train_dataset) + len(labels)


def test_original_per_class_counts_need_enough_images(make_trainer, tmp_path):
    with pytest.raises(ValueError, match="leaves no training images"):
        make_trainer(tmp_path, limit=40, base_loss="trades", fairness_method="frl")  # 300 per class by default


# ------------------------------------------------------------------ pure rules through the method objects
def test_frl_update_raises_weight_and_budget_of_the_worst_class(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, limit=40, fairness_method="frl", base_loss="trades", fairness_val_size=20,
                           frl_rw_rate=1.0, frl_rm_rate=1.0)
    frl = trainer.fairness
    bad = torch.tensor([0.1] * 9 + [0.9], dtype=torch.float64)
    frl.update_multipliers(ClassStatistics(bad, bad, bad, bad, torch.full((10,), 2.0)), epoch=0)
    labels = torch.arange(10)
    weights = frl.example_weights(labels, torch.ones(10))
    eps = frl.attack_budget(labels)
    assert weights[9] > 1 and torch.allclose(weights[:9], weights[0].expand(9)) and weights[0] < 1
    assert eps[9] > 8 / 255 and bool((eps[:9] < 8 / 255).all())  # the others shrink to the 0.98 floor
    assert torch.allclose(eps[:9], torch.full((9,), 0.98 * 8 / 255))


def test_cfa_budgets_grow_with_training_accuracy():
    eps = rules.cfa_class_eps(torch.tensor([0.1, 0.9], dtype=torch.float64), 1.0, 0.5)
    assert eps[1] > eps[0] and float(eps[0]) == pytest.approx(0.6) and float(eps[1]) == pytest.approx(1.4)


def test_wat_weights_favour_the_larger_cumulative_cost():
    w = rules.wat_class_weights(torch.tensor([1.0, 2.0, 4.0, 0.5]), 1.0, 3)
    assert torch.all(w[1:3] > w[0:2]) and abs(float(w.sum()) - 3) < 1e-12


@pytest.mark.parametrize("method", ["frl", "wat", "cfa"])
def test_epoch_methods_run_and_checkpoint(make_trainer, tmp_path, method):
    extra = {"cfa": dict(cfa_begin=1, cfa_fawa_threshold=0.0)}.get(method, {})
    trainer = make_trainer(tmp_path, limit=40, max_steps=-1, num_train_epochs=2, fairness_method=method, base_loss="trades",
                           per_device_train_batch_size=10, save_strategy="epoch", fairness_val_size=20, **extra)
    trainer.train()
    state = torch.load(tmp_path / "out" / "checkpoint-4" / "csr_state.pt", weights_only=True)
    assert state["fairness"]["name"] == method
    if method in ("frl", "wat"):
        assert trainer.fairness.updated_epoch == 1
    else:
        cfa = trainer.fairness
        assert cfa.train_accuracy is not None and cfa.averaged_epochs == 2
        for key, value in trainer.model.state_dict().items():  # the model holds the average
            assert torch.equal(value, cfa.average[key].to(value.dtype))


def test_selectable_from_the_command_line():
    from hf_csr.experiment import parse_args

    _, training = parse_args(["--fairness_method", "cfa", "--base_loss", "trades", "--cfa_fawa", "false",
                              "--cfa_eps_lambda", "0.3", "--output_dir", "x"])
    assert training.fairness_method == "cfa"
    assert training.fairness_config.fawa is False and training.fairness_config.eps_lambda == 0.3
    # the paper's FRL configurations are one flag away
    _, training = parse_args(["--fairness_method", "frl", "--frl_tau", "0.05", "--output_dir", "x"])
    assert training.fairness_config.taus == (0.05, 0.05)
    with pytest.raises(ValueError, match="frl_limit"):
        parse_args(["--fairness_method", "frl", "--frl_limit", "1.5", "--output_dir", "x"])


# ------------------------------------------------------------------ data parallelism
@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("method", ["frl", "faal", "cfa", "wat"])
def test_two_processes_equal_one_process(tmp_path, method, run_ddp_workers):
    one, two = (run_ddp_workers(tmp_path / str(n), n, batch, ["--method", method], worker="ddp_fairness_worker.py", timeout=1200)
                for n, batch in ((1, 32), (2, 16)))
    assert set(one) == set(two)
    method_keys = [k for k in one if k.startswith("method.")]
    assert method_keys or method == "faal"
    for key in one:
        a, b = one[key], two[key]
        if a.is_floating_point():
            assert torch.allclose(a.double(), b.double(), atol=1e-5), key
        else:
            assert torch.equal(a, b), key
