"""The CSR penalty against hand-computed cases and the paper's gradient (eq. 11)."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from hf_csr.regularizer import (
    ConfusionEstimator,
    confusion_counts,
    csr_penalty,
    normalize_confusion,
    spectral_weights,
    top_singular_pair,
)


def ce(z, y):
    z = torch.tensor(z, dtype=torch.float64)
    return float(torch.logsumexp(z, 0) - z[y])


# ----------------------------------------------------------------------------- 3 classes
# Class 2 is absent from the batch.
LOGITS3 = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 2.0, 1.5], [0.0, 2.0, 1.0]]
LABELS3 = [0, 0, 1, 1, 0]


def batch3():
    return torch.tensor(LOGITS3), torch.tensor(LABELS3)


def test_three_classes_paper_gamma0():
    z, y = batch3()
    counts, m = confusion_counts(z, y, variant="paper", gamma=0.0)
    # runner-ups: q1 -> 1 (confused), q2 -> 2 (confused), q4 -> 1 (confused); q0, q3 have margin > 0.
    assert counts.tolist() == [[0, 0, 0], [2, 0, 0], [0, 1, 0]]
    assert m.tolist() == [3, 2, 0]
    c = normalize_confusion(counts, m, "paper")
    assert torch.allclose(c, torch.tensor([[0, 0, 0], [2 / 3, 0, 0], [0, 0.5, 0]], dtype=torch.float64))
    sigma, u, v = top_singular_pair(c)
    assert math.isclose(float(sigma), 2 / 3, rel_tol=1e-12)
    w, _ = spectral_weights(c, "paper")
    assert torch.allclose(w, torch.tensor([[0, 0, 0], [1.0, 0, 0], [0, 0, 0]], dtype=torch.float64))
    psi = csr_penalty(z, y, w, variant="paper", gamma=0.0)
    # q1 and q4 weigh W[1, 0] / m_0 = 1/3; q2 weighs W[2, 1] = 0.
    expected = (ce(LOGITS3[1], 0) + ce(LOGITS3[4], 0)) / 3
    assert math.isclose(float(psi), expected, rel_tol=1e-6)


def test_three_classes_paper_margin():
    z, y = batch3()
    counts, m = confusion_counts(z, y, variant="paper", gamma=0.8)
    # gamma = 0.8 adds q3 (2 <= 0.8 + 1.5) but not q0 (2 > 0.8 + 1).
    assert counts.tolist() == [[0, 0, 0], [2, 0, 0], [0, 2, 0]]
    c = normalize_confusion(counts, m, "paper")
    w, _ = spectral_weights(c, "paper")
    assert torch.allclose(w, torch.tensor([[0, 0, 0], [0, 0, 0], [0, 1.0, 0]], dtype=torch.float64))
    psi = csr_penalty(z, y, w, variant="paper", gamma=0.8)
    margin = lambda row, label: [v + (0.0 if i == label else 0.8) for i, v in enumerate(row)]  # noqa: E731
    expected = 0.5 * (ce(margin(LOGITS3[2], 1), 1) + ce(margin(LOGITS3[3], 1), 1))
    assert math.isclose(float(psi), expected, rel_tol=1e-6)


def test_three_classes_reference():
    z, y = batch3()
    counts, _ = confusion_counts(z, y, variant="reference", gamma=0.0)
    assert counts.tolist() == [[0, 0, 0], [2, 0, 0], [0, 1, 0]]
    c = normalize_confusion(counts, torch.tensor([3, 2, 0]), "reference")
    assert c.tolist() == [[0, 0, 0], [2, 0, 0], [0, 1, 0]]  # raw counts
    w, _ = spectral_weights(c, "reference")
    expected_w = torch.full((3, 3), 0.01, dtype=torch.float64)
    expected_w[1, 0] = 2.01
    assert torch.allclose(w, expected_w)
    psi = csr_penalty(z, y, w, variant="reference")
    preds = [0, 1, 2, 1, 1]
    expected = sum(float(expected_w[p, t]) * ce(row, t) for row, t, p in zip(LOGITS3, LABELS3, preds)) / 5
    assert math.isclose(float(psi), expected, rel_tol=1e-6)
    # gamma = 0.6 shrinks z_y to 0.4 z_y: q0 ([0.8, 1, 0]) and q3 ([0, 0.8, 1.5]) become confused.
    counts, _ = confusion_counts(z, y, variant="reference", gamma=0.6)
    assert counts.tolist() == [[0, 0, 0], [3, 0, 0], [0, 2, 0]]


# ----------------------------------------------------------------------------- 4 classes
# Classes 2 and 3 are confused with classes 0 and 1 equally: C is rank one, u = (1,1,0,0)/sqrt2,
# v = (0,0,1,1)/sqrt2, so W = 0.5 on the four confused cells.
LOGITS4 = [
    [5.0, 0.0, 0.0, 0.0],
    [0.0, 5.0, 0.0, 0.0],
    [3.0, 1.0, 2.0, 0.0],
    [1.0, 3.0, 2.0, 0.0],
    [3.0, 0.0, 1.0, 2.0],
    [0.0, 3.0, 1.0, 2.0],
]
LABELS4 = [0, 1, 2, 2, 3, 3]


def test_four_classes_both_variants():
    z, y = torch.tensor(LOGITS4), torch.tensor(LABELS4)
    cells = [(0, 2), (1, 2), (0, 3), (1, 3)]
    for variant, gamma in (("paper", 0.0), ("reference", 0.1)):
        counts, m = confusion_counts(z, y, variant=variant, gamma=gamma)
        expected = torch.zeros(4, 4, dtype=torch.long)
        for i, j in cells:
            expected[i, j] = 1
        assert torch.equal(counts, expected), variant
        c = normalize_confusion(counts, m, variant)
        sigma, u, v = top_singular_pair(c)
        assert math.isclose(float(sigma), 1.0 if variant == "paper" else 2.0, rel_tol=1e-12)
        assert torch.allclose(u, torch.tensor([1, 1, 0, 0], dtype=torch.float64) / math.sqrt(2))
        assert torch.allclose(v, torch.tensor([0, 0, 1, 1], dtype=torch.float64) / math.sqrt(2))
        w, _ = spectral_weights(c, variant)
        for i in range(4):
            for j in range(4):
                if variant == "paper":
                    target = 0.5 if (i, j) in cells else 0.0
                else:
                    target = 2.01 if (i, j) in cells else 0.01
                assert math.isclose(float(w[i, j]), target, abs_tol=1e-12), (variant, i, j)
        psi = float(csr_penalty(z, y, w, variant=variant, gamma=gamma))
        if variant == "paper":
            expected_psi = 0.25 * sum(ce(LOGITS4[q], LABELS4[q]) for q in range(2, 6))
        else:
            expected_psi = (
                0.01 * (ce(LOGITS4[0], 0) + ce(LOGITS4[1], 1)) + 2.01 * sum(ce(LOGITS4[q], LABELS4[q]) for q in range(2, 6))
            ) / 6
        assert math.isclose(psi, expected_psi, rel_tol=1e-6), variant


def test_all_zero_confusion_is_finite():
    zero = torch.zeros(5, 5)
    w_paper, _ = spectral_weights(zero, "paper")
    w_ref, _ = spectral_weights(zero, "reference")
    assert torch.equal(w_paper, torch.zeros(5, 5, dtype=torch.float64))
    assert torch.equal(w_ref, torch.ones(5, 5, dtype=torch.float64))
    z = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    psi = csr_penalty(z, y, w_paper, variant="paper")
    psi.backward()
    assert float(psi.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    z.grad = None
    psi = csr_penalty(z, y, w_ref, variant="reference")
    assert math.isclose(float(psi), float(F.cross_entropy(z, y)), rel_tol=1e-6)  # uniform weight 1
    # All correct with gamma = 0: nothing confused, C = 0.
    logits = torch.eye(5) * 10
    counts, m = confusion_counts(logits, torch.arange(5), variant="paper")
    assert counts.sum() == 0 and m.tolist() == [1] * 5


def test_class_absent_from_batch_contributes_nothing():
    z, y = batch3()
    c = normalize_confusion(*confusion_counts(z, y, variant="paper"), "paper")
    assert torch.equal(c[:, 2], torch.zeros(3, dtype=torch.float64))
    w = torch.rand(3, 3)
    psi_with_absent = csr_penalty(z, y, w, variant="paper")
    # The global class counts may include class 2 (seen by another process): the value is unchanged.
    psi_global = csr_penalty(z, y, w, variant="paper", class_counts=torch.tensor([3, 2, 7]))
    assert torch.allclose(psi_with_absent, psi_global)


def test_spectral_weights_match_numpy_svd_and_are_non_negative():
    torch.manual_seed(0)
    for k in (2, 10, 100, 300):
        c = torch.rand(k, k, dtype=torch.float64)
        c.fill_diagonal_(0)
        sigma, u, v = top_singular_pair(c)
        u_np, s_np, vh_np = torch.linalg.svd(c)
        assert math.isclose(float(sigma), float(s_np[0]), rel_tol=1e-9)
        assert torch.allclose(torch.outer(u, v), torch.outer(u_np[:, 0], vh_np[0]), atol=1e-8)
        assert (u >= 0).all() and (v >= 0).all()
        w_ref, _ = spectral_weights(c, "reference")
        assert float(w_ref.min()) >= 0.01 - 1e-12 and float(w_ref.max()) <= 2.01 + 1e-12


# ----------------------------------------------------------------------------- eq. 11
@pytest.mark.parametrize("k", [3, 10, 100])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_paper_gradient_is_eq_11(k, gamma):
    g = torch.Generator().manual_seed(k)
    n = 64
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (n,), generator=g)
    w = torch.rand(k, k, generator=g, dtype=torch.float64)
    m = torch.bincount(y, minlength=k).double()
    z.requires_grad_(True)
    psi = csr_penalty(z, y, w, variant="paper", gamma=gamma)
    (grad,) = torch.autograd.grad(psi, z)
    with torch.no_grad():
        masked = z.scatter(1, y[:, None], float("-inf"))
        r = masked.argmax(1)
        confused = z.gather(1, y[:, None]).squeeze(1) <= gamma + z.gather(1, r[:, None]).squeeze(1)
        onehot = F.one_hot(y, k).double()
        margin_ce_grad = torch.softmax(z + gamma * (1 - onehot), 1) - onehot
        coef = (w[r, y] / m[y] * confused.double())[:, None]
        expected = coef * margin_ce_grad
    assert confused.any() and (~confused).any()
    assert torch.allclose(grad, expected.float().double(), atol=1e-6)
    assert torch.equal(grad[~confused], torch.zeros_like(grad[~confused]))


@pytest.mark.parametrize("k", [3, 10, 100])
def test_reference_gradient(k):
    g = torch.Generator().manual_seed(100 + k)
    n = 48
    z = (torch.randn(n, k, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=g)
    w = torch.rand(k, k, generator=g, dtype=torch.float64) * 2 + 0.01
    psi = csr_penalty(z, y, w, variant="reference")
    (grad,) = torch.autograd.grad(psi, z)
    with torch.no_grad():
        p = z.argmax(1)
        onehot = F.one_hot(y, k).double()
        expected = (w[p, y] / n)[:, None] * (torch.softmax(z, 1) - onehot)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_weights_get_no_gradient():
    z = torch.randn(16, 4, requires_grad=True)
    y = torch.randint(0, 4, (16,))
    w = torch.rand(4, 4, requires_grad=True)
    csr_penalty(z, y, w, variant="paper").backward()
    assert w.grad is None


# ----------------------------------------------------------------------------- estimator
class ThreadAllReduce:
    """Sums tensors across `world` threads, like an all-reduce across processes."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots = {}
        self.result = None

    def __call__(self, rank, tensor):
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        if rank == 0:
            self.result = sum(self.slots[r] for r in range(self.world))
        self.barrier.wait()
        out = self.result.clone()
        self.barrier.wait()
        return out


