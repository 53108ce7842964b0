"""(c) PGD-10 attack throughput: ``hf_csr.pgd_attack`` against ``torchattacks.PGD`` (same model, inputs, budget).

Linf, eps 8/255, step 2/255, 10 steps, uniform random start, cross-entropy, model in eval mode. Both
attack the same logits-returning wrapper of the same model. torchattacks is a benchmark-only
dependency, installed into an ignored folder next to the repository::

    pip install --target .bench-deps torchattacks scipy --no-deps
    python benchmarks/bench_attack.py --quick
"""

from __future__ import annotations

import _common as C  # noqa: N812
import torch

from hf_csr import pgd_attack


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    args = C.finish_args(
        parser.parse_args(),
        quick=dict(width=16, batch_size=64, repeats=7, warmup=1),
        full=dict(width=64, batch_size=256, repeats=10, warmup=2),
    )
    try:
        import torchattacks
    except ImportError as error:
        raise SystemExit(
            "torchattacks is not installed: `pip install --target .bench-deps torchattacks scipy --no-deps` "
            f"in the repository root ({error})."
        ) from error
    info = C.machine()
    info["torchattacks"] = getattr(torchattacks, "__version__", "?")
    x, y = C.make_data(args.batch_size, args.classes, args.device, seed=3)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rows, targets = [], []
    resnet = C.make_model(args.classes, args.width, args.device, args.channels_last)
    # A one-layer model too: there the attack loop's own work (the per-step tensor operations around the
    # forward/backward) is what is measured, rather than the network's convolutions.
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), args.classes)).to(args.device)
    for model_name, model in (("preact_resnet18", resnet), ("linear", linear)):
        repeats = args.repeats if model_name == "preact_resnet18" else 10 * args.repeats  # milliseconds each
        row = measure(args, torchattacks, C.Logits(model).eval(), x, y, repeats)
        rows.append({"model": model_name, **row})
        if model_name == "preact_resnet18":
            speedup = row["speedup"]
            targets.append(f"target (c) hf_csr/torchattacks throughput >= 1.0 (PreAct-ResNet18): {speedup:.3f} -> "
                           f"{'HOLDS' if speedup >= 1.0 else 'MISSED'}")
    C.report("bench_attack: PGD-10 throughput, hf_csr vs torchattacks", args, info, rows, targets)


def measure(args, torchattacks, net, x, y, repeats):
    eps, step = 8 / 255, 2 / 255
    reference = torchattacks.PGD(net, eps=eps, alpha=step, steps=10, random_start=True)

    def ours():
        with C.autocast(args.device, args.bf16):
            return pgd_attack(net, x, y, eps=eps, step_size=step, steps=10, bn_mode="eval")

    def theirs():
        with C.autocast(args.device, args.bf16):
            return reference(x, y)

    times = C.interleaved({"hf_csr": ours, "torchattacks": theirs}, warmup=args.warmup, repeats=repeats,
                          device=args.device, progress=repeats <= 20)
    acc = {}
    for name, fn in (("hf_csr", ours), ("torchattacks", theirs)):
        x_adv = fn()
        with torch.no_grad():
            acc[name] = float((net(x_adv).argmax(1) == y).float().mean())
    speedup = C.paired_ratio(times["torchattacks"], times["hf_csr"])
    return {
        "hf_csr_s": C.median(times["hf_csr"]), "torchattacks_s": C.median(times["torchattacks"]),
        "hf_csr_img_per_s": args.batch_size / C.median(times["hf_csr"]),
        "torchattacks_img_per_s": args.batch_size / C.median(times["torchattacks"]),
        "speedup": speedup, "robust_acc_hf_csr": acc["hf_csr"], "robust_acc_torchattacks": acc["torchattacks"],
    }


if __name__ == "__main__":
    main()
