"""The Fashion-MNIST reproduction of the paper's Table 3 (``recipes/reproduce_fashion_mnist.py``).

Every method is trained with the same budget (model, data, epochs, schedule, training attack), for
several seeds, on Fashion-MNIST and on its long-tailed version (exponential subsampling, ratio 100),
then evaluated class by class with AutoAttack on the test set. Each run writes
``<output_dir>/<dataset>/<method>/seed<k>/results.json`` (plus ``run.json`` with its wall time) and is
skipped when that file exists, so an interrupted reproduction continues where it stopped. The table
(mean +- std over the seeds of clean / worst-class clean / AA / worst-class AA accuracy) is written
into ``REPRODUCTION.md``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from hf_csr.utils import atomic_write_json

__all__ = ["METHODS", "DATASETS", "ReproductionSettings", "QUICK", "DEFAULT", "MEDIUM", "FULL", "SIZES", "run_reproduction",
           "summarize", "markdown_table", "write_report"]

logger = logging.getLogger(__name__)

# Table 3's rows, each with the base loss of its published version.
METHODS: Dict[str, Dict[str, Any]] = {
    "PGD-AT": dict(base_loss="pgd", fairness_method="none"),
    "TRADES": dict(base_loss="trades", fairness_method="none"),
    "FRL-RWRM_0.05 (TRADES)": dict(base_loss="trades", fairness_method="frl", frl_tau_clean=0.05, frl_tau_boundary=0.05),
    "FAAL_AT": dict(base_loss="pgd", fairness_method="faal"),
    "CFA_TRADES": dict(base_loss="trades", fairness_method="cfa"),
    "WAT_TRADES": dict(base_loss="trades", fairness_method="wat"),
    # CSR in both variants of docs/method.md: `reference` (the released code: CE scaled by 1 - alpha) and `paper`
    # (J = L + alpha * Psi); the names without a variant are the reference variant.
    "CSR gamma=0.0 (TRADES)": dict(base_loss="trades", fairness_method="csr", csr_variant="reference", csr_alpha=0.3,
                                   csr_gamma=0.0),
    "CSR gamma=0.1 (TRADES)": dict(base_loss="trades", fairness_method="csr", csr_variant="reference", csr_alpha=0.3,
                                   csr_gamma=0.1),
    "CSR paper gamma=0.0 (TRADES)": dict(base_loss="trades", fairness_method="csr", csr_variant="paper",
                                         csr_alpha=0.3, csr_gamma=0.0),
    "CSR paper gamma=0.1 (TRADES)": dict(base_loss="trades", fairness_method="csr", csr_variant="paper",
                                         csr_alpha=0.3, csr_gamma=0.1),
}
DATASETS = ("fashion_mnist", "fashion_mnist_lt")


@dataclass
class ReproductionSettings:
    """The budget shared by every method (``--quick``, ``--size medium`` = the default, ``--size full``).

    ``quick`` and ``medium`` evaluate with AutoAttack's two APGD components at reduced iterations
    (``aa_n_iter``; the column is named accordingly, e.g. ``autoattack:apgd-ce+apgd-t[n_iter=25]``), which
    keeps the default size within a few hours on 2 CPU cores; ``full`` runs the standard AutoAttack (APGD-CE,
    APGD-T, FAB-T, Square) at its own budgets (10-20 minutes per run on a CPU)."""

    name: str
    train_examples: int  # class-balanced subset of the 60k training images (before long-tailing)
    eval_examples: int  # class-balanced subset of the 10k test images
    epochs: int
    batch_size: int = 128
    learning_rate: float = 0.1
    width: int = 16  # PreAct-ResNet18 base width (64 in the paper's CIFAR model)
    num_blocks: Sequence[int] = (2, 2, 2, 2)
    attack_eps: float = 0.1  # the usual Linf budget on Fashion-MNIST
    attack_steps: int = 10
    eval_attacks: str = "autoattack"
    aa_n_iter: Optional[int] = None  # reduced AutoAttack budgets for the smaller presets (None: AutoAttack's own)
    aa_n_queries: Optional[int] = None
    fairness_val_size: int = 500
    seeds: Sequence[int] = (0, 1, 2)
    long_tail_ratio: float = 100.0

    def milestones(self) -> str:
        """The paper's schedule (x0.1 at 50% and 75% of training), in epochs."""
        return f"{self.epochs * 0.5:g},{self.epochs * 0.75:g}"