def make_batches(k, steps, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, k, generator=g) * 2, torch.randint(0, k, (n,), generator=g)) for _ in range(steps)]


@pytest.mark.parametrize("source", ["ema", "batch", "epoch"])
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_estimator_reduced_halves_equal_whole_batch(source, variant):
    k, batches = 7, make_batches(7, 5, 32)
    whole = ConfusionEstimator(k, variant=variant, gamma=0.1, source=source, momentum=0.8)
    reducer = ThreadAllReduce(2)
    halves = [
        ConfusionEstimator(k, variant=variant, gamma=0.1, source=source, momentum=0.8,
                           reduce_fn=lambda t, r=r: reducer(r, t))
        for r in range(2)
    ]
    results = {}

    def run(rank):
        est, out = halves[rank], []
        if source == "epoch":
            est.start_pass()
            for z, y in batches:
                est.accumulate(z[rank::2], y[rank::2])
            est.finish_pass()
        for z, y in batches:
            stats = est.update(z[rank::2], y[rank::2])
            out.append((est.confusion().clone(), est.weights().clone(), stats.class_counts.clone()))
        results[rank] = out

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if source == "epoch":
        whole.start_pass()
        for z, y in batches:
            whole.accumulate(z, y)
        whole.finish_pass()
    for step, (z, y) in enumerate(batches):
        stats = whole.update(z, y)
        for rank in range(2):
            c, w, m = results[rank][step]
            assert torch.equal(c, whole.confusion())
            assert torch.equal(w, whole.weights())
            assert torch.equal(m, stats.class_counts)


