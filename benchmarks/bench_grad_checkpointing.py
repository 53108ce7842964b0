"""Gradient checkpointing on a WRN: peak memory and time of a training step, checkpointed / plain.

A training step = forward of a ``RobustImageClassifier`` (train mode) on ``--batch-size`` CIFAR-sized
images, cross-entropy, backward, SGD step; the plain and the checkpointed model (``set_grad_checkpointing``
via ``gradient_checkpointing_enable()``, as ``gradient_checkpointing=True`` does in the Trainer) hold the
same weights. Peak memory: ``_common.peak_memory`` (CUDA max allocated, or the torch profiler's allocation
events on a CPU), above what was allocated before the step (i.e. activations + gradients, not the
weights and the SGD momentum, which one untimed step of each creates first). Time: interleaved rounds,
median of the per-round ratio.

    python benchmarks/bench_grad_checkpointing.py                 # WRN-70-16, batch 8 (the README figure)
    python benchmarks/bench_grad_checkpointing.py --quick         # WRN-16-4, batch 32: seconds
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from _common import base_parser, finish_args, interleaved, machine, make_data, median, paired_ratio, peak_memory, report

import hf_csr


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=None, help="timm model name (default wrn70_16_ddpm; --quick: wrn28_10_ddpm)")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--wrn-width", type=int, default=None)
    args = finish_args(
        parser.parse_args(),
        quick=dict(backbone="wrn28_10_ddpm", depth=16, wrn_width=4, batch_size=32, repeats=3, warmup=1),
        full=dict(backbone="wrn70_16_ddpm", depth=70, wrn_width=16, batch_size=8, repeats=2, warmup=0),
    )
    device = args.device
    info = machine()
    torch.manual_seed(0)
    plain = hf_csr.create_robust_classifier(args.backbone, 10, depth=args.depth, width=args.wrn_width).to(device).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    assert ckpt.backbone.grad_checkpointing and not plain.backbone.grad_checkpointing
    params = sum(p.numel() for p in plain.parameters())
    x, y = make_data(args.batch_size, 10, device)
    optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for m in (plain, ckpt)}
    losses = {}

    def step(model, name):
        def run():
            optimizer = optimizers[id(model)]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x).logits, y)
            loss.backward()
            optimizer.step()
            losses.setdefault(name, []).append(loss.item())
        return run

    fns = {"plain": step(plain, "plain"), "checkpointed": step(ckpt, "checkpointed")}
    # One step each first, from the same weights (their losses must agree): it creates the SGD momentum
    # buffers, which would otherwise dominate the first step's peak (2 x the weights) for both variants alike.
    for fn in fns.values():
        fn()
    assert abs(losses["plain"][0] - losses["checkpointed"][0]) < 1e-5, losses
    # Peak memory of a steady-state step (activations + gradients + what the optimiser step allocates).
    peaks = {name: peak_memory(fn, device) for name, fn in fns.items()}
    times = interleaved(fns, warmup=args.warmup, repeats=args.repeats, device=device)
    mib = 2**20
    rows = [
        dict(variant=name, params_M=round(params / 1e6, 1), batch=args.batch_size, peak_MiB=round(peaks[name] / mib, 1),
             median_s=round(median(times[name]), 3))
        for name in fns
    ]
    memory_ratio = peaks["checkpointed"] / peaks["plain"]
    time_ratio = paired_ratio(times["checkpointed"], times["plain"])
    targets = [
        f"peak memory checkpointed / plain = {memory_ratio:.3f} (saves {(peaks['plain'] - peaks['checkpointed']) / mib:.0f} "
        f"MiB, {100 * (1 - memory_ratio):.0f}%)",
        f"step time checkpointed / plain = {time_ratio:.3f} (median of {args.repeats} interleaved rounds)",
        f"first-step loss plain {losses['plain'][0]:.6f}, checkpointed {losses['checkpointed'][0]:.6f}",
    ]
    report(f"gradient checkpointing, {args.backbone} depth {args.depth} width {args.wrn_width}", args, info, rows, targets)


if __name__ == "__main__":
    main()
