"""Fairness baselines (hf_csr.fairness): zero strength = the base method, FAAL's closed form, FRL's
multipliers, CFA's budgets, training end to end with each method."""

import math

import pytest
import torch

from hf_csr import CSRTrainer, CSRTrainingArguments
from hf_csr.fairness import available_fairness_methods, get_fairness_method
from hf_csr.fairness import calibrated_budgets, frl_multiplier_update, hedge_weights, kl_ball_worst_case
from hf_csr.fairness.common import ClassStatistics

from .helpers import fmnist, fmnist_model


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=20, per_device_eval_batch_size=40,
        learning_rate=0.05, attack_steps=2, logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=0, augment=False,
    )
    if overrides.get("fairness_method") in ("frl", "wat", "cfa"):
        settings["fairness_val_size"] = 20
    settings.update(overrides)
    return CSRTrainingArguments(**settings)


def one_step(tmp_path, steps=1, **overrides):
    torch.manual_seed(0)
    model = fmnist_model("test_tiny_convnet")
    # 20 examples, 2 per class: the single batch is class-balanced (FAAL's rho = 0 is then exactly uniform).
    trainer = CSRTrainer(model=model, args=make_args(tmp_path, max_steps=steps, **overrides), train_dataset=fmnist(limit=20))
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer


def test_registry_and_config_choices():
    assert {"none", "csr", "frl", "faal", "cfa", "wat"} <= set(available_fairness_methods())
    assert all(get_fairness_method(name).name == name for name in ("frl", "faal", "cfa", "wat"))
    with pytest.raises(ValueError, match="fairness_method must be one of"):
        CSRTrainingArguments(output_dir="x", fairness_method="fair")
    with pytest.raises(ValueError, match="faal_rho must be a finite number >= 0"):
        CSRTrainingArguments(output_dir="x", fairness_method="faal", faal_rho=-1.0)
    with pytest.raises(ValueError, match=r"cfa_fawa_decay must lie in \[0, 1\)"):
        CSRTrainingArguments(output_dir="x", fairness_method="cfa", cfa_fawa_decay=1.0)


ZERO = {
    "frl": dict(frl_rw_rate=0.0, frl_rm_rate=0.0),
    "faal": dict(faal_rho=0.0),
    "cfa": dict(cfa_ccm=False, cfa_ccr=False, cfa_fawa=False),
    "wat": dict(wat_eta=0.0),
}
STRONG = {
    "frl": dict(frl_rw_rate=5.0, frl_rm_rate=5.0, frl_tau_clean=0.0, frl_tau_boundary=0.0),
    "faal": dict(faal_rho=0.5),
    "cfa": dict(cfa_fawa=False),
    "wat": dict(wat_eta=5.0),
}


@pytest.mark.parametrize("base_loss", ["pgd", "trades"])
@pytest.mark.parametrize("method", ["frl", "faal", "cfa", "wat"])
def test_zero_strength_is_exactly_the_base_update(tmp_path, method, base_loss):
    base, _ = one_step(tmp_path / "base", base_loss=base_loss, fairness_method="none")
    zero, _ = one_step(tmp_path / "zero", base_loss=base_loss, fairness_method=method, **ZERO[method])
    for key in base:
        assert torch.equal(base[key], zero[key]), key


@pytest.mark.parametrize("method", ["frl", "faal", "wat"])
def test_nonzero_strength_changes_the_update(tmp_path, method):
    base, _ = one_step(tmp_path / "base", base_loss="trades", fairness_method="none")
    strong, _ = one_step(tmp_path / "strong", base_loss="trades", fairness_method=method, **STRONG[method])
    assert any(not torch.equal(base[k], strong[k]) for k in base)


def test_cfa_trains_with_awp_and_averages(tmp_path):
    torch.manual_seed(0)
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=2, base_loss="trades", fairness_method="cfa",
                     cfa_fawa_threshold=0.0, awp_gamma=0.005, per_device_train_batch_size=10)
    trainer = CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=args, train_dataset=fmnist(limit=20))
    trainer.train()
    cfa = trainer.fairness
    assert cfa.train_accuracy is not None and cfa.averaged_epochs == 2
    eps = cfa.attack_budget(torch.arange(10))
    assert torch.all(eps >= 0.5 * 8 / 255 - 1e-9) and torch.all(eps <= 1.5 * 8 / 255 + 1e-9)
    # the model holds the average: last epoch's weights folded in with decay 0.85
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, cfa.average[key].to(value.dtype))
    state = cfa.state_dict()
    assert "average" in state and state["averaged_epochs"] == 2


def test_cfa_budgets_stay_within_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        accuracy = torch.rand(10, generator=g, dtype=torch.float64) * 1.4 - 0.2  # even out-of-range inputs
        for lam in (0.0, 0.3, 0.5, 1.0):
            eps = calibrated_budgets(accuracy, 8 / 255, lam)
            assert torch.all(eps >= lam * 8 / 255) and torch.all(eps <= (lam + 1) * 8 / 255 + 1e-15)
            capped = calibrated_budgets(accuracy, 8 / 255, lam, max_factor=1.2)
            assert torch.all(capped <= 1.2 * 8 / 255 + 1e-15)
    # higher training accuracy -> larger budget (the paper's calibration direction)
    eps = calibrated_budgets(torch.tensor([0.1, 0.9]), 1.0, 0.5)
    assert eps[1] > eps[0]


