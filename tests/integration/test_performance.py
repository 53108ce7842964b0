"""Mixed precision, memory format and compilation: correctness only (timings live in benchmarks/).

* the Linf projection (one clamp to a precomputed box) equals the textbook min/max/clamp, and
  ``pgd_attack`` equals a plain reference PGD loop bit for bit;
* attacks under bf16 and fp16 autocast stay in the ball, return float32 and raise the loss; under
  fp16 the loss scaling keeps the input gradient from underflowing to zero;
* channels_last model and inputs give the logits and input gradients of the contiguous layout;
* a bf16 + channels_last training step of ``CSRTrainer`` runs and updates the weights;
* ``torch.compile`` of the model is not recompiled at every attack step.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_csr import CSRTrainer, pgd_attack
from hf_csr.attacks import _linf_box, _project


EPS, STEP = 8 / 255, 2 / 255


def small_net(seed=0, width=8):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5),
    ).eval()


def batch(n=12, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def reference_pgd(model, x, y, noise, steps):
    """The textbook Linf PGD (CE, sign steps, min/max projection then [0, 1])."""
    x_adv = torch.min(torch.max(x + noise, x - EPS), x + EPS).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + STEP * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    return x_adv


@pytest.mark.parametrize("per_example", [False, True])
def test_linf_box_projection_equals_the_reference(per_example):
    x, _ = batch()
    z = x + (torch.rand_like(x) - 0.5) * 0.3  # far outside the ball and [0, 1] in places
    eps = torch.linspace(1 / 255, 16 / 255, x.shape[0]).view(-1, 1, 1, 1) if per_example else EPS
    low, high = _linf_box(x, eps)
    ours = torch.clamp(z, low, high)
    assert torch.equal(ours, _project(z, x, eps, "Linf"))
    assert torch.equal(ours, torch.min(torch.max(z, x - eps), x + eps).clamp(0, 1))


def test_pgd_attack_equals_reference_pgd_bit_for_bit():
    model = small_net()
    x, y = batch()
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * EPS
    ours = pgd_attack(model, x, y, eps=EPS, step_size=STEP, steps=5, noise=noise)
    assert torch.equal(ours, reference_pgd(model, x, y, noise, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attacks_under_autocast(dtype):
    model = small_net()
    x, y = batch()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
    for loss in ("ce", "kl", "cw"):
        with torch.autocast("cpu", dtype=dtype):
            x_adv = pgd_attack(model, x, y, eps=EPS, step_size=STEP, steps=5, loss=loss)
        assert x_adv.dtype == torch.float32 and torch.isfinite(x_adv).all()
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert not torch.equal(x_adv, x)
    with torch.autocast("cpu", dtype=dtype):
        x_adv = pgd_attack(model, x, y, eps=EPS, step_size=STEP, steps=5)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > clean


class TinyGradientNet(nn.Module):
    """Logits = sum of 1e-8 * conv(x): under fp16 the gradient reaching the conv (at most 1e-8) is below
    fp16's smallest subnormal (6e-8) unless the loss is scaled."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return (self.conv(x) * 1e-8).sum((2, 3))  # the product is fp16 under autocast


def test_fp16_loss_scaling_keeps_the_input_gradient_from_underflowing():
    model = TinyGradientNet()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.float16):
        unscaled = pgd_attack(model, x, y, eps=EPS, step_size=STEP, steps=1, random_start="none", loss_scale=1.0)
        scaled = pgd_attack(model, x, y, eps=EPS, step_size=STEP, steps=1, random_start="none")  # default: 1024
    # Without scaling the fp16 gradient is exactly zero: the attack cannot move.
    assert torch.equal(unscaled, x)
    # With the default fp16 loss scale the gradient survives: (nearly) every pixel away from 0 and 1
    # takes a full step, in the direction of the float32 gradient.
    moved = (scaled - x).abs()
    interior = (x > STEP) & (x < 1 - STEP)
    assert ((moved[interior] - STEP).abs() < 1e-5).float().mean() > 0.95
    x32 = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x32), y, reduction="sum"), [x32])
    agree = (torch.sign(scaled - x) == torch.sign(grad))[interior & (grad.abs() > 1e-12)]
    assert agree.float().mean() > 0.95


def test_channels_last_gives_the_same_logits_and_input_gradients(fmnist_model):
    model = fmnist_model("preact_resnet_tiny", width=8).eval()
    x = torch.rand(6, 1, 28, 28)
    y = torch.arange(6)
    x.requires_grad_(True)
    ref_logits = model(pixel_values=x).logits
    (ref_grad,) = torch.autograd.grad(F.cross_entropy(ref_logits, y), [x])
    model_cl = model.to(memory_format=torch.channels_last)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    logits = model_cl(pixel_values=x_cl).logits
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), [x_cl])
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    x_adv = pgd_attack(model_cl, x_cl.detach(), y, eps=EPS, step_size=STEP, steps=2)
    assert (x_adv - x).abs().max() <= EPS + 1e-6


def test_bf16_channels_last_training_step(fmnist, fmnist_model, make_args, tmp_path):
    torch.manual_seed(0)
    model = fmnist_model().to(memory_format=torch.channels_last)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = make_args(tmp_path, bf16=True, max_steps=2, save_strategy="no", base_loss="trades")
    trainer = CSRTrainer(model=model, args=args, train_dataset=fmnist(limit=32))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


@pytest.mark.compile
def test_compiled_model_is_not_recompiled_at_every_attack_step():
    torch._dynamo.reset()
    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(graph_module)
        return graph_module.forward

    model = small_net()
    compiled = torch.compile(model, backend=counting_backend)
    x, y = batch()
    for steps in (10, 10, 20):
        x_adv = pgd_attack(compiled, x, y, eps=EPS, step_size=STEP, steps=steps)
        assert (x_adv - x).abs().max() <= EPS + 1e-6
    first = len(compilations)
    assert 1 <= first <= 4, first  # a handful of graphs (forward, maybe a split), not one per step
    pgd_attack(compiled, x, y, eps=EPS, step_size=STEP, steps=10, loss="kl")
    pgd_attack(compiled, x, y, eps=EPS, step_size=STEP, steps=10)
    assert len(compilations) <= first + 2  # the KL target's no-grad forward may add one, then nothing
    torch._dynamo.reset()


@pytest.mark.compile
def test_trainer_with_torch_compile_compiles_a_bounded_number_of_graphs(fmnist, fmnist_model, make_args, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    args = make_args(tmp_path, torch_compile=True, torch_compile_backend="eager", max_steps=3, save_strategy="no",
                     attack_steps=5, augment=False)
    trainer = CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=args, train_dataset=fmnist(limit=48))
    trainer.train()
    graphs = counters["stats"]["unique_graphs"]
    # 3 optimizer steps x (1 + 5 attack steps + 1) forwards: compilations must not grow with them.
    assert 1 <= graphs <= 8, dict(counters["stats"])
    torch._dynamo.reset()
