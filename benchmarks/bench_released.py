"""(b) hf_csr TRADES+CSR per epoch against the released code's computation pattern, same settings.

The released pattern is written out here from docs/method.md's description of the authors' code (it is
not their code): per training step

* the TRADES attack (10 steps, model in eval mode, start x + 0.001 N(0, I)) evaluates the *clean*
  logits again at every attack step, inside the graph (``KL(softmax(f(x)) || f(x_adv))``);
* the TRADES loss (forward on x and on x_adv), then an *extra* forward on x_adv for the CSR term;
* the per-example CSR weights ``W[p_q, y_q]`` are gathered with a Python loop over the batch;
* 0.7 CE(f(x), y) + beta KL + 0.3 Psi, backward, SGD step;

and before every epoch a full extra PGD-10 pass over the training set whose confusion counts are
built with a Python loop over the examples (then the SVD and the min-max scaled weights).

hf_csr runs ``CSRTrainer.training_step`` + the optimizer step (TRADES, ``csr_variant="reference"``,
alpha 0.3, beta 6) with the ``ema`` source (no pass) and, reported too, the ``epoch`` source (its
pass is the same PGD-10 over the training set). Augmentation is off on both sides (the released
code augments in its data loader). Per-epoch cost per image = step / batch + pass per image; the
ratio released / hf_csr does not depend on the training-set size.

    python benchmarks/bench_released.py --quick
"""

from __future__ import annotations


import _common as C  # noqa: N812
import torch
import torch.nn.functional as F
from bench_step import make_step, make_trainer

from hf_csr import spectral_weights

EPS, STEP, STEPS, BETA, ALPHA, GAMMA = 8 / 255, 2 / 255, 10, 6.0, 0.3, 0.0


class ReleasedPattern:
    """TRADES + CSR (reference variant) as the released code computes it."""

    def __init__(self, model: torch.nn.Module, num_classes: int) -> None:
        self.model = model
        self.net = C.Logits(model)
        self.k = num_classes
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.weights = torch.ones(num_classes, num_classes)

    def trades_attack(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        x_adv = x.detach() + 0.001 * torch.randn_like(x)
        for _ in range(STEPS):
            x_adv.requires_grad_()
            with torch.enable_grad():
                # the clean logits are evaluated again at every step
                loss_kl = F.kl_div(F.log_softmax(self.net(x_adv), dim=1), F.softmax(self.net(x), dim=1),
                                   reduction="sum")
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + STEP * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
        return x_adv

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = self.trades_attack(x)
        self.model.train()
        self.optimizer.zero_grad()
        logits = self.net(x)
        logits_adv = self.net(x_adv)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="sum") / x.shape[0]
        out_adv = self.net(x_adv)  # the extra forward on x_adv for the CSR term
        pred = out_adv.argmax(dim=1)
        w = torch.zeros(x.shape[0], device=x.device)
        for i in range(x.shape[0]):  # per-example Python loop building the weights
            w[i] = self.weights[pred[i], y[i]]
        loss_csr = (w * F.cross_entropy(out_adv, y, reduction="none")).mean()
        loss = (1 - ALPHA) * loss_natural + BETA * loss_robust + ALPHA * loss_csr
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def epoch_pass(self, batches) -> None:
        """PGD-10 (CE, uniform start, eval mode) over the training set; counts with a Python loop."""
        self.model.eval()
        counts = torch.zeros(self.k, self.k)
        for x, y in batches:
            x_adv = x + torch.empty_like(x).uniform_(-EPS, EPS)
            x_adv = x_adv.clamp(0.0, 1.0)
            for _ in range(STEPS):
                x_adv.requires_grad_()
                with torch.enable_grad():
                    loss = F.cross_entropy(self.net(x_adv), y)
                grad = torch.autograd.grad(loss, [x_adv])[0]
                x_adv = x_adv.detach() + STEP * torch.sign(grad.detach())
                x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
            with torch.no_grad():
                z = self.net(x_adv)
            z = z.clone()
            for i in range(x.shape[0]):  # per-example Python loop: shrink the true logit, count
                z[i, y[i]] = z[i, y[i]] - GAMMA * z[i, y[i]]
                p = int(z[i].argmax())
                if p != int(y[i]):
                    counts[p, int(y[i])] += 1
        self.weights = spectral_weights(counts, variant="reference")[0].float()


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    args = C.finish_args(parser.parse_args(), **C.STEP_PRESETS)
    info = C.machine()
    k, b = args.classes, args.batch_size
    pass_images = 2 * b
    x, y = C.make_data(b, k, args.device, seed=2)
    inputs = {"pixel_values": x, "labels": y}
    ema = make_trainer(args, "trades", k, "csr", "ema", augment=False)
    epoch = make_trainer(args, "trades", k, "csr", "epoch", pass_images=pass_images, augment=False)
    epoch.fairness.run_confusion_pass(0)
    released = ReleasedPattern(C.make_model(k, args.width, args.device, args.channels_last), k)
    pass_x, pass_y = C.make_data(pass_images, k, args.device, seed=1)
    pass_batches = list(zip(pass_x.split(b), pass_y.split(b)))
    released.epoch_pass(pass_batches)
    fns = {
        "released_step": lambda: released.step(x, y),
        "released_pass": lambda: released.epoch_pass(pass_batches),
        "hf_ema_step": make_step(ema, inputs),
        "hf_epoch_step": make_step(epoch, inputs),
        "hf_epoch_pass": lambda: epoch.fairness.run_confusion_pass(1),
    }
    times = C.interleaved(fns, warmup=args.warmup, repeats=args.repeats, device=args.device)
    # seconds per training image of one epoch
    rel = [s / b + p / pass_images for s, p in zip(times["released_step"], times["released_pass"])]
    hf_ema = [s / b for s in times["hf_ema_step"]]
    hf_epoch = [s / b + p / pass_images for s, p in zip(times["hf_epoch_step"], times["hf_epoch_pass"])]
    speed_ema, speed_epoch = C.paired_ratio(rel, hf_ema), C.paired_ratio(rel, hf_epoch)
    rows = [{
        "released_step_s": C.median(times["released_step"]), "released_pass_s_per_img": C.median(times["released_pass"]) / pass_images,
        "hf_ema_step_s": C.median(times["hf_ema_step"]), "hf_epoch_step_s": C.median(times["hf_epoch_step"]),
        "hf_pass_s_per_img": C.median(times["hf_epoch_pass"]) / pass_images,
        "epoch_s_per_img_released": C.median(rel), "epoch_s_per_img_hf_ema": C.median(hf_ema),
        "epoch_s_per_img_hf_epoch": C.median(hf_epoch),
        "speedup_ema": speed_ema, "speedup_epoch": speed_epoch,
        "cifar10_epoch_min_released": C.median(rel) * 50_000 / 60, "cifar10_epoch_min_hf_ema": C.median(hf_ema) * 50_000 / 60,
    }]
    targets = [
        f"target (b) released / hf_csr(ema) per epoch >= 1.6: {speed_ema:.3f} -> {'HOLDS' if speed_ema >= 1.6 else 'MISSED'}",
        f"(reported) released / hf_csr(epoch source) per epoch: {speed_epoch:.3f}",
    ]
    C.report("bench_released: TRADES+CSR per epoch, released pattern vs hf_csr", args, info, rows, targets)


if __name__ == "__main__":
    main()
