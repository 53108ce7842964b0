"""The Fashion-MNIST reproduction of the paper's Table 3 and a small Table 6 sweep (``recipes/reproduce_fashion_mnist.py``).

Every run goes through the runner, :func:`hf_csr.experiment.run`, with one
:class:`~hf_csr.experiment.ExperimentArguments` and one :class:`~hf_csr.CSRTrainingArguments` built here
(:func:`run_arguments`); its output directory is the run folder
``<output_dir>/<dataset>/<method>/seed<k>/``, which receives what the runner writes (``model.safetensors``,
``results.json`` and the plots for the final weights, ``best/`` for the weights of the epoch that did best
on the held-out validation split, ``extra_eval/`` for standard AutoAttack on a fixed 1,000-image subset) and,
last, ``run.json`` (method, seed, settings, training-class counts, wall time). A run whose ``run.json``
exists is skipped; an interrupted one resumes from its last epoch checkpoint (the checkpoints are deleted
once ``run.json`` is written).

Paired design: for a given seed, every method starts from the same initial weights (the runner seeds before
building the model) and sees the same data in the same order (the Trainer's sampler is seeded by the same
seed); the validation split, the long tail and the test subsets are drawn with seed 0, the same for all runs.

Presets (:data:`SIZES`; estimated wall times on this machine's 2 CPU cores, measured per epoch and per
evaluated image on smoke runs, see REPRODUCTION.md):

* ``quick``: a smoke test of the whole pipeline (minutes per run; every number it gives is noise).
* ``power`` (issue 19): the full 60,000-image training set less a 1,000-image validation split, 10
  epochs (lr 0.1, x0.1 at 50% and 75%), PGD-10 at eps 0.1, a PreAct-ResNet18 of width 8; the final and the
  best weights are evaluated with APGD-CE + APGD-T at their standard iterations on the full 10,000-image
  test set (1,000 per class), plus standard AutoAttack on a fixed 1,000-image class-balanced subset.
* ``sweep``: the Table 6 sweep's smaller budget (:data:`SWEEP`): 20,000 training images, 5 epochs,
  APGD-CE + APGD-T on 2,000 test images, 2 seeds, balanced set only.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["METHODS", "BASELINES", "CSR_METHODS", "RELEASED_CSR", "SWEEP", "DATASETS", "ReproductionSettings",
           "QUICK", "POWER", "SWEEP_SETTINGS", "SIZES", "run_arguments", "run_one", "run_reproduction", "run_dir_for",
           "train_method", "estimate_seconds", "estimate_table", "settings_table", "override"]

logger = logging.getLogger(__name__)

_CSR = dict(base_loss="trades", fairness_method="csr", csr_alpha=0.3, csr_gamma=0.1)

# Table 3's rows, each with the base loss of its published version; CSR in the four combinations of its
# variant (docs/method.md: `reference` = the released code, `paper` = the paper's formula) and the source of its
# confusion estimate (`epoch`: the released pass over the training set at each epoch start; `ema`: a running
# estimate from the training batches, free).
METHODS: Dict[str, Dict[str, Any]] = {
    "PGD-AT": dict(base_loss="pgd", fairness_method="none"),
    "TRADES": dict(base_loss="trades", fairness_method="none"),
    "FRL-RWRM (TRADES)": dict(base_loss="trades", fairness_method="frl", frl_tau_clean=0.05, frl_tau_boundary=0.05),
    "FAAL (AT)": dict(base_loss="pgd", fairness_method="faal"),
    "CFA (TRADES)": dict(base_loss="trades", fairness_method="cfa"),
    "WAT (TRADES)": dict(base_loss="trades", fairness_method="wat"),
    "CSR reference/epoch": dict(_CSR, csr_variant="reference", csr_confusion_source="epoch"),
    "CSR paper/epoch": dict(_CSR, csr_variant="paper", csr_confusion_source="epoch"),
    "CSR reference/ema": dict(_CSR, csr_variant="reference", csr_confusion_source="ema"),
    "CSR paper/ema": dict(_CSR, csr_variant="paper", csr_confusion_source="ema"),
}
BASELINES = ("PGD-AT", "TRADES", "FRL-RWRM (TRADES)", "FAAL (AT)", "CFA (TRADES)", "WAT (TRADES)")
CSR_METHODS = tuple(m for m in METHODS if m.startswith("CSR"))
RELEASED_CSR = "CSR reference/epoch"  # the released algorithm


def _sweep_methods() -> Dict[str, Dict[str, Any]]:
    """Table 6's grid with the released algorithm (reference variant, epoch pass): alpha at gamma 0.1, gamma at alpha 0.3."""
    grid = [(a, 0.1) for a in (0.0, 0.1, 0.2, 0.3, 0.4)] + [(0.3, g) for g in (0.0, 0.2)]
    return {f"CSR alpha={a:g} gamma={g:g}": dict(METHODS[RELEASED_CSR], csr_alpha=a, csr_gamma=g) for a, g in grid}