@pytest.mark.parametrize("source", ["ema", "batch", "epoch"])
def test_estimator_state_dict_round_trip(source, tmp_path):
    k = 80  # above the exact-SVD threshold: the warm start is part of the state
    batches = make_batches(k, 8, 256, seed=3)
    a = ConfusionEstimator(k, variant="paper", gamma=0.0, source=source)
    if source == "epoch":
        a.start_pass()
        for z, y in batches:
            a.accumulate(z, y)
        a.finish_pass()
    for z, y in batches[:4]:
        a.update(z, y)
        a.weights()
    torch.save(a.state_dict(), tmp_path / "state.pt")
    b = ConfusionEstimator(k, variant="paper", gamma=0.0, source=source)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for z, y in batches[4:]:
        a.update(z, y)
        b.update(z, y)
        assert torch.equal(a.confusion(), b.confusion())
        assert torch.equal(a.weights(), b.weights())


def test_ema_matches_formula():
    k = 4
    batches = make_batches(k, 3, 20, seed=1)
    est = ConfusionEstimator(k, variant="paper", source="ema", momentum=0.5)
    num = torch.zeros(k, k, dtype=torch.float64)
    den = torch.zeros(k, dtype=torch.float64)
    for z, y in batches:
        est.update(z, y)
        counts, m = confusion_counts(z, y, variant="paper")
        num = 0.5 * num + 0.5 * counts.double()
        den = 0.5 * den + 0.5 * m.double()
    expected = torch.where(den > 0, num / den, torch.zeros_like(num))
    assert torch.allclose(est.confusion(), expected)


