"""PGD-10 adversarial-training throughput (images/s) of CSRTrainer: fp32 eager vs bf16 + channels_last
(vs + torch.compile), and the CSR(ema)/base step ratio at that size. Meant for a GPU (issue item 5)::

    python benchmarks/bench_throughput.py --model wrn28_10_ddpm --batch-size 128

On a CPU, ``--quick`` runs a tiny WRN-10-1 in fp32 and bf16 only (a smoke test of the script, not a figure;
add ``--compile`` to include the compiled variant, which needs a C++ compiler on a CPU).
"""

from __future__ import annotations


import _common as C  # noqa: N812
import torch
from bench_step import make_step

from hf_csr import CSRTrainer, CSRTrainingArguments, create_robust_classifier


def build(args, method: str, bf16: bool, channels_last: bool, compile_model: bool):
    torch.manual_seed(0)
    kwargs = dict(depth=args.depth, width=args.width) if args.depth else {}
    model = create_robust_classifier(args.model, num_classes=10, **kwargs).to(args.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    training = CSRTrainingArguments(
        output_dir=C.temp_dir(), base_loss=args.base_loss, fairness_method=method,
        per_device_train_batch_size=args.batch_size, use_cpu=args.device.type == "cpu", bf16=bf16,
        report_to="none", disable_tqdm=True, save_strategy="no", logging_strategy="no", learning_rate=0.01,
        seed=0, augment=False,
    )
    trainer = CSRTrainer(model=model, args=training, train_dataset=C.make_dataset(10, 10, seed=1))
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1
    if compile_model:
        # what --torch_compile does through accelerate: the attacks use the same compiled module
        trainer.model = trainer.model_wrapped = torch.compile(trainer.model)
    return trainer


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn28_10_ddpm", help="timm backbone (after `import hf_csr`)")
    parser.add_argument("--depth", type=int, default=None, help="WideResNet depth override (quick runs)")
    parser.add_argument("--base-loss", default="pgd", choices=["pgd", "trades"])
    parser.add_argument("--compile", action="store_true", help="include bf16 + channels_last + torch.compile")
    args = C.finish_args(
        parser.parse_args(),
        quick=dict(width=1, depth=10, batch_size=16, repeats=3, warmup=1),
        full=dict(width=None, depth=None, batch_size=128, repeats=10, warmup=3),
    )
    if args.width is None:
        args.width = 10  # WRN-28-10 / the backbone's own width
    info = C.machine()
    x, y = C.make_data(args.batch_size, 10, args.device, seed=2)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    bf16_ok = args.device.type == "cpu" or torch.cuda.is_bf16_supported()
    variants = {"fp32_eager": (False, False, False)}
    if bf16_ok:
        variants["bf16_channels_last"] = (True, True, False)
        if args.compile or (args.device.type == "cuda" and not args.quick):
            variants["bf16_channels_last_compile"] = (True, True, True)
    fns = {}
    for name, (bf16, cl, comp) in variants.items():
        inputs = {"pixel_values": x_cl if cl else x, "labels": y}
        fns[name] = make_step(build(args, "csr", bf16, cl, comp), inputs)
    best = list(variants)[-1]
    bf16, cl, comp = variants[best]
    fns[f"{best}_base"] = make_step(build(args, "none", bf16, cl, comp), {"pixel_values": x_cl if cl else x, "labels": y})
    times = C.interleaved(fns, warmup=args.warmup, repeats=args.repeats, device=args.device)
    rows = [{"variant": name, "step_s": C.median(t), "images_per_s": args.batch_size / C.median(t)}
            for name, t in times.items()]
    ratio = C.paired_ratio(times[best], times[f"{best}_base"])
    targets = [f"CSR(ema)/base step ratio ({best}): {ratio:.3f}"]
    if "bf16_channels_last" in times:
        targets.append(f"bf16 + channels_last speed-up over fp32 eager: "
                       f"{C.paired_ratio(times['fp32_eager'], times['bf16_channels_last']):.3f}")
    C.report(f"bench_throughput: {args.model} PGD-10 adversarial training", args, info, rows, targets)


if __name__ == "__main__":
    main()