QUICK = ReproductionSettings(
    name="quick", train_examples=2000, eval_examples=300, epochs=4, batch_size=64, learning_rate=0.05, width=8,
    num_blocks=(1, 1, 1, 1), attack_steps=3, eval_attacks="autoattack:apgd-ce+apgd-t", aa_n_iter=10, fairness_val_size=100,
)
MEDIUM = ReproductionSettings(
    name="medium", train_examples=5000, eval_examples=500, epochs=8, batch_size=64, learning_rate=0.05, width=8,
    num_blocks=(1, 1, 1, 1), attack_steps=5, eval_attacks="autoattack:apgd-ce+apgd-t", aa_n_iter=25, fairness_val_size=200,
)
FULL = ReproductionSettings(
    name="full", train_examples=4000, eval_examples=300, epochs=8, batch_size=64, learning_rate=0.05, width=8,
    num_blocks=(1, 1, 1, 1), attack_steps=5, fairness_val_size=200,
)
SIZES = {"quick": QUICK, "medium": MEDIUM, "full": FULL}
DEFAULT = MEDIUM  # the recipe's default size


def _method_settings(method: str, settings) -> Dict[str, Any]:
    """``METHODS[method]`` plus the run-size settings its fairness method takes (validation size, CSR's source)."""
    from hf_csr.fairness.registry import config_flags, get_fairness_method

    values = dict(METHODS[method])
    flags = set(config_flags(get_fairness_method(values["fairness_method"])).values())
    if "fairness_val_size" in flags:
        values["fairness_val_size"] = settings.fairness_val_size
    if "csr_confusion_source" in flags:
        values.setdefault("csr_confusion_source", "ema")
    return values


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("_")


def load_data(dataset: str, settings: ReproductionSettings, seed: int):
    """(train, test) for ``fashion_mnist`` or ``fashion_mnist_lt`` (the long tail is drawn once, seed 0,
    so every method and seed sees the same long-tailed set)."""
    from hf_csr.data.sampling import long_tail_indices
    from hf_csr.data import load_fashion_mnist

    train = load_fashion_mnist("train", limit=settings.train_examples, seed=0)
    test = load_fashion_mnist("test", limit=settings.eval_examples, seed=0)
    if dataset == "fashion_mnist_lt":
        indices = long_tail_indices(train.labels.numpy(), ratio=settings.long_tail_ratio, seed=0)
        train = train.subset(indices, name=f"{train.name}[long-tail {settings.long_tail_ratio:g}]")
    elif dataset != "fashion_mnist":
        raise ValueError(f"dataset must be one of {list(DATASETS)}; got {dataset!r}.")
    return train, test


def train_method(dataset: str, method: str, seed: int, settings: ReproductionSettings, output_dir):
    """Train ``method`` on ``dataset`` with the budget of ``settings``; returns (trainer, train set, test set)."""
    from hf_csr.configuration import CSRTrainingArguments
    from hf_csr.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from hf_csr.models import create_robust_classifier
    from hf_csr.trainer import CSRTrainer

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}; got {method!r}.")
    train, test = load_data(dataset, settings, seed)
    torch.manual_seed(seed)
    model = create_robust_classifier(
        "preact_resnet18", class_names=train.class_names, num_channels=1, image_size=28, mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD, width=settings.width, num_blocks=tuple(settings.num_blocks),
        threat_model={"norm": "Linf", "eps": settings.attack_eps},
    )
    args = CSRTrainingArguments(
        output_dir=str(Path(output_dir) / "trainer"), num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        lr_milestones=settings.milestones(), attack_eps=settings.attack_eps, attack_steps=settings.attack_steps,
        horizontal_flip=False, crop_padding=2, save_strategy="no",
        logging_steps=50, disable_tqdm=True, seed=seed, use_cpu=not torch.cuda.is_available(),
        **_method_settings(method, settings),
    )
    trainer = CSRTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    return trainer, train, test