SWEEP: Dict[str, Dict[str, Any]] = _sweep_methods()
DATASETS = ("fashion_mnist", "fashion_mnist_lt")


@dataclass
class ReproductionSettings:
    """The budget shared by every method of a preset."""

    name: str
    epochs: int
    train_examples: Optional[int] = None  # class-balanced subset of the 60k training images (None: all), seed 0
    eval_examples: Optional[int] = None  # class-balanced subset of the 10k test images (None: all), seed 0
    batch_size: int = 128
    learning_rate: float = 0.1
    model: str = "mlp_tiny"  # a registered timm model (hf_csr.models): the MLP 784-512-256-256-10, or preact_resnet_tiny
    width: Optional[int] = None  # preact_resnet_tiny only: base width (64 in the paper's CIFAR model)
    num_blocks: Optional[Sequence[int]] = None  # preact_resnet_tiny only: blocks per stage
    crop_padding: int = 0  # random crops (0: none; an MLP gains nothing from translations)
    attack_eps: float = 0.1  # the usual Linf budget on Fashion-MNIST
    attack_steps: int = 10
    eval_attacks: str = "clean,autoattack:apgd-ce+apgd-t"  # AutoAttack's APGD-CE and APGD-T at their own iterations
    extra_eval: Optional[str] = "autoattack@1000"  # standard AutoAttack on a fixed balanced subset (masking check)
    extra_eval_seeds: Optional[Sequence[int]] = (0,)  # the seeds whose runs get the check (None: every seed)
    extra_eval_on: str = "best"  # the checkpoint the check evaluates (the reported one; shared when best = final)
    validation_size: Optional[int] = 1000
    validation_attack: str = "pgd10"
    fairness_val_size: int = 500
    seeds: Sequence[int] = (0, 1, 2)
    long_tail_ratio: float = 100.0
    max_steps: Optional[int] = None  # smoke runs only
    eval_batch_size: int = 500
    datasets: Sequence[str] = DATASETS

    def milestones(self) -> str:
        """The paper's schedule (x0.1 at 50% and 75% of training), in epochs."""
        return f"{self.epochs * 0.5:g},{self.epochs * 0.75:g}"


    def backbone_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {}
        if self.width is not None:
            kwargs["width"] = self.width
        if self.num_blocks is not None:
            kwargs["num_blocks"] = list(self.num_blocks)
        return kwargs


QUICK = ReproductionSettings(
    name="quick", epochs=2, train_examples=2000, eval_examples=300, batch_size=64, learning_rate=0.05,
    model="preact_resnet_tiny", width=8, num_blocks=(1, 1, 1, 1), crop_padding=2,
    attack_steps=3, eval_attacks="clean,pgd20", extra_eval="autoattack:apgd-ce@100", extra_eval_seeds=None,
    extra_eval_on="both", validation_size=200, validation_attack="pgd5", fairness_val_size=100,
)
# Sized for power on 2 CPU cores: the MLP (about 0.05 ms per image forward+backward, a tenth of preact_resnet_tiny),
# the whole training set, 6 epochs (PGD-AT's worst class is then well above zero), 3,000 test images (300 per class).
POWER = ReproductionSettings(name="power", epochs=6, eval_examples=3000)
SWEEP_SETTINGS = ReproductionSettings(
    name="sweep", epochs=6, eval_examples=2000, extra_eval=None, seeds=(0, 1), datasets=("fashion_mnist",),
)
SIZES = {"quick": QUICK, "power": POWER, "sweep": SWEEP_SETTINGS}


def method_flags(method: str, settings: ReproductionSettings) -> Dict[str, Any]:
    """The training flags of ``method`` (from :data:`METHODS` or :data:`SWEEP`) plus the run-size settings its
    fairness method takes (the size of its own validation split)."""
    from hf_csr.fairness.registry import config_flags, get_fairness_method

    table = {**METHODS, **SWEEP}
    if method not in table:
        raise ValueError(f"method must be one of {list(table)}; got {method!r}.")
    values = dict(table[method])
    flags = set(config_flags(get_fairness_method(values["fairness_method"])).values())
    if "fairness_val_size" in flags:
        values["fairness_val_size"] = settings.fairness_val_size
    return values


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in text).strip("_")


