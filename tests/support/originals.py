"""Independent re-implementations of the fairness baselines' original update rules, written from their
released code (see the docstring of tests/unit/test_baselines_faithful.py for the commits read).
The unit tests compare hf_csr.fairness.rules with them, and the integration tests compare the trainer."""

import numpy as np
import torch
import torch.nn.functional as F


def normalize_lambda(lmb, lim=0.8):
    lmb = torch.clamp(lmb, min=0)
    if torch.sum(lmb) > lim:
        lmb = lim * lmb / torch.sum(lmb)
    return lmb


def cost_sensitive(lam0, lam1, lam2):
    diff0 = torch.ones(10, dtype=torch.float64) * 1 / 10
    for i in range(10):
        for j in range(10):
            if j == i:
                diff0[i] = diff0[i] + 9 / 10 * lam0[i]
            else:
                diff0[i] = diff0[i] - 1 / 10 * lam0[j]
    diff1 = torch.ones(10, dtype=torch.float64) * 1 / 10
    for i in range(10):
        for j in range(10):
            if j == i:
                diff1[i] = diff1[i] + 9 / 10 * lam1[i]
            else:
                diff1[i] = diff1[i] - 1 / 10 * lam1[j]
    diff2 = torch.clamp(torch.exp(2 * lam2), min=0.98, max=3)
    return diff0, diff1, diff2


def frl_epoch(lmbda, class_clean_error, class_bndy_error, total_clean_error, total_bndy_error,
                    delta0, delta1, rate1, rate2, lim):
    gamma0 = class_clean_error - total_clean_error - delta0
    gamma1 = class_bndy_error - total_bndy_error - delta1
    lmbda0 = lmbda[0:10] + rate1 * torch.clamp(gamma0, min=-1000)
    lmbda1 = lmbda[10:20] + rate1 * 2 * torch.clamp(gamma1, min=-1000)
    lmbda2 = lmbda[20:30] + rate2 * gamma1
    lmbda0 = normalize_lambda(lmbda0, lim)
    lmbda1 = normalize_lambda(lmbda1, lim)
    return torch.cat([lmbda0, lmbda1, lmbda2])


def evaluate_errors(pred, pred_adv, label):
    """``evaluate`` + ``in_class``: class-wise clean / boundary errors and the totals."""
    acc = torch.zeros(10, dtype=torch.float64)
    acc_adv = torch.zeros(10, dtype=torch.float64)
    for i in range(10):
        in_class = (label == i).double()
        acc[i] = ((pred == label).double() * in_class).sum() / in_class.sum()
        acc_adv[i] = ((pred_adv == label).double() * in_class).sum() / in_class.sum()
    correct = (pred == label).sum().item()
    correct_adv = (pred_adv == label).sum().item()
    n = len(label)
    return 1 - acc, acc - acc_adv, 1 - correct / n, correct / n - correct_adv / n


def cw(outputs, y):
    outputs = F.softmax(outputs, 1)
    label_mask = F.one_hot(y, 10).to(torch.bool)
    label_logit = outputs[label_mask]
    others = outputs[~label_mask].reshape(-1, 9)
    top_other_logit, _ = torch.max(others, dim=1)
    return top_other_logit - label_logit


def class_margin(output, y):
    loss_margin = cw(output, y)
    class_margin = torch.zeros(10, dtype=output.dtype)
    for cc in range(10):
        class_margin[cc] += (loss_margin[y == cc]).mean()
    return torch.where(torch.isnan(class_margin), -torch.ones_like(class_margin), class_margin)