def robust_attacks(settings: ReproductionSettings):
    """The evaluation attacks of ``settings`` (AutoAttack with the preset's reduced budgets, if any)."""
    import dataclasses

    from hf_csr.evaluation.specs import AutoAttackConfig, parse_attacks

    attacks = parse_attacks(settings.eval_attacks)[1:]  # without the leading clean
    return [dataclasses.replace(a, n_iter=settings.aa_n_iter or a.n_iter, n_queries=settings.aa_n_queries or a.n_queries)
            if isinstance(a, AutoAttackConfig) else a for a in attacks]


def run_one(dataset: str, method: str, seed: int, settings: ReproductionSettings, run_dir: Path) -> Dict[str, Any]:
    """Train and evaluate one (dataset, method, seed); returns the results dict (also written to disk)."""
    from hf_csr.evaluation import evaluate_robustness

    start = time.time()
    trainer, train, test = train_method(dataset, method, seed, settings, run_dir)
    trained = time.time()
    report = evaluate_robustness(
        trainer.accelerator.unwrap_model(trainer.model), test, attacks=robust_attacks(settings), norm="Linf",
        eps=settings.attack_eps, batch_size=256, seed=seed, device=trainer.args.device, progress=False,
    )
    results = report.to_dict()
    results["train_class_counts"] = torch.bincount(train.labels, minlength=train.num_classes).tolist()
    results["run"] = {"dataset": dataset, "method": method, "seed": seed, "settings": asdict(settings),
                      "train_seconds": trained - start, "total_seconds": time.time() - start,
                      "torch_threads": torch.get_num_threads()}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "results.json", results)
    logger.info("%s / %s / seed %d done in %.0f s", dataset, method, seed, time.time() - start)
    return results


def run_dir_for(output_dir: Path, dataset: str, method: str, seed: int) -> Path:
    return Path(output_dir) / dataset / _slug(method) / f"seed{seed}"


def run_reproduction(output_dir, settings: ReproductionSettings, *, datasets: Sequence[str] = DATASETS,
                     methods: Sequence[str] = tuple(METHODS), seeds: Optional[Sequence[int]] = None) -> List[Path]:
    """Run every missing (dataset, method, seed) in order -- seed-major, so a stopped run has all methods of
    the first seeds -- and return the result files."""
    seeds = list(settings.seeds if seeds is None else seeds)
    done = []
    for dataset in datasets:
        for seed in seeds:
            for method in methods:
                run_dir = run_dir_for(Path(output_dir), dataset, method, seed)
                path = run_dir / "results.json"
                if path.exists():
                    logger.info("skipping %s / %s / seed %d: %s exists", dataset, method, seed, path)
                else:
                    run_one(dataset, method, seed, settings, run_dir)
                done.append(path)
    return done


# --------------------------------------------------------------------------- the table
def _robust_key(attacks: Dict[str, Any]) -> Optional[str]:
    names = [name for name in attacks if name not in ("clean", "worst_of_all")]
    auto = [name for name in names if name.startswith("autoattack")]
    return (auto or names or [None])[0]


def collect(output_dir) -> List[Dict[str, Any]]:
    rows = []
    for path in sorted(Path(output_dir).glob("*/*/seed*/results.json")):
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
        attacks = results["attacks"]
        key = _robust_key(attacks)
        rows.append({
            **{k: results["run"][k] for k in ("dataset", "method", "seed")},
            "settings": results["run"]["settings"]["name"], "seconds": results["run"]["total_seconds"],
            "clean": attacks["clean"]["accuracy"], "clean_worst": attacks["clean"]["worst_class"]["accuracy"],
            "aa": attacks[key]["accuracy"] if key else float("nan"),
            "aa_worst": attacks[key]["worst_class"]["accuracy"] if key else float("nan"),
            "attack": key,
        })
    return rows


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{dataset: {method: {metric: (mean, std, n)}}} in percent (std over seeds, ddof=0 for n = 1)."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["dataset"], {}).setdefault(row["method"], {"rows": []})["rows"].append(row)
    for dataset, methods in out.items():
        for method, entry in methods.items():
            for metric in ("clean", "clean_worst", "aa", "aa_worst"):
                values = np.array([100.0 * r[metric] for r in entry["rows"]])
                entry[metric] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values))
            entry["seeds"] = sorted(r["seed"] for r in entry["rows"])
            entry["seconds"] = float(sum(r["seconds"] for r in entry["rows"]))
            entry["attack"] = entry["rows"][0]["attack"]
    return out