def run_dir_for(output_dir, dataset: str, method: str, seed: int) -> Path:
    return Path(output_dir) / dataset / _slug(method) / f"seed{seed}"


def run_arguments(dataset: str, method: str, seed: int, settings: ReproductionSettings, run_dir):
    """The runner's (ExperimentArguments, CSRTrainingArguments) for one run."""
    import torch

    from hf_csr.configuration import CSRTrainingArguments
    from hf_csr.experiment import ExperimentArguments

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}; got {dataset!r}.")
    extra_eval = settings.extra_eval
    if settings.extra_eval_seeds is not None and seed not in settings.extra_eval_seeds:
        extra_eval = None
    experiment = ExperimentArguments(
        model=settings.model, backbone_kwargs=settings.backbone_kwargs() or None,
        dataset="fashion_mnist", train_limit=settings.train_examples, eval_limit=settings.eval_examples, subset_seed=0,
        final_eval_attacks=settings.eval_attacks, eval_batch_size=settings.eval_batch_size,
        long_tail_ratio=settings.long_tail_ratio if dataset == "fashion_mnist_lt" else None,
        validation_size=settings.validation_size, validation_attack=settings.validation_attack,
        extra_eval=extra_eval, extra_eval_on=settings.extra_eval_on,
    )
    training = CSRTrainingArguments(
        output_dir=str(run_dir), num_train_epochs=settings.epochs, max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=settings.eval_batch_size,
        learning_rate=settings.learning_rate, lr_milestones=settings.milestones(), attack_eps=settings.attack_eps,
        attack_steps=settings.attack_steps, horizontal_flip=False, crop_padding=settings.crop_padding, save_strategy="epoch",
        save_total_limit=1, resume_from_checkpoint="last", logging_steps=50, disable_tqdm=True, report_to="none",
        seed=seed, use_cpu=not torch.cuda.is_available(), **method_flags(method, settings),
    )
    return experiment, training


def _train_class_counts(experiment) -> List[int]:
    from hf_csr.data.sources import load_image_dataset
    from hf_csr.selection import split_training_set

    train = load_image_dataset(experiment.dataset, experiment.train_split, limit=experiment.train_limit,
                               seed=experiment.subset_seed)
    train, _ = split_training_set(train, validation_size=experiment.validation_size,
                                  long_tail_ratio=experiment.long_tail_ratio)
    return [int((train.labels == c).sum()) for c in range(len(train.class_names))]


def run_one(dataset: str, method: str, seed: int, settings: ReproductionSettings, run_dir) -> Dict[str, Any]:
    """Train and evaluate one (dataset, method, seed) through the runner; writes ``run.json`` last."""
    import torch

    from hf_csr.experiment import run
    from hf_csr.utils import atomic_write_json

    run_dir = Path(run_dir)
    start = time.time()
    experiment, training = run_arguments(dataset, method, seed, settings, run_dir)
    results = run(experiment, training)
    record = {"dataset": dataset, "method": method, "seed": seed, "settings": asdict(settings),
              "flags": method_flags(method, settings), "train_class_counts": _train_class_counts(experiment),
              "best_epoch": (results.get("best") or {}).get("selection", {}).get("best_epoch"),
              "seconds": time.time() - start, "torch_threads": torch.get_num_threads()}
    atomic_write_json(run_dir / "run.json", record)
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)  # the run is complete: its resume points are no longer needed
    logger.info("%s / %s / seed %d done in %.0f s", dataset, method, seed, record["seconds"])
    return record


def train_method(dataset: str, method: str, seed: int, settings: ReproductionSettings, run_dir):
    """Run (or reuse) one run and return its final model (for the analyses)."""
    from hf_csr.models import RobustImageClassifier

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        run_one(dataset, method, seed, settings, run_dir)
    return RobustImageClassifier.from_pretrained(str(run_dir)).eval()


CLAIM = ".claimed"