def test_estimator_rejects_mismatched_state():
    a = ConfusionEstimator(4, variant="paper")
    b = ConfusionEstimator(4, variant="reference")
    with pytest.raises(ValueError, match="variant"):
        b.load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_problem():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"labels lie in .* but the model has num_classes"):
        confusion_counts(z, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"labels lie in .* but the model has num_classes"):
        csr_penalty(z, torch.tensor([0, -1, 2, 0]), torch.ones(3, 3))
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        csr_penalty(bad, torch.tensor([0, 1, 2, 0]), torch.ones(3, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        confusion_counts(z.masked_fill(z > 0, float("inf")), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="variant must be one of"):
        confusion_counts(z, torch.tensor([0, 1, 2, 0]), variant="spectral")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        csr_penalty(z, torch.tensor([0, 1, 2, 0]), torch.ones(3, 3), gamma=-0.1)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\)"):
        confusion_counts(z, torch.tensor([0, 1, 2, 0]), variant="reference", gamma=1.5)
    with pytest.raises(ValueError, match="weights must have shape"):
        csr_penalty(z, torch.tensor([0, 1, 2, 0]), torch.ones(4, 4))
    with pytest.raises(ValueError, match="source must be one of"):
        ConfusionEstimator(3, source="window")
    with pytest.raises(ValueError, match="momentum"):
        ConfusionEstimator(3, momentum=1.0)
