"""Each baseline's update rule against an independent re-implementation written here from its
original's released code (loops and all, as the original is written; not from hf_csr's module).

Originals read (see docs/baselines.md):
- FRL: hannxu123/fair_robust @ a80547def881cb4ca99b50e7544f997f9a0210a7, utils_frl2.py (frl_train,
  normalize_lambda, cost_sensitive, train_model, evaluate) run by frlrmrw.py;
- FAAL: TrustAI/FAAL @ b20ee9dbe60c5ab700eaab3d41faa10e5295d39a, FAAL.py (DAW) and ft_prn.py;
- CFA: PKU-ML/CFA @ 071f3334a59d144cedbe65b18019c9757bece6f2, train.py, attack.py (cw_trades_loss),
  utils.py (weight_average);
- WAT: boqili/WAT @ 62d1184f9b88909c9e782ab8234128324235ac84, worst_class_adversarial_train.py
  (validate, train, the weight update of the main loop).
"""


import pytest
import torch
import torch.nn.functional as F

from hf_csr.fairness import rules

K = 10


def _rng(seed):
    return torch.Generator().manual_seed(seed)


# ============================================================================ FRL (utils_frl2.py)


def test_frl_multiplier_update_weights_and_budgets_follow_utils_frl2(originals):
    g = _rng(0)
    label = torch.arange(10).repeat(30)  # 30 validation images per class
    pred = torch.where(torch.rand(300, generator=g) < 0.8, label, torch.randint(0, 10, (300,), generator=g))
    pred_adv = torch.where(torch.rand(300, generator=g) < 0.5, pred, torch.randint(0, 10, (300,), generator=g))
    clean, bndy, total_clean, total_bndy = originals.evaluate_errors(pred, pred_adv, label)
    ours = torch.zeros(3, 10, dtype=torch.float64)
    theirs = torch.zeros(30, dtype=torch.float64)
    rate1, rate2, lim = 0.05, 0.2, 0.5  # frlrmrw.py defaults
    bound = False
    for epoch in range(45):  # past the halving of rate1 at the (1-based) 40th epoch
        # drift the errors so that the multipliers move and the limit binds
        shift = 0.03 * epoch * torch.linspace(-1, 1, 10, dtype=torch.float64)
        c, b = clean + shift, bndy - shift
        now_epoch = epoch + 1
        r1 = rate1 / 2 if now_epoch >= 40 else rate1  # frlrmrw.py: `if now_epoch % 40 == 0: rate1 = rate1 / 2`
        theirs = originals.frl_epoch(theirs, c, b, total_clean, total_bndy, 0.07 * torch.ones(10, dtype=torch.float64), 0.07 * torch.ones(10, dtype=torch.float64),
                                 r1, rate2, lim)
        ours = rules.frl_update_multipliers(
            ours, c, b, total_clean, total_bndy, tau_clean=0.07, tau_boundary=0.07,
            rate_reweight=rules.frl_reweight_rate(rate1, epoch), rate_remargin=rate2, limit=lim)
        assert torch.allclose(ours.flatten(), theirs, atol=1e-12), epoch
        bound = bound or abs(float(theirs[0:10].sum()) - lim) < 1e-12
    assert bound  # the limit did bind at some epoch
    diff0, diff1, diff2 = originals.cost_sensitive(theirs[0:10], theirs[10:20], theirs[20:30])
    assert torch.allclose(rules.frl_class_weights(ours[0]), diff0, atol=1e-12)
    assert torch.allclose(rules.frl_class_weights(ours[1]), diff1, atol=1e-12)
    assert torch.allclose(rules.frl_eps_factors(ours[2]), diff2, atol=1e-12)
    assert torch.equal(rules.frl_eps_factors(torch.tensor([-5.0, 0.0, 5.0], dtype=torch.float64)),
                       torch.tensor([0.98, 1.0, 3.0], dtype=torch.float64))


def test_frl_loss_follows_train_model(originals):
    g = _rng(1)
    n = 64
    target = torch.randint(0, 10, (n,), generator=g)
    logits_nat = torch.randn(n, 10, generator=g, dtype=torch.float64)
    logits_adv = logits_nat + 0.5 * torch.randn(n, 10, generator=g, dtype=torch.float64)
    lam = torch.rand(30, generator=g, dtype=torch.float64) * 0.05
    diff0, diff1, _ = originals.cost_sensitive(lam[0:10], lam[10:20], lam[20:30])
    # train_model: match_weight then the weighted, weight-normalised TRADES loss
    weight0 = torch.zeros(n, dtype=torch.float64)
    weight1 = torch.zeros(n, dtype=torch.float64)
    for i in range(10):
        weight0 += diff0[i] * (target == i).double()
        weight1 += diff1[i] * (target == i).double()
    loss_natural = F.cross_entropy(logits_nat, target, reduction="none")
    loss_bndy = torch.sum(F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="none"), 1)
    beta = 1.5
    expected = torch.sum(loss_natural * weight0) / torch.sum(weight0) + beta * torch.sum(loss_bndy * weight1) / torch.sum(weight1)
    got = rules.frl_loss(loss_natural, loss_bndy, target, rules.frl_class_weights(lam[0:10]),
                         rules.frl_class_weights(lam[10:20]), beta)
    assert float(got) == pytest.approx(float(expected), rel=1e-12)


