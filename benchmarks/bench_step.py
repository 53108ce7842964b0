"""(a) CSR step time / base step time and (e) peak memory of a CSR step / a base step.

Times the real training path: ``CSRTrainer.training_step`` (augmentation, the PGD-10 attack, the
forward passes, the base loss, the confusion update, Psi, ``accelerator.backward``) followed by the
optimizer step, for ``pgd`` and ``trades``, K = 10 and K = 200 classes, and three trainers each:

* ``base``  -- ``fairness_method="none"`` (plain PGD-AT / TRADES);
* ``ema``   -- CSR with the ``ema`` confusion source;
* ``epoch`` -- CSR with the ``epoch`` source: its step, plus its confusion pass (PGD-10 over the
  training set before every epoch) amortised over the epoch. The pass is timed on a few batches
  and charged per image: amortised step = step + batch_size x (pass seconds per image).

Run (CPU, a few minutes)::

    python benchmarks/bench_step.py --quick

Full size (PreAct-ResNet18 width 64, batch 128; meant for a GPU)::

    python benchmarks/bench_step.py [--bf16] [--channels-last]
"""

from __future__ import annotations


import _common as C  # noqa: N812
import torch

from hf_csr import CSRTrainer, CSRTrainingArguments, csr_penalty


def make_trainer(args, base_loss: str, num_classes: int, method: str, source: str = "ema", pass_images: int = 0,
                 augment: bool = True):
    model = C.make_model(num_classes, args.width, args.device, args.channels_last)
    training = CSRTrainingArguments(
        output_dir=C.temp_dir(), base_loss=base_loss, fairness_method=method,
        **({"csr_confusion_source": source} if method == "csr" else {}),
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        use_cpu=args.device.type == "cpu", bf16=args.bf16, report_to="none", disable_tqdm=True,
        save_strategy="no", logging_strategy="no", learning_rate=0.01, seed=0, augment=augment,
    )
    # The training set must hold every class; the epoch source's pass runs over it.
    dataset = C.make_dataset(max(pass_images, num_classes), num_classes, seed=1)
    trainer = CSRTrainer(model=model, args=training, train_dataset=dataset)
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    return trainer


def make_step(trainer, inputs):
    model = trainer.model

    def step():
        model.train()
        trainer._micro_step = 0  # what the step-begin callback does
        loss = trainer.training_step(model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        return loss

    return step


def csr_overhead(trainer, batch_size: int, num_classes: int, device, repeats: int = 50) -> float:
    """Median seconds of the work CSR adds to a step, alone: the confusion update (counts, all-reduce
    hook, EMA), the spectral weights (SVD or power iteration) and Psi with its backward to the logits."""
    args = trainer.args
    logits = torch.randn(batch_size, num_classes, device=device, requires_grad=True)
    labels = torch.arange(batch_size, device=device) % num_classes

    def work():
        csr = trainer.fairness
        stats = csr.confusion.update(logits.detach(), labels, validate=False)
        psi = csr_penalty(logits, labels, csr.confusion.weights(), variant=csr.config.variant, gamma=csr.config.gamma,
                          class_counts=stats.class_counts, num_examples=stats.num_examples, validate=False)
        psi.backward()

    return C.median(C.interleaved({"csr": work}, warmup=3, repeats=repeats, device=device, progress=False)["csr"])


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--losses", default="pgd,trades")
    parser.add_argument("--classes", default="10,200")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only time CSR's own per-step work in isolation (no noise from the attack)")
    args = C.finish_args(parser.parse_args(), **C.STEP_PRESETS)
    info = C.machine()
    rows, targets = [], []
    pass_images = 2 * args.batch_size
    for base_loss in args.losses.split(","):
        for k in map(int, args.classes.split(",")):
            print(f"{base_loss}, K={k}", flush=True)
            x, y = C.make_data(args.batch_size, k, args.device, seed=2)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            inputs = {"pixel_values": x, "labels": y}
            trainers = {
                "base": make_trainer(args, base_loss, k, "none"),
                "ema": make_trainer(args, base_loss, k, "csr", "ema"),
                "epoch": make_trainer(args, base_loss, k, "csr", "epoch", pass_images=pass_images),
            }
            overhead = csr_overhead(trainers["ema"], args.batch_size, k, args.device)
            if args.overhead_only:
                rows.append({"loss": base_loss, "K": k, "csr_work_ms": overhead * 1e3})
                print(rows[-1], flush=True)
                continue
            epoch_trainer = trainers["epoch"]
            epoch_trainer.fairness.run_confusion_pass(0)  # a real (non-zero) C for the epoch-source steps
            fns = {name: make_step(t, inputs) for name, t in trainers.items()}
            fns["epoch_pass"] = lambda: epoch_trainer.fairness.run_confusion_pass(1)
            times = C.interleaved(fns, warmup=args.warmup, repeats=args.repeats, device=args.device)
            pass_size = len(epoch_trainer.train_dataset)  # max(2 x batch, K) images
            per_image_pass = [t / pass_size for t in times["epoch_pass"]]
            amortised = [s + args.batch_size * p for s, p in zip(times["epoch"], per_image_pass)]
            row = {
                "loss": base_loss, "K": k,
                "base_s": C.median(times["base"]), "ema_s": C.median(times["ema"]),
                "epoch_step_s": C.median(times["epoch"]), "epoch_amortised_s": C.median(amortised),
                "ratio_ema": C.paired_ratio(times["ema"], times["base"]),
                "ratio_epoch_step": C.paired_ratio(times["epoch"], times["base"]),
                "ratio_epoch_amortised": C.paired_ratio(amortised, times["base"]),
                "csr_work_ms": overhead * 1e3, "csr_work_bound": 1 + overhead / C.median(times["base"]),
            }
            if not args.no_memory:
                peaks = {name: C.peak_memory(fns[name], args.device) for name in ("base", "ema", "epoch")}
                row.update({
                    "peak_base_MiB": peaks["base"] / 2**20, "peak_ema_MiB": peaks["ema"] / 2**20,
                    "mem_ratio_ema": peaks["ema"] / peaks["base"], "mem_ratio_epoch": peaks["epoch"] / peaks["base"],
                })
            rows.append(row)
            print(row, flush=True)
    if args.overhead_only:
        C.report("bench_step: CSR's own work per step", args, info, rows, targets)
        return
    worst = max(r["ratio_ema"] for r in rows)
    targets.append(f"target (a) CSR(ema)/base <= 1.03: worst {worst:.3f} -> {'HOLDS' if worst <= 1.03 else 'MISSED'}")
    if not args.no_memory:
        worst_mem = max(max(r["mem_ratio_ema"], r["mem_ratio_epoch"]) for r in rows)
        targets.append(f"target (e) peak memory CSR/base <= 1.05: worst {worst_mem:.3f} -> "
                       f"{'HOLDS' if worst_mem <= 1.05 else 'MISSED'}")
    C.report("bench_step: CSR step / base step", args, info, rows, targets)


if __name__ == "__main__":
    main()