def _claim(run_dir: Path) -> bool:
    """Mark ``run_dir`` as taken by this process (an exclusive create of ``run_dir/.claimed`` holding the pid);
    False when another live process on this machine holds it. A claim whose process is gone is taken over."""
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text(encoding="utf-8").strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return True
            try:
                if pid > 0:
                    os.kill(pid, 0)
                    return False  # alive: another process is on this run
            except ProcessLookupError:
                pass
            except PermissionError:
                return False
            path.unlink(missing_ok=True)  # a stale claim (its process died)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def run_reproduction(output_dir, settings: ReproductionSettings, *, datasets: Optional[Sequence[str]] = None,
                     methods: Sequence[str] = tuple(METHODS), seeds: Optional[Sequence[int]] = None,
                     max_runs: Optional[int] = None) -> List[Path]:
    """Run every missing (dataset, method, seed) -- seed-major, so a stopped reproduction has all methods of the
    first seeds -- and return the run folders. ``max_runs`` stops after that many new runs (a session's piece).

    Several processes may work on the same ``output_dir`` (e.g. one per core, with the seeds in different orders):
    each claims a run before starting it (``<run>/.claimed``) and skips runs another live process has claimed."""
    seeds = list(settings.seeds if seeds is None else seeds)
    done, new = [], 0
    for dataset in (settings.datasets if datasets is None else datasets):
        for seed in seeds:
            for method in methods:
                run_dir = run_dir_for(output_dir, dataset, method, seed)
                if (run_dir / "run.json").is_file():
                    logger.info("skipping %s / %s / seed %d: %s exists", dataset, method, seed, run_dir / "run.json")
                elif max_runs is not None and new >= max_runs:
                    logger.info("stopping after %d new run(s) (max_runs); rerun the command to continue", new)
                    return done
                elif not _claim(run_dir):
                    logger.info("skipping %s / %s / seed %d: another process is running it", dataset, method, seed)
                    continue
                else:
                    try:
                        run_one(dataset, method, seed, settings, run_dir)
                    finally:
                        (run_dir / CLAIM).unlink(missing_ok=True)
                    new += 1
                done.append(run_dir)
    return done


def override(settings: ReproductionSettings, **changes) -> ReproductionSettings:
    """``settings`` with some fields changed (the name marked with ``*``)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return replace(settings, name=f"{settings.name}*", **changes) if changes else settings


def parse_list(text: Optional[str], known: Sequence[str], what: str) -> Optional[List[str]]:
    """A comma-separated subset of ``known`` (None stays None)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = sorted(set(items) - set(known))
    if bad:
        raise ValueError(f"{what}: unknown {bad}; choose from {list(known)}.")
    return items


