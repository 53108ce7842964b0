"""Numerics, property-based (RELIABILITY.md, item 4).

Random and extreme logits -- very large, all equal, all correct, all wrong, overflowing -- with K = 2 .. 1000
classes, in float32, bfloat16 and float16: the CSR penalty and its gradient stay finite and the
penalty non-negative; the estimator's spectral weights are finite and non-negative (``reference``:
within [0.01, 2.01]); PGD never produces NaN/inf images, nor leaves the eps-ball or [0, 1].
Example counts are kept small so that the file runs in seconds.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_csr import ConfusionEstimator, csr_penalty, pgd_attack, spectral_weights
from hf_csr.attacks import attack_loss
from hf_csr.regularizer import REFERENCE_WEIGHT_RANGE

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = ("random", "large", "equal", "all_correct", "all_wrong", "tiny")
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_logits(kind: str, n: int, k: int, seed: int, dtype: torch.dtype, scale: float):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(n, k, generator=g)
    if kind == "random":
        z = z * scale
    elif kind == "large":
        z = z.sign() * scale * 1e3  # up to 1e4 .. 6e4: large but representable in fp16 (max 65504)
    elif kind == "equal":
        z = torch.full((n, k), scale)
    elif kind == "all_correct":
        z = z.clamp(-1, 1)
        z[torch.arange(n), labels] = scale * 1e3
    elif kind == "all_wrong":
        z = z.clamp(-1, 1)
        z[torch.arange(n), labels] = -scale * 1e3
    elif kind == "tiny":
        z = z * 1e-6
    return z.clamp(-60000, 60000).to(dtype), labels


logit_cases = st.tuples(
    st.sampled_from(KINDS),
    st.integers(1, 24),
    st.sampled_from((2, 3, 10, 1000)),
    st.integers(0, 2**16),
    st.sampled_from(DTYPES),
    st.sampled_from((1.0, 10.0, 60.0)),
)


@FAST
@given(case=logit_cases, variant=st.sampled_from(("paper", "reference")), gamma=st.sampled_from((0.0, 0.1, 0.5)))
def test_penalty_is_finite_non_negative_with_finite_gradients(case, variant, gamma):
    kind, n, k, seed, dtype, scale = case
    logits, labels = make_logits(kind, n, k, seed, dtype, scale)
    estimator = ConfusionEstimator(k, variant=variant, gamma=gamma, source="batch")
    stats = estimator.update(logits, labels)
    weights = estimator.weights()
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    if variant == "reference":
        lo, hi = REFERENCE_WEIGHT_RANGE
        assert float(weights.min()) >= lo - 1e-9 and float(weights.max()) <= hi + 1e-9
    logits = logits.detach().requires_grad_(True)
    psi = csr_penalty(logits, labels, weights, variant=variant, gamma=gamma,
                      class_counts=stats.class_counts, num_examples=n)
    psi_value = psi.detach()
    assert psi.dtype == torch.float32 and torch.isfinite(psi_value) and float(psi_value) >= 0
    (grad,) = torch.autograd.grad(psi, [logits])
    assert torch.isfinite(grad.float()).all()
    assert torch.isfinite(torch.tensor(estimator.spectral_norm()))


@FAST
@given(
    k=st.sampled_from((2, 3, 10, 100)),
    seed=st.integers(0, 2**16),
    magnitude=st.sampled_from((0.0, 1e-300, 1e-8, 1.0, 1e8, 1e300)),
    density=st.sampled_from((0.0, 0.1, 1.0)),
    variant=st.sampled_from(("paper", "reference")),
)
def test_spectral_weights_non_negative_and_finite(k, seed, magnitude, density, variant):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(k, k, generator=g, dtype=torch.float64) * magnitude
    c = c * (torch.rand(k, k, generator=g, dtype=torch.float64) < density)
    c.fill_diagonal_(0)
    w, v = spectral_weights(c, variant)
    assert w.shape == (k, k) and torch.isfinite(w).all() and (w >= 0).all()
    assert torch.isfinite(v).all() and (v >= 0).all()
    if variant == "reference":
        lo, hi = REFERENCE_WEIGHT_RANGE
        assert float(w.min()) >= lo - 1e-9 and float(w.max()) <= hi + 1e-9


@FAST
@given(case=logit_cases, loss=st.sampled_from(("ce", "cw")))
def test_attack_losses_are_finite(case, loss):
    kind, n, k, seed, dtype, scale = case
    logits, labels = make_logits(kind, n, k, seed, dtype, scale)
    assert torch.isfinite(attack_loss(logits, labels, loss))
    target = torch.softmax(make_logits("random", n, k, seed + 1, torch.float32, 1.0)[0], dim=1)
    assert torch.isfinite(attack_loss(logits, labels, "kl", target))


class ScaledLinear(torch.nn.Module):
    """Logits = scale * (x W) computed in ``dtype``: large scales overflow fp16/bf16 to inf (and NaN loss)."""

    def __init__(self, k, scale, dtype, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(16, k, generator=g))
        self.scale, self.dtype = scale, dtype

    def forward(self, x):
        return (x.flatten(1).to(self.dtype) @ self.weight.to(self.dtype)) * self.scale


@settings(max_examples=20, deadline=None)
@given(
    k=st.sampled_from((2, 10, 1000)),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from((1.0, 1e3, 1e6, 1e40)),
    norm=st.sampled_from(("Linf", "L2")),
    loss=st.sampled_from(("ce", "cw", "kl")),
    seed=st.integers(0, 2**16),
)
def test_pgd_never_produces_non_finite_images(k, dtype, scale, norm, loss, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 4, 4, generator=g)
    y = torch.randint(0, k, (4,), generator=g)
    eps = 8 / 255 if norm == "Linf" else 0.5
    model = ScaledLinear(k, scale, dtype, seed)
    x_adv = pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=3, norm=norm, loss=loss,
                       generator=torch.Generator().manual_seed(seed))
    assert torch.isfinite(x_adv).all()
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    distance = (x_adv - x).flatten(1).abs().amax(1) if norm == "Linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert float(distance.max()) <= eps * (1 + 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_weights_range_on_a_real_update(dtype):
    """One deterministic case per dtype (readable if the property tests ever shrink to something obscure)."""
    logits, labels = make_logits("all_wrong", 16, 10, 0, dtype, 10.0)
    estimator = ConfusionEstimator(10, variant="reference", gamma=0.1, source="ema")
    estimator.update(logits, labels)
    w = estimator.weights()
    assert float(w.min()) >= 0.01 - 1e-12 and float(w.max()) <= 2.01 + 1e-12
