"""(d) hf_csr's class-wise AutoAttack evaluation against calling pyautoattack directly, same inputs.

hf_csr: ``evaluate_robustness(model, x, y, attacks="autoattack")`` -- the clean pass (with its
zero-gradient check), AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) component by component
on the survivors, per-class accuracy, the robust confusion matrix and its norms, the flags.
Direct: ``pyautoattack.AutoAttack(net, version="standard").run_standard_evaluation(x, y)``.

The network is untrained, so its head's bias is zeroed (else every image gets the class of the
largest bias and nothing is attackable at all) and the labels are its own clean predictions (clean
accuracy 100%); at the default eps of 2/255 APGD-CE leaves a few survivors, so that the later
components (APGD-T, FAB-T, Square) run too -- at 8/255 APGD-CE alone breaks every example.

    python benchmarks/bench_autoattack.py --quick
"""

from __future__ import annotations

import logging

import _common as C  # noqa: N812
import torch

from hf_csr.evaluation import evaluate_robustness
from hf_csr.utils import parse_pixel_value


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=None, help="examples evaluated")
    parser.add_argument("--eps", default="2/255", help="Linf budget")
    args = C.finish_args(
        parser.parse_args(),
        quick=dict(width=8, batch_size=64, repeats=3, warmup=1, images=32),
        full=dict(width=64, batch_size=256, repeats=5, warmup=1, images=512),
    )
    for name in ("hf_csr", "auto-attack", "pyautoattack"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from pyautoattack import AutoAttack

    eps = parse_pixel_value(args.eps, name="eps")
    info = C.machine()
    model = C.make_model(args.classes, args.width, args.device, args.channels_last).eval()
    with torch.no_grad():
        model.backbone.linear.bias.zero_()
    net = C.Logits(model).eval()
    x, _ = C.make_data(args.images, args.classes, args.device, seed=4)
    with torch.no_grad():
        y = net(x).argmax(1)  # clean accuracy 100%: every example is attacked
    results = {}
    forwarded = {"n": 0}  # images through the network: the work done, whatever the machine's load

    def count(module, inputs, kwargs):
        value = inputs[0] if inputs else kwargs.get("pixel_values")
        forwarded["n"] += value.shape[0]

    model.register_forward_pre_hook(count, with_kwargs=True)

    def work(fn):
        forwarded["n"] = 0
        fn()
        return forwarded["n"]

    def ours():
        report = evaluate_robustness(model, x, y, attacks="autoattack", eps=eps, batch_size=args.batch_size, seed=0,
                                     device=args.device, progress=False)
        results["hf_csr"] = report.attacks["autoattack"].accuracy
        results["after"] = report.attacks["autoattack"].extra.get("robust_accuracy_after")

    def direct():
        adversary = AutoAttack(net, norm="Linf", eps=eps, version="standard", seed=0, device=args.device)
        adversary.verbose = False
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=args.batch_size)
        results["direct"] = float((y_adv.to(y.device) == y).float().mean())

    times = C.interleaved({"hf_csr": ours, "pyautoattack": direct}, warmup=args.warmup, repeats=args.repeats,
                          device=args.device)
    ratio = C.paired_ratio(times["hf_csr"], times["pyautoattack"])
    images_ours, images_direct = work(ours), work(direct)
    rows = [{
        "images": args.images, "eps": args.eps, "hf_csr_s": C.median(times["hf_csr"]),
        "pyautoattack_s": C.median(times["pyautoattack"]), "ratio": ratio,
        "robust_acc_hf_csr": results["hf_csr"], "robust_acc_direct": results["direct"],
        "hf_csr_accuracy_after_each_component": results["after"],
        "images_forwarded_hf_csr": images_ours, "images_forwarded_direct": images_direct,
        "work_ratio": images_ours / max(images_direct, 1),
    }]
    targets = [f"target (d) hf_csr / direct pyautoattack <= 1.05: {ratio:.3f} -> {'HOLDS' if ratio <= 1.05 else 'MISSED'}"]
    C.report("bench_autoattack: class-wise AutoAttack evaluation vs pyautoattack", args, info, rows, targets)


if __name__ == "__main__":
    main()