def read_json(path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def settings_table(presets: Sequence[ReproductionSettings]) -> str:
    """The presets side by side, as markdown."""
    keys = ("model", "width", "num_blocks", "epochs", "train_examples", "eval_examples", "validation_size", "batch_size",
            "learning_rate", "crop_padding", "attack_steps", "eval_attacks", "extra_eval", "extra_eval_seeds",
            "extra_eval_on", "seeds", "datasets")
    lines = ["| setting | " + " | ".join(p.name for p in presets) + " |", "| --- |" + " --- |" * len(presets)]
    for key in keys:
        cells = []
        for p in presets:
            value = getattr(p, key)
            value = "all" if value is None and key in ("train_examples", "eval_examples", "extra_eval_seeds") else value
            value = "-" if value is None and key in ("width", "num_blocks") else value
            value = ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            cells.append(f"`{value}`" if isinstance(value, str) and key in ("eval_attacks", "extra_eval") else str(value))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- wall-time estimates
FASHION_MNIST_TRAIN_PER_CLASS = 6000
FASHION_MNIST_TEST = 10000


def _train_size(settings: ReproductionSettings, dataset: str) -> int:
    per_class = (settings.train_examples or 10 * FASHION_MNIST_TRAIN_PER_CLASS) // 10 - (settings.validation_size or 0) // 10
    if dataset == "fashion_mnist_lt":  # exponential subsampling: n_max * sum_c ratio^(-c/9)
        return int(sum(per_class * settings.long_tail_ratio ** (-c / 9) for c in range(10)))
    return 10 * per_class


def _attack_units(attacks: str, examples: int, robust: float) -> float:
    """Forward-backward passes per evaluation: PGD-k = k; APGD-CE = 100 on every image, APGD-T = 9 targets x 100 on
    the images still robust; standard AutoAttack adds FAB-T (about 2 x 9 x 100) and Square (5,000 forwards,
    about a third of a forward-backward each) on the robust ones."""
    import re

    units = float(examples)  # the clean pass
    for name in [a for a in attacks.split(",") if a.strip()]:
        name = name.strip()
        match = re.fullmatch(r"(pgd|cw)(\d+)", name)
        if match:
            units += examples * int(match.group(2))
        elif name == "autoattack":
            units += examples * (100 + robust * (900 + 1800 + 5000 / 3))
        elif name.startswith("autoattack:"):
            parts = name.split(":", 1)[1].split("+")
            units += examples * (100 * ("apgd-ce" in parts) + robust * 900 * ("apgd-t" in parts))
    return units


def estimate_seconds(settings: ReproductionSettings, method: str, dataset: str, *, ms_per_unit: float = 1.0,
                     robust: Optional[float] = None) -> Dict[str, float]:
    """Estimated wall time of one run, in seconds, by part: the passes a run makes (one unit = one image's forward +
    backward through the preset's model) times ``ms_per_unit``. ``robust``: the share of test images APGD-CE leaves
    robust (default 0.6 balanced, 0.3 long-tailed, from the earlier runs). The runner's PGD-k training step costs
    k + 2 units (TRADES included); CSR's ``epoch`` pass adds PGD-10 over the training set every epoch."""
    robust = (0.6 if dataset == "fashion_mnist" else 0.3) if robust is None else robust
    n_train = _train_size(settings, dataset)
    epochs = settings.epochs if settings.max_steps is None else settings.max_steps * settings.batch_size / n_train
    flags = method_flags(method, settings)
    train = epochs * n_train * (settings.attack_steps + 2)
    if flags.get("csr_confusion_source") == "epoch":
        train += epochs * n_train * 11
    if "fairness_val_size" in flags:
        train += epochs * settings.fairness_val_size * 11
    validation = epochs * (settings.validation_size or 0) * (int(settings.validation_attack[3:]) + 1)
    n_test = settings.eval_examples or FASHION_MNIST_TEST
    checkpoints = 2 if settings.validation_size else 1
    evaluation = checkpoints * _attack_units(settings.eval_attacks, n_test, robust)
    if settings.extra_eval:  # on the chosen checkpoint(s), for the chosen seeds (spread over the seeds)
        attacks, examples = settings.extra_eval.rsplit("@", 1)
        share = 1.0 if settings.extra_eval_seeds is None else len(set(settings.extra_eval_seeds) & set(settings.seeds)) / len(settings.seeds)
        on = checkpoints if settings.extra_eval_on == "both" else 1
        evaluation += on * share * _attack_units(attacks, int(examples), robust)
    scale = ms_per_unit / 1000.0
    return {"train": (train + validation) * scale, "evaluation": evaluation * scale,
            "total": (train + validation + evaluation) * scale}


def estimate_table(settings: ReproductionSettings, methods: Sequence[str], *, ms_per_unit: float = 1.0) -> str:
    """Per (dataset, method): minutes per run (training / evaluation / total) and the preset's hours over its seeds."""
    lines = ["| dataset | method | training (min) | evaluation (min) | run (min) | x seeds (h) |",
             "| --- | --- | --- | --- | --- | --- |"]
    grand = 0.0
    for dataset in settings.datasets:
        for method in methods:
            e = estimate_seconds(settings, method, dataset, ms_per_unit=ms_per_unit)
            total = e["total"] * len(settings.seeds) / 3600
            grand += total
            lines.append(f"| {dataset} | {method} | {e['train'] / 60:.1f} | {e['evaluation'] / 60:.1f} | "
                         f"{e['total'] / 60:.1f} | {total:.2f} |")
    lines.append(f"| all | {len(methods)} methods x {len(settings.seeds)} seeds | | | | **{grand:.1f}** |")
    return "\n".join(lines)


def calibrate_ms_per_unit(settings: ReproductionSettings, *, batch_size: int = 128, repeats: int = 10) -> float:
    """Milliseconds per image forward + backward through the preset's model on this machine now (batch
    ``batch_size``, training mode, input gradients as an attack needs them): the unit of :func:`estimate_seconds`."""
    import torch

    from hf_csr.data import FASHION_MNIST_CLASSES
    from hf_csr.models import create_robust_classifier

    model = create_robust_classifier(settings.model, class_names=FASHION_MNIST_CLASSES, num_channels=1, image_size=28,
                                     **settings.backbone_kwargs())
    x = torch.rand(batch_size, 1, 28, 28, requires_grad=True)
    y = torch.arange(batch_size) % 10

    def step():
        out = model(x)
        torch.nn.functional.cross_entropy(getattr(out, "logits", out), y).backward()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats / batch_size * 1000.0