# ============================================================================ FAAL (FAAL.py, ft_prn.py)


@pytest.mark.parametrize("seed,r,absent", [(0, 0.5, False), (1, 0.1, False), (2, 0.5, True), (3, 2.0, False)])
def test_faal_class_weights_and_loss_follow_daw(originals, seed, r, absent):
    g = _rng(seed)
    n = 48
    y = torch.randint(0, 10, (n,), generator=g)
    if absent:
        y = torch.where(y == 3, torch.full_like(y, 4), y)  # class 3 absent from the batch
    output = 3 * torch.randn(n, 10, generator=g, dtype=torch.float64)
    class_margin = originals.class_margin(output, y)
    expected = originals.solve_weight(y, class_margin, r)

    margins = rules.faal_margins(output, y)
    sums = torch.zeros(10, dtype=torch.float64).index_add_(0, y, margins.double())
    counts = torch.bincount(y, minlength=10).double()
    ours_margin = torch.where(counts > 0, sums / counts.clamp_min(1), -torch.ones(10, dtype=torch.float64))
    assert torch.allclose(ours_margin, class_margin, atol=1e-6)
    p = rules.faal_class_weights(ours_margin, counts, r)
    assert abs(float(p.sum()) - 1) < 1e-12 and rules.faal_kl_to_uniform(p) <= r + 1e-9
    # same optimum value (the solver's tolerance), same distribution
    value = lambda q: float((q[y] * class_margin[y]).sum())  # noqa: E731
    assert value(p) >= value(expected) - 1e-6
    assert torch.allclose(p, expected, atol=2e-4)
    # ft_prn.py (AT): loss = (loss_ce * weights[y]).sum() * valid_num / len(y), valid_num = 10
    loss_ce = F.cross_entropy(output, y, reduction="none")
    theirs = (loss_ce * expected[y]).sum() * 10 / len(y)
    ours = (10 * p[y] * loss_ce).mean()  # the example weights FAAL hands to the trainer: K * p[y]
    assert float(ours) == pytest.approx(float(theirs), rel=1e-3)


def test_faal_zero_radius_is_uniform_and_the_loss_is_the_mean():
    y = torch.arange(10).repeat(3)
    m = torch.linspace(-1, 1, 10, dtype=torch.float64)
    p = rules.faal_class_weights(m, torch.bincount(y, minlength=10).double(), 0.0)
    assert torch.equal(p, torch.full((10,), 0.1, dtype=torch.float64))
    assert torch.equal((10 * p)[y], torch.ones(30, dtype=torch.float64))  # weight 1: the base mean


# ============================================================================ CFA (train.py, attack.py, utils.py)


@pytest.mark.parametrize("epoch", [3, 10, 25])
def test_cfa_budgets_betas_and_loss_follow_train_py(originals, epoch):
    g = _rng(epoch)
    t = torch.rand(10, generator=g, dtype=torch.float64)  # last epoch's class-wise training robust accuracy
    eps, beta, begin = 8 / 255, 6.0, 10
    class_eps, class_beta = originals.cfa_epoch_settings(epoch, begin, t, eps, beta, 0.5, 0.5, ccr=True)
    warm = epoch < begin
    ours_eps = torch.full((10,), eps, dtype=torch.float64) if warm else rules.cfa_class_eps(t, eps, 0.5)
    ours_b = rules.cfa_class_beta(t, beta, None if warm else 0.5)
    assert torch.allclose(ours_eps, class_eps, atol=1e-15)
    assert torch.allclose(ours_b / (1 + ours_b), class_beta, atol=1e-15)
    n = 40
    y = torch.randint(0, 10, (n,), generator=g)
    nat = torch.randn(n, 10, generator=g, dtype=torch.float64)
    adv = nat + torch.randn(n, 10, generator=g, dtype=torch.float64)
    ce = F.cross_entropy(nat, y, reduction="none")
    kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(nat, dim=1), reduction="none").sum(1)
    expected = originals.cw_trades_loss_value(nat, adv, y, class_beta)
    assert float(rules.cfa_trades_loss(ce, kl, y, ours_b)) == pytest.approx(float(expected), rel=1e-12)
    # the same loss as the trainer composes it from CFA's hooks: mean(w * (CE + beta_i KL)), w = 1/(1+b), beta_i = b
    b = ours_b[y]
    assert float((1 / (1 + b) * (ce + b * kl)).mean()) == pytest.approx(float(expected), rel=1e-12)