def markdown_table(summary: Dict[str, Dict[str, Any]], methods: Sequence[str] = tuple(METHODS)) -> str:
    lines = ["| Method | Clean (%) | Worst (%) | AA (%) | Worst (%) | seeds |", "| --- | --- | --- | --- | --- | --- |"]
    order = [m for m in methods if m in summary] + sorted(set(summary) - set(methods))
    for method in order:
        e = summary[method]
        cells = [f"{e[m][0]:.2f} ± {e[m][1]:.2f}" for m in ("clean", "clean_worst", "aa", "aa_worst")]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(e['seeds'])} |")
    return "\n".join(lines)


def reading(summary: Dict[str, Dict[str, Any]]) -> str:
    """A mechanical reading of the two worst-class columns: is the better CSR variant ahead of every other
    method, and by more than the larger of the two seed standard deviations?"""
    csr = {m: e for m, e in summary.items() if m.startswith("CSR")}
    others = {m: e for m, e in summary.items() if not m.startswith("CSR")}
    if not csr or not others:
        return "Not enough methods finished to compare CSR with the baselines."
    sentences = []
    for metric, label in (("aa_worst", "worst-class AA"), ("clean_worst", "worst-class clean")):
        best_csr = max(csr, key=lambda m: csr[m][metric][0])
        best_other = max(others, key=lambda m: others[m][metric][0])
        c, o = csr[best_csr][metric], others[best_other][metric]
        gap, noise = c[0] - o[0], max(c[1], o[1])
        if gap == 0:
            verdict = "a tie"
        elif gap > 0 and noise > 0 and gap > noise:
            verdict = "CSR ahead by more than the seed standard deviations"
        elif gap > 0:
            verdict = "CSR ahead, but within seed noise" + (" (one seed: no noise estimate)" if noise == 0 else "")
        else:
            verdict = "CSR behind"
        sentences.append(f"{label}: best CSR {best_csr} {c[0]:.2f} ± {c[1]:.2f} vs best other {best_other} "
                         f"{o[0]:.2f} ± {o[1]:.2f} ({gap:+.2f} points: {verdict}).")
    return " ".join(sentences)


BEGIN, END = "<!-- reproduction:{}:begin -->", "<!-- reproduction:{}:end -->"


def write_report(output_dir, path="REPRODUCTION.md", *, command: str = "", notes: str = "", section: str = "results") -> str:
    """Write the Table-3-shaped tables of every finished run under ``output_dir`` into ``path``, between
    the markers ``<!-- reproduction:<section>:begin/end -->`` (the text around them is kept; the
    block is appended when the markers are absent). Returns the generated block."""
    rows = collect(output_dir)
    summary = summarize(rows)
    parts = [BEGIN.format(section), f"### Results: `{output_dir}`", ""]
    if command:
        parts += ["Last command:", "", "```", command, "```", ""]
    if notes:
        parts += [notes, ""]
    total = sum(r["seconds"] for r in rows)
    sizes = sorted({r["settings"] for r in rows})
    parts.append(f"Finished runs: {len(rows)} (settings: {', '.join(sizes) or 'none'}), total run time "
                 f"{total / 60:.1f} min.")
    parts.append("")
    for dataset in DATASETS:
        if dataset not in summary:
            continue
        attack = next(iter(summary[dataset].values()))["attack"]
        minutes = sum(e["seconds"] for e in summary[dataset].values()) / 60
        parts += [f"#### {dataset} (robust column: `{attack}`, mean ± std over seeds; {minutes:.1f} min)", "",
                  markdown_table(summary[dataset]), "", "Reading: " + reading(summary[dataset]), ""]
    parts.append(END.format(section))
    block = "\n".join(parts)
    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.exists() else "# Reproduction on Fashion-MNIST (Table 3 shape)\n"
    begin, end = BEGIN.format(section), END.format(section)
    if begin in existing and end in existing:
        head, rest = existing.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = existing.rstrip("\n") + "\n\n" + block + "\n"
    from hf_csr.utils import atomic_write_text

    atomic_write_text(path, text)
    return block
