"""Shared helpers of the benchmark scripts: arguments, device, models, data, interleaved timing,
peak memory and the machine description printed with every figure.

Timing protocol: every variant is warmed up, then the variants are run *interleaved* (A B C A B C ...)
for ``--repeats`` rounds, so that a load change on a shared machine hits all of them alike; a figure
is the median over rounds, and a ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Benchmark-only dependencies (torchattacks) live in an ignored folder, never in the project's environment:
#   pip install --target .bench-deps torchattacks scipy --no-deps
BENCH_DEPS = REPO / ".bench-deps"
if BENCH_DEPS.is_dir() and str(BENCH_DEPS) not in sys.path:
    sys.path.append(str(BENCH_DEPS))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import hf_csr  # noqa: E402,F401  (registers the timm backbones)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small width and batch: a few minutes on a CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step")
    parser.add_argument("--width", type=int, default=None, help="PreAct-ResNet18 width (64 = the real network)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all on GPU runs, 1 on CPU)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU runs)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


#: Sizes of the training-step benchmarks (bench_step, bench_released): PreAct-ResNet18 width and batch.
STEP_PRESETS = dict(
    quick=dict(width=16, batch_size=32, repeats=5, warmup=1),
    full=dict(width=64, batch_size=128, repeats=10, warmup=2),
)


def finish_args(args: argparse.Namespace, *, quick: Dict, full: Dict) -> argparse.Namespace:
    """Fill the unset sizes from the quick or full preset; choose the device and thread count; keep the
    libraries' own logging to warnings and errors (the benchmark prints its figures itself)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("hf_csr").setLevel(logging.WARNING)
    preset = quick if args.quick else full
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.device = pick_device(args.device)
    if args.threads is None and args.device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto).")
    return device


def machine() -> Dict[str, object]:
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def make_model(num_classes: int, width: int, device: torch.device, channels_last: bool = False):
    """A randomly initialised PreAct-ResNet18 (``RobustImageClassifier``; width 64 = the real network)."""
    torch.manual_seed(0)
    model = hf_csr.create_robust_classifier("preact_resnet18", num_classes=num_classes, width=width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_data(n: int, num_classes: int, device: Optional[torch.device] = None, seed: int = 0, size: int = 32):
    """``n`` random CIFAR-sized images in [0, 1] whose labels cover every class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


def make_dataset(n: int, num_classes: int, seed: int = 0):
    from hf_csr.data import TensorImageDataset

    x, y = make_data(n, num_classes, seed=seed)
    return TensorImageDataset((x * 255).round().to(torch.uint8), y, [f"c{i}" for i in range(num_classes)])


class Logits(torch.nn.Module):
    """``model`` returning a plain logits tensor, with the per-forward input range check off (the
    attacks keep their iterates in [0, 1]); used for every attack library alike."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from hf_csr.utils import as_logits, inputs_prevalidated

        with inputs_prevalidated():
            return as_logits(self.model(x))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Dict[str, Callable[[], object]], *, warmup: int, repeats: int, device: torch.device,
                progress: bool = True) -> Dict[str, List[float]]:
    """Seconds per call of every function, measured in interleaved rounds (order rotated every round)
    after ``warmup`` calls each."""
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        if progress:
            print(f"  warmed up {name}", flush=True)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        # rotate the order every round: no variant always runs first (or right after a given other one)
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        if progress:
            print(f"  round {round_ + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def paired_ratio(num: List[float], den: List[float]) -> float:
    """Median over rounds of num/den (each round's two runs saw about the same machine load)."""
    return statistics.median(a / b for a, b in zip(num, den))


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch during ``fn()`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the torch profiler's allocation events
    (``profile_memory=True``), summed in time order; the peak of that running sum.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every op's *self* allocations minus frees (children excluded, so nothing is counted twice), and
    # the "[memory]" events of frees outside any op, in time order: a running total of live bytes.
    events = [(e.time_range.start, e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage)
              for e in prof.events()]
    events.sort(key=lambda item: item[0])
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def report(title: str, args: argparse.Namespace, info: Dict[str, object], rows: List[Dict[str, object]],
           targets: List[str]) -> None:
    """Print the figures (and write them as JSON with ``--json``)."""
    info = {**info, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    print(f"\n== {title} ==")
    print(f"machine: {info}")
    settings = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    print(f"settings: {settings}")
    for row in rows:
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    for line in targets:
        print("  " + line)
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "machine": info, "settings": settings, "rows": rows,
                                               "targets": targets}, indent=2))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def temp_dir() -> str:
    return tempfile.mkdtemp(prefix="hf_csr_bench_")