def test_cfa_fawa_follows_weight_average(originals):
    g = _rng(5)
    init_state = {"w": torch.randn(4, generator=g, dtype=torch.float64)}
    theirs, seat_init = dict(init_state), False  # FAWA_model starts as a fresh model in train.py
    ours = None
    decay, threshold = 0.88, 0.24
    for epoch, worst in enumerate([0.1, 0.3, 0.2, 0.5, 0.24]):
        state = {"w": torch.randn(4, generator=g, dtype=torch.float64)}
        if worst >= threshold:
            theirs = originals.weight_average(theirs, state, decay, not seat_init)
            seat_init = True
        else:
            theirs = originals.weight_average(theirs, state, 1.0, False)
        ours, _ = rules.cfa_fawa_update(ours, state, decay, worst, threshold)
        if seat_init:
            assert torch.allclose(ours["w"], theirs["w"], atol=1e-15), epoch
        else:
            assert ours is None


# ============================================================================ WAT (worst_class_adversarial_train.py)


def test_wat_costs_hedge_weights_and_loss_follow_the_original(originals):
    g = _rng(7)
    beta, eta, batch = 6.0, 0.1, 25
    costs = torch.zeros(4, K + 1, dtype=torch.float64)
    ours_cum = None
    theirs_w = torch.ones(K + 1, dtype=torch.float64)  # nat_class_weights = bndy_class_weights = ones(K + 1)
    assert torch.equal(rules.wat_class_weights(None, eta, K), theirs_w)  # epoch 0: the original's initial ones
    for epoch in range(4):
        # training step of this epoch with the current weights
        y = torch.randint(0, K, (32,), generator=g)
        nat = torch.randn(32, K, generator=g, dtype=torch.float64)
        adv = nat + torch.randn(32, K, generator=g, dtype=torch.float64)
        ours_w = rules.wat_class_weights(ours_cum, eta, K)
        assert torch.allclose(ours_w, theirs_w, atol=1e-12)
        ce = F.cross_entropy(nat, y, reduction="none")
        kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(nat, dim=1), reduction="none").sum(1)
        expected = originals.wat_train_loss(adv, nat, y, theirs_w, beta, K)
        assert float(rules.wat_loss(ce, kl, y, ours_w, beta)) == pytest.approx(float(expected), rel=1e-12)
        # as the trainer composes it from WAT's example weights w_y + w_K
        assert float(((ours_w[y] + ours_w[K]) * (ce + beta * kl)).mean()) == pytest.approx(float(expected), rel=1e-12)
        # validation after the epoch: 200 images (20 per class), batches of 25
        vy = torch.arange(K).repeat(20)[torch.randperm(200, generator=g)]
        vnat = 2 * torch.randn(200, K, generator=g, dtype=torch.float64) + 3 * F.one_hot(vy, K) * (vy[:, None] % 3)
        vadv = vnat + torch.randn(200, K, generator=g, dtype=torch.float64)
        batches = [(vnat[i:i + batch], vadv[i:i + batch], vy[i:i + batch]) for i in range(0, 200, batch)]
        nat_cost, bndy_cost = originals.wat_validate(batches, K, batch)
        for i in range(K + 1):
            costs[epoch, i] = nat_cost[i] + beta * bndy_cost[i]
        class_factor = (torch.sum(costs, dim=0) * eta).exp()
        theirs_w = K * class_factor / class_factor.sum()
        vce = F.cross_entropy(vnat, vy, reduction="none")
        vkl = F.kl_div(F.log_softmax(vadv, dim=1), F.softmax(vnat, dim=1), reduction="none").sum(1)
        sums = torch.zeros(K, dtype=torch.float64).index_add_(0, vy, vce + beta * vkl)
        cost = rules.wat_validation_costs(sums, 200)
        assert torch.allclose(cost, costs[epoch], atol=1e-12)
        ours_cum = cost if ours_cum is None else ours_cum + cost
    assert abs(float(theirs_w.sum()) - K) < 1e-9 and theirs_w.numel() == K + 1


def test_wat_uniform_scale():
    assert rules.wat_uniform_scale(K, first_epoch=True) == 2.0
    w = rules.wat_class_weights(torch.zeros(K + 1), 0.3, K)
    assert float(w[0] + w[K]) == pytest.approx(rules.wat_uniform_scale(K, first_epoch=False))
