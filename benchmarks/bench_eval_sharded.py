"""(f) Sharded evaluation: 2 processes against 1 on the same class-wise evaluation, identical results.

The evaluation: clean + PGD-20 + AutoAttack's APGD-CE and APGD-T (``autoattack:apgd-ce+apgd-t``) with
``evaluate_robustness`` on a small PreAct-ResNet18 trained here for a few seconds on Fashion-MNIST (so
that the per-class numbers mean something), on ``--images`` test images. One round runs it once in one
process (``python``) and once in two (``torchrun --nproc_per_node 2``: gloo on CPUs, NCCL on GPUs, one
GPU per process), in alternating order; each process has one torch thread on a CPU. Each worker times
the evaluation only (between two barriers, after the imports, the model and the data are loaded), and
the main process writes the report. The figure is the median over rounds of (1-process seconds) /
(2-process seconds); the per-class results of every run must be identical (they are compared in full,
per-example predictions included).

    python benchmarks/bench_eval_sharded.py --quick
    python benchmarks/bench_eval_sharded.py --processes 8 --device cuda   # a GPU node: 8 GPUs vs 1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: N812

ATTACKS = "clean,pgd20,autoattack:apgd-ce+apgd-t"


def worker(args) -> None:
    """One process of one evaluation (run by this script under python or torchrun)."""
    import torch

    from hf_csr.data import load_fashion_mnist
    from hf_csr.evaluation import AutoAttackConfig, evaluate_robustness
    from hf_csr.models import RobustImageClassifier

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device)
    if distributed:
        from accelerate import PartialState

        state = PartialState(cpu=device.type == "cpu")
        device = state.device
    if device.type == "cpu":
        torch.set_num_threads(1)
    model = RobustImageClassifier.from_pretrained(args.model_dir).eval()
    data = load_fashion_mnist("test", limit=args.images, seed=0)
    attacks = ["clean", "pgd20", AutoAttackConfig("custom", ("apgd-ce", "apgd-t"), n_iter=args.n_iter)]

    def barrier():
        if distributed:
            torch.distributed.barrier()

    barrier()
    start = time.perf_counter()
    report = evaluate_robustness(model, data, attacks=attacks, eps=args.eps_value, batch_size=args.batch_size,
                                 seed=0, device=device, progress=False, distributed=distributed)
    C.synchronize(device)
    barrier()
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        results = report.to_dict()
        results["predictions"] = {name: r.predictions.tolist() for name, r in report.attacks.items()}
        Path(args.result).write_text(json.dumps({"seconds": seconds, "results": results}))


def train(model_dir: Path, width: int) -> None:
    """A PreAct-ResNet18 (width ``width``) trained clean for 2 epochs on 4000 Fashion-MNIST images."""
    import torch
    import torch.nn.functional as F

    import hf_csr
    from hf_csr.data import FASHION_MNIST_CLASSES, load_fashion_mnist

    torch.manual_seed(0)
    model = hf_csr.create_robust_classifier("preact_resnet_tiny", class_names=FASHION_MNIST_CLASSES, width=width)
    x, y = load_fashion_mnist("train", limit=4000, seed=1).tensors()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for idx in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[idx]).logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().save_pretrained(model_dir)


def run_evaluation(processes: int, args, model_dir: Path, result: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(C.REPO)}
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                    str(_free_port())]
    command += [__file__, "--worker", "--model-dir", str(model_dir), "--result", str(result), "--images",
                str(args.images), "--batch-size", str(args.batch_size), "--eps", args.eps, "--n-iter",
                str(args.n_iter), "--device", str(args.device)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=__import__("argparse").SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=__import__("argparse").SUPPRESS)
    parser.add_argument("--result", default=None, help=__import__("argparse").SUPPRESS)
    parser.add_argument("--images", type=int, default=None, help="test images evaluated")
    parser.add_argument("--eps", default="2/255", help="Linf budget (small enough that APGD-T has survivors)")
    parser.add_argument("--n-iter", type=int, default=None, help="APGD iterations (AutoAttack: 100)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the sharded run (vs 1)")
    args = parser.parse_args()
    from hf_csr.utils import parse_pixel_value

    args.eps_value = parse_pixel_value(args.eps, name="eps")
    if args.worker:
        worker(args)
        return
    args = C.finish_args(args, quick=dict(width=8, batch_size=32, repeats=3, warmup=0, images=256, n_iter=20),
                         full=dict(width=64, batch_size=128, repeats=3, warmup=0, images=2000, n_iter=100))
    info = C.machine()
    scratch = Path(tempfile.mkdtemp(prefix="hf_csr_bench_sharded_"))
    model_dir = scratch / "model"
    train(model_dir, args.width)
    times = {1: [], args.processes: []}
    results = {}
    for round_ in range(args.repeats):
        order = [1, args.processes] if round_ % 2 == 0 else [args.processes, 1]
        for processes in order:
            out = run_evaluation(processes, args, model_dir, scratch / f"result-{processes}-{round_}.json")
            times[processes].append(out["seconds"])
            results.setdefault(processes, []).append(out["results"])
        print(f"  round {round_ + 1}/{args.repeats}: " + ", ".join(f"{p} process(es) {t[-1]:.2f}s"
                                                                  for p, t in times.items()), flush=True)
    reference = results[1][0]
    identical = all(r == reference for runs in results.values() for r in runs)
    ratio = C.paired_ratio(times[1], times[args.processes])
    per_class = {name: [round(a, 4) if a is not None else None for a in entry["per_class_accuracy"]]
                 for name, entry in reference["attacks"].items()}
    rows = [{
        "images": args.images, "eps": args.eps, "apgd_n_iter": args.n_iter, "processes": args.processes,
        "one_process_s": C.median(times[1]), f"{args.processes}_processes_s": C.median(times[args.processes]),
        "speedup": ratio, "identical_results": identical,
        "accuracy": {name: entry["accuracy"] for name, entry in reference["attacks"].items()},
        "per_class_accuracy": per_class,
    }]
    target = 1.7 if args.processes == 2 else 0.85 * args.processes
    targets = [
        f"target (f) {args.processes} processes vs 1 >= {target:.2f}x: {ratio:.2f}x -> "
        f"{'HOLDS' if ratio >= target else 'MISSED'}",
        f"identical per-class results (and per-example predictions) in every run: {identical}",
    ]
    C.report("bench_eval_sharded: sharded class-wise evaluation, processes vs 1", args, info, rows, targets)


if __name__ == "__main__":
    main()