def _brute_force(losses, rho, grid=400):
    """Max of q . losses over a grid of the 3-simplex (step 1/grid) inside the KL ball, vectorised."""
    i, j = torch.meshgrid(torch.arange(grid + 1), torch.arange(grid + 1), indexing="ij")
    keep = (i + j) <= grid
    q = torch.stack([i[keep], j[keep], grid - i[keep] - j[keep]], dim=1).double() / grid
    kl = torch.where(q > 0, q * (q * 3).log(), torch.zeros_like(q)).sum(dim=1)
    values = torch.where(kl <= rho, q @ losses, torch.full_like(kl, -math.inf))
    best = int(values.argmax())
    return float(values[best]), q[best]


@pytest.mark.parametrize("losses,rho", [([1.0, 2.0, 0.5], 0.05), ([0.3, 0.31, 2.0], 0.2), ([1.0, 1.5, 3.0], 0.6),
                                        ([1.0, 1.0, 1.0], 0.3), ([0.0, 1.0, 2.0], 5.0)])
def test_faal_closed_form_matches_brute_force(losses, rho):
    losses = torch.tensor(losses, dtype=torch.float64)
    q = kl_ball_worst_case(losses, rho)
    assert abs(float(q.sum()) - 1) < 1e-12 and torch.all(q >= 0)
    positive = q > 0
    kl = float((q[positive] * (q[positive] * 3).log()).sum())
    assert kl <= rho + 1e-9
    best, best_q = _brute_force(losses, rho)
    assert float(q @ losses) >= best - 1e-9  # at least as good as every feasible grid point
    assert float(q @ losses) <= best + 0.02 * float(losses.max() - losses.min()) + 1e-9
    if len(set(losses.tolist())) == len(losses):  # unique maximiser only when the losses differ
        assert torch.allclose(q, best_q, atol=0.02)


def test_faal_zero_radius_is_uniform_and_large_radius_is_the_worst_class():
    losses = torch.tensor([0.2, 0.9, 0.4, 0.1])
    assert torch.equal(kl_ball_worst_case(losses, 0.0), torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(kl_ball_worst_case(losses, 10.0), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_frl_multipliers_move_with_the_violated_constraint():
    errors = torch.tensor([0.10, 0.20, 0.60], dtype=torch.float64)  # mean 0.3: class 2 violates by 0.3 - tau
    phi = torch.zeros(3, dtype=torch.float64)
    updated = frl_multiplier_update(phi, errors, tau=0.05, rate=0.5)
    assert updated[2] > 0 and updated[0] == 0 and updated[1] == 0
    assert math.isclose(float(updated[2]), 0.5 * (0.60 - 0.30 - 0.05))
    # a satisfied constraint shrinks its multiplier, never below 0
    again = frl_multiplier_update(torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64),
                                  torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64), tau=0.05, rate=1.0)
    assert torch.allclose(again, torch.tensor([0.0, 0.05, 0.15], dtype=torch.float64))


def test_frl_update_raises_weight_and_budget_of_the_worst_class(tmp_path):
    torch.manual_seed(0)
    args = make_args(tmp_path, fairness_method="frl", base_loss="trades", frl_rw_rate=1.0, frl_rm_rate=1.0)
    trainer = CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=args, train_dataset=fmnist(limit=20))
    frl = trainer.fairness
    bad = torch.tensor([0.1] * 9 + [0.9], dtype=torch.float64)
    frl.update_multipliers(ClassStatistics(bad, bad, bad, bad, torch.full((10,), 2.0)))
    labels = torch.arange(10)
    weights = frl.example_weights(labels, torch.ones(10))
    eps = frl.attack_budget(labels)
    beta = frl.trades_beta(labels)
    assert weights[9] > 1 and torch.all(weights[:9] == 1)
    assert eps[9] > 8 / 255 and torch.allclose(eps[:9], torch.full((9,), 8 / 255))
    assert beta[9] == pytest.approx(6.0)  # weight (1 + phi_nat) * beta_c = 6 (1 + phi_bndy)
    assert float(weights[9] * beta[9]) == pytest.approx(6.0 * (1 + float(frl.phi_bndy[9])), rel=1e-6)


def test_wat_weights_favour_the_larger_cumulative_loss():
    w = hedge_weights(torch.tensor([1.0, 2.0, 4.0]), eta=1.0)
    assert torch.all(w[1:] > w[:-1]) and abs(float(w.sum()) - 1) < 1e-12
    assert torch.equal(hedge_weights(torch.tensor([1.0, 2.0]), eta=0.0), torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("method", ["frl", "wat"])
def test_epoch_methods_run_and_checkpoint(tmp_path, method):
    torch.manual_seed(0)
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=2, fairness_method=method, per_device_train_batch_size=10,
                     save_strategy="epoch")
    trainer = CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=args, train_dataset=fmnist(limit=20))
    trainer.train()
    assert trainer.fairness.updated_epoch == 1
    state = torch.load(tmp_path / "out" / "checkpoint-4" / "csr_state.pt", weights_only=True)
    assert state["fairness"]["name"] == method


def test_selectable_from_the_command_line():
    from hf_csr.experiment import parse_args

    _, training = parse_args(["--fairness_method", "cfa", "--base_loss", "trades", "--cfa_fawa", "false",
                              "--cfa_eps_lambda", "0.3", "--output_dir", "x"])
    config = training.fairness_config
    assert training.fairness_method == "cfa" and config.fawa is False and config.eps_lambda == 0.3
    with pytest.raises(ValueError, match="frl_max_eps_factor"):
        parse_args(["--fairness_method", "frl", "--frl_max_eps_factor", "0.5", "--output_dir", "x"])