def solve_weight(y, class_margin, r):
    """DAW.solve_weight with N = train_batch_size = 10, solved with scipy's SLSQP instead of cvxpy:
    maximise sum_i p[y_i] * m[y_i] s.t. sum p = 1, p >= 0, sum kl_div(Pemp, p) <= r, where cvxpy's
    kl_div(x, y) = x log(x / y) - x + y."""
    from scipy.optimize import minimize

    n = 10
    pemp = np.full(n, 1.0 / n)
    yy = y.numpy()
    m = class_margin.double().numpy()

    def objective(p):
        return -np.sum(p[yy] * m[yy])

    def kl_slack(p):
        p = np.maximum(p, 1e-300)
        return r - np.sum(pemp * np.log(pemp / p) - pemp + p)

    result = minimize(objective, pemp.copy(), method="SLSQP", bounds=[(1e-12, 1.0)] * n,
                      constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1.0}, {"type": "ineq", "fun": kl_slack}],
                      options={"ftol": 1e-14, "maxiter": 1000})
    # SLSQP may stop with status 8 ("positive directional derivative for linesearch") at the optimum when the
    # tolerance is below what the floating-point sums allow (it depends on the BLAS threads); a feasible
    # point is what the comparison below needs: ours must reach at least its objective, and match it.
    feasible = abs(result.x.sum() - 1.0) < 1e-9 and kl_slack(result.x) > -1e-9
    assert (result.success or result.status == 8) and feasible, result.message
    return torch.from_numpy(result.x)


def cfa_epoch_settings(epoch, begin, cw_robust, eps, beta, lambda_1, lambda_2, ccr):
    if epoch >= begin:
        class_eps = (torch.ones(10, dtype=torch.float64) * lambda_1 + cw_robust) * eps
    else:
        class_eps = torch.ones(10, dtype=torch.float64) * eps
    class_beta = torch.ones(10, dtype=torch.float64) * (beta / (1 + beta))
    if ccr and epoch >= begin:
        for i in range(10):
            class_beta[i] = (lambda_2 + cw_robust[i]) * beta / (1 + (lambda_2 + cw_robust[i]) * beta)
    return class_eps, class_beta


def cw_trades_loss_value(logits_nat, logits_adv, y, cw_beta):
    batch_size = len(y)
    batch_beta = cw_beta[y]
    loss_natural = F.cross_entropy(logits_nat, y, reduction="none") / batch_size
    loss_robust = (1.0 / batch_size) * F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                                                reduction="none")
    loss_robust = loss_robust.sum(1)
    return ((1 - batch_beta) * loss_natural + batch_beta * loss_robust).sum()


def weight_average(avg_state, new_state, decay_rate, init=False):
    if init:
        decay_rate = 0
    out = dict(new_state)
    for key in avg_state:
        out[key] = (avg_state[key] * decay_rate + new_state[key] * (1 - decay_rate)).clone().detach()
    return out


def wat_validate(batches, class_num, batch_size):
    epoch_val_nat_loss = torch.zeros(class_num + 1, dtype=torch.float64)
    epoch_val_bndy_loss = torch.zeros(class_num + 1, dtype=torch.float64)
    val_iter = 0
    for natural_logits, adv_logits, target in batches:
        val_iter += 1
        iter_nat_loss = F.cross_entropy(natural_logits, target, reduction="none")
        iter_bndy_loss = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(natural_logits, dim=1),
                                  reduction="none").sum(dim=1)
        for i in range(class_num):
            epoch_val_nat_loss[i] += iter_nat_loss[target == i].sum()
            epoch_val_bndy_loss[i] += iter_bndy_loss[target == i].sum()
        epoch_val_nat_loss[class_num] += iter_nat_loss.sum() / class_num
        epoch_val_bndy_loss[class_num] += iter_bndy_loss.sum() / class_num
    nat_cost = epoch_val_nat_loss / (val_iter * batch_size) * class_num
    bndy_cost = epoch_val_bndy_loss / (val_iter * batch_size) * class_num
    return nat_cost, bndy_cost


def wat_train_loss(adv_logits, natural_logits, target, weights, beta, class_num):
    iter_nat_loss = F.cross_entropy(natural_logits, target, reduction="none")
    iter_bndy_loss = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(natural_logits, dim=1), reduction="none").sum(1)
    nat_loss = bndy_loss = 0
    for i in range(class_num):
        nat_loss = nat_loss + iter_nat_loss[target == i].sum() * weights[i]
        bndy_loss = bndy_loss + iter_bndy_loss[target == i].sum() * weights[i]
    loss = (nat_loss + beta * bndy_loss) / len(target)
    trades = F.cross_entropy(natural_logits, target) + beta * (1.0 / len(target)) * F.kl_div(
        F.log_softmax(adv_logits, dim=1), F.softmax(natural_logits, dim=1), reduction="sum")
    return loss + trades * weights[class_num]
