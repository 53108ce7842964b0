"""The paper's analyses (hf_csr_paper.analysis) on tiny, hand-checkable cases."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hf_csr_paper.analysis import (
    difficulty_groups, group_accuracy, long_tail_counts, long_tail_indices, nu_ratio, nu_study, phi_prime,
    random_confusion_matrices, sharpness_sigma2, shot_groups,
)


def two_layer_net():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    return net


def test_phi_prime_by_hand_on_a_two_layer_net():
    out = phi_prime(two_layer_net(), input_norm_bound=1.0, eps=0.5)
    # ||W1||_2 = 3, ||W1||_F^2 = 10; ||W2||_2 = sqrt 2, ||W2||_F^2 = 2; n = 2, h = 2
    assert out["spectral_norms"] == pytest.approx([3.0, math.sqrt(2)])
    assert out["prod_spectral_sq"] == pytest.approx(18.0)
    assert out["sum_frobenius_over_spectral_sq"] == pytest.approx(10 / 9 + 1.0)
    assert out["prefactor"] == pytest.approx(1.5 ** 2 * 4 * 2 * math.log(4))
    assert out["phi_prime"] == pytest.approx(684 * math.log(4))
    assert out["log_phi_prime"] == pytest.approx(math.log(684 * math.log(4)))


def test_phi_prime_folds_biases_into_the_matrices():
    net = nn.Linear(1, 1)
    with torch.no_grad():
        net.weight.fill_(3.0)
        net.bias.fill_(4.0)
    assert phi_prime(net, input_norm_bound=1.0)["spectral_norms"] == pytest.approx([5.0])  # ||[3, 4]||
    assert phi_prime(net, input_norm_bound=1.0, include_bias=False)["spectral_norms"] == pytest.approx([3.0])


def test_nu_on_known_matrices():
    k = 4
    assert nu_ratio(torch.ones(k, k) - torch.eye(k)) == pytest.approx(1.0)  # ||J - I||_1 = ||J - I||_2 = K - 1
    single = torch.zeros(3, 3)
    single[0, 1] = 0.3
    assert nu_ratio(single) == pytest.approx(1.0)
    column = torch.zeros(3, 3)
    column[1:, 0] = 0.2  # one class confused evenly with the two others
    assert nu_ratio(column) == pytest.approx(math.sqrt(2))
    assert math.isnan(nu_ratio(torch.zeros(3, 3)))


def test_random_confusion_matrices_and_the_sqrt_k_bound():
    c = random_confusion_matrices(500, 10, seed=1, scheme="dirichlet")
    assert torch.all(torch.diagonal(c, dim1=1, dim2=2) == 0) and torch.all(c >= 0)
    assert torch.all(c.sum(dim=1) <= 1 + 1e-12)  # each column is a distribution of errors
    study = nu_study(2000, 10, seed=0, model_matrices={"J-I": np.ones((10, 10)) - np.eye(10)}, batch=700)
    assert study["count"] == 2000 and study["models"]["J-I"] == pytest.approx(1.0)
    assert study["random"]["max"] <= math.sqrt(10) + 1e-9 and study["random"]["min"] > 0
    again = nu_study(2000, 10, seed=0, batch=700)
    uniform = random_confusion_matrices(50, 10, seed=2)
    assert torch.all(torch.diagonal(uniform, dim1=1, dim2=2) == 0) and torch.all((uniform >= 0) & (uniform <= 1))
    assert again["random"] == study["random"]


def _linear(scale):
    net = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[scale, 0.0], [-scale, 0.0]]))
    return net


def test_sharpness_fixed_seed_flat_and_sharp_models():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.stack([torch.where(y == 0, 1.0, -1.0), torch.randn(40, generator=g)], dim=1)
    grid = (0.01, 0.1, 0.5, 1.0)
    flat = _linear(100.0)
    before = flat.weight.clone()
    assert sharpness_sigma2(flat, x, y, grid=grid, num_samples=10, seed=0)["sigma2"] == 1.0
    assert torch.equal(flat.weight, before)  # weights restored
    sharp = sharpness_sigma2(_linear(0.001), x, y, grid=grid, num_samples=10, seed=0)
    assert sharp["sigma2"] == 0.0 and sharp["worst_drop"]["0.01"] > 0.05
    medium = _linear(0.5)
    first = sharpness_sigma2(medium, x, y, grid=grid, num_samples=10, seed=3)
    second = sharpness_sigma2(medium, x, y, grid=grid, num_samples=10, seed=3)
    assert first == second  # a fixed seed gives the same estimate
    assert first["sigma2"] in (0.0,) + grid
    # magnitude-relative noise is scale invariant: the large and the tiny net are equally sharp
    big = sharpness_sigma2(_linear(100.0), x, y, grid=grid, num_samples=5, scale="magnitude", seed=1)
    tiny = sharpness_sigma2(_linear(0.001), x, y, grid=grid, num_samples=5, scale="magnitude", seed=1)
    assert big["sigma2"] == tiny["sigma2"] and big["worst_drop"] == tiny["worst_drop"]


def test_long_tail_counts_and_indices():
    counts = long_tail_counts(100, 10, ratio=100)
    assert counts[0] == 100 and counts[-1] == 1 and counts == sorted(counts, reverse=True)
    assert counts[3] == int(100 * 100 ** (-3 / 9))
    labels = np.repeat(np.arange(10), 120)
    idx = long_tail_indices(labels, ratio=100, seed=0)
    assert np.bincount(labels[idx], minlength=10).tolist() == long_tail_counts(120, 10, 100)
    assert np.array_equal(idx, long_tail_indices(labels, ratio=100, seed=0))


def test_groups_for_tables_7_and_9():
    groups = shot_groups([500, 300, 100, 50, 20, 5])
    assert groups == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    assert shot_groups([500, 100, 5], thresholds=(100, 20)) == {"many": [0], "medium": [1], "few": [2]}
    assert group_accuracy([1.0, 0.8, 0.5, 0.3, 0.2, 0.0], groups) == pytest.approx({"many": 0.9, "medium": 0.4, "few": 0.1})
    assert difficulty_groups([0.9, 0.1, 0.5]) == {"easy": [0], "medium": [2], "hard": [1]}
