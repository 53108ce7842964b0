"""REPRODUCTION.md's generated part: tables, paired differences with confidence intervals, the sweep, the plots.

Everything here reads run folders written by :mod:`hf_csr_paper.reproduction`
(``<dir>/<dataset>/<method>/seed<k>/run.json`` plus the runner's ``results.json``, ``best/results.json`` and
``extra_eval/results.json``) and nothing else, so the report can be regenerated at any time with
``python recipes/reproduce_fashion_mnist.py --report_only``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .reproduction import BASELINES, DATASETS, METHODS, RELEASED_CSR, SWEEP

__all__ = ["paired_differences", "t_quantile_975", "collect", "summarize", "summary_table", "comparisons",
           "paired_table", "masking_table", "sweep_table", "sweep_reading", "generate", "write_report", "CHECKPOINTS", "METRICS"]

CHECKPOINTS = ("best", "final")
METRICS = {"clean": "Clean", "clean_worst": "Worst clean", "aa": "AA", "aa_worst": "Worst AA"}
PLOTS = ("classwise_accuracy.png", "confusion_matrix.png")


# --------------------------------------------------------------------------- statistics
# Student's t, 97.5% quantiles for 1..30 degrees of freedom (6 decimals), for installs without scipy (a dev extra).
T975_TABLE = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95% intervals): scipy's
    when it is installed, else a table for 1 to 30 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1; got {df}.")
    try:
        from scipy.stats import t
    except ImportError:
        if df > len(T975_TABLE):
            raise ValueError(f"without scipy, t quantiles are tabled up to {len(T975_TABLE)} degrees of freedom; got {df}: "
                             "install scipy.") from None
        return T975_TABLE[df - 1]
    return float(t.ppf(0.975, df))


def paired_differences(a_by_seed: Dict[Any, float], b_by_seed: Dict[Any, float]) -> Dict[str, Any]:
    """``a - b`` on the seeds both have: the per-seed differences (sorted by seed), their mean, sample standard
    deviation and the 95% confidence interval of the mean, ``mean +- t_{0.975, n-1} * sd / sqrt(n)``
    (None with fewer than two seeds)."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    diffs = [float(a_by_seed[s]) - float(b_by_seed[s]) for s in seeds]
    n = len(diffs)
    out: Dict[str, Any] = {"seeds": seeds, "differences": diffs, "n": n, "mean": None, "sd": None,
                           "half_width": None, "ci": None}
    if n == 0:
        return out
    mean = sum(diffs) / n
    out["mean"] = mean
    if n >= 2:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, half_width=half, ci=(mean - half, mean + half))
    return out


def verdict(stats: Dict[str, Any], a: str, b: str, metric: str) -> str:
    """One sentence: what the paired differences support (the interval excludes 0: supports; else cannot decide)."""
    if stats["n"] < 2:
        return f"{stats['n']} paired seed(s): too few to decide on {metric}."
    low, high = stats["ci"]
    if low > 0:
        return f"supports {a} above {b} on {metric}."
    if high < 0:
        return f"supports {a} below {b} on {metric}."
    return f"cannot decide on {metric}: the interval contains 0."


# --------------------------------------------------------------------------- reading the runs
def _robust_key(attacks: Dict[str, Any]) -> Optional[str]:
    names = [name for name in attacks if name not in ("clean", "worst_of_all")]
    auto = [name for name in names if name.startswith("autoattack")]
    return (auto or names or [None])[0]


def _read(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _metrics(results: Optional[Dict[str, Any]], extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if results:
        attacks = results["attacks"]
        key = _robust_key(attacks)
        out.update(clean=attacks["clean"]["accuracy"], clean_worst=attacks["clean"]["worst_class"]["accuracy"],
                   attack=key)
        if key:
            out.update(aa=attacks[key]["accuracy"], aa_worst=attacks[key]["worst_class"]["accuracy"],
                       num_examples=attacks[key].get("num_examples"))
    if extra:
        key = _robust_key(extra["attacks"])
        if key:
            after = extra["attacks"][key].get("robust_accuracy_after") or {}
            out.update(check=extra["attacks"][key]["accuracy"], check_worst=extra["attacks"][key]["worst_class"]["accuracy"],
                       check_apgd=after.get("apgd-t"), check_warnings=len(extra["attacks"][key].get("autoattack_warnings") or []),
                       check_attack=f"{key}@{extra['attacks'][key].get('num_examples')}")
    return out


def collect(output_dir) -> List[Dict[str, Any]]:
    """One row per finished run (``run.json`` present) and checkpoint (``best``, ``final``)."""
    rows = []
    for record_path in sorted(Path(output_dir).glob("*/*/seed*/run.json")):
        run_dir = record_path.parent
        record = _read(record_path)
        for checkpoint, folder in (("final", run_dir), ("best", run_dir / "best")):
            results = _read(folder / "results.json")
            if results is None:
                continue
            rows.append({"dataset": record["dataset"], "method": record["method"], "seed": record["seed"],
                         "checkpoint": checkpoint, "settings": record["settings"]["name"], "seconds": record["seconds"],
                         "best_epoch": record.get("best_epoch"), "run_dir": run_dir,
                         **_metrics(results, _read(folder / "extra_eval" / "results.json"))})
    return rows


def _mean_std(values: Sequence[float]) -> Dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Dict[str, Any]]]]:
    """{dataset: {checkpoint: {method: {metric: {mean, std, n} (percent), "by_seed": {metric: {seed: value}}, ...}}}}."""
    out: Dict[str, Any] = {}
    for row in rows:
        entry = out.setdefault(row["dataset"], {}).setdefault(row["checkpoint"], {}).setdefault(
            row["method"], {"rows": [], "by_seed": {}})
        entry["rows"].append(row)
    for checkpoints in out.values():
        for methods in checkpoints.values():
            for entry in methods.values():
                entry["seeds"] = sorted(r["seed"] for r in entry["rows"])
                entry["attack"] = entry["rows"][0].get("attack")
                entry["check_attack"] = entry["rows"][0].get("check_attack")
                entry["best_epochs"] = [r["best_epoch"] for r in sorted(entry["rows"], key=lambda r: r["seed"])]
                for metric in METRICS:
                    by_seed = {r["seed"]: 100.0 * r[metric] for r in entry["rows"] if r.get(metric) is not None}
                    entry["by_seed"][metric] = by_seed
                    entry[metric] = _mean_std(list(by_seed.values())) if by_seed else None
    return out


def _cell(stat: Optional[Dict[str, Any]]) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.2f}" if stat["std"] is None else f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def _order(methods: Sequence[str], known: Sequence[str]) -> List[str]:
    return [m for m in known if m in methods] + sorted(set(methods) - set(known))


def summary_table(methods: Dict[str, Dict[str, Any]], checkpoint: str) -> str:
    """Mean ± sample std over seeds (percent) per method."""
    lines = ["| Method | " + " | ".join(METRICS.values()) + " | seeds | min per run |" + (" best epochs |" if checkpoint == "best" else ""),
             "| --- |" + " --- |" * (len(METRICS) + 2) + (" --- |" if checkpoint == "best" else "")]
    for method in _order(list(methods), list(METHODS) + list(SWEEP)):
        e = methods[method]
        minutes = sum(r["seconds"] for r in e["rows"]) / len(e["rows"]) / 60
        cells = [_cell(e[m]) for m in METRICS] + [str(len(e["seeds"])), f"{minutes:.1f}"]
        if checkpoint == "best":
            cells.append(", ".join("–" if b is None else str(b) for b in e["best_epochs"]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(methods: Dict[str, Dict[str, Any]]) -> List[tuple]:
    """(a, b, what) pairs present in ``methods``: CSR vs TRADES, CSR vs the best baseline (per metric), ema vs epoch."""
    pairs = []
    if RELEASED_CSR in methods and "TRADES" in methods:
        pairs.append((RELEASED_CSR, "TRADES", "CSR vs its base"))
    if RELEASED_CSR in methods and any(b in methods for b in BASELINES):
        pairs.append((RELEASED_CSR, None, "CSR vs the best baseline"))
    for variant in ("reference", "paper"):
        a, b = f"CSR {variant}/ema", f"CSR {variant}/epoch"
        if a in methods and b in methods:
            pairs.append((a, b, "ema vs epoch"))
    return pairs


def paired_table(summary: Dict[str, Any]) -> str:
    """The paired-difference table (points, a - b) with one reading per comparison."""
    lines = ["| Dataset | Checkpoint | Comparison (a − b) | Metric | seeds | per-seed differences | mean | 95% CI | reading |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for dataset in _order(list(summary), DATASETS):
        for checkpoint in CHECKPOINTS:
            methods = summary[dataset].get(checkpoint, {})
            for a, b, _ in comparisons(methods):
                for metric in ("aa_worst", "aa"):
                    other = b
                    if other is None:  # the best baseline on this metric (highest mean)
                        present = [m for m in BASELINES if m in methods and methods[m][metric] is not None]
                        if not present:
                            continue
                        other = max(present, key=lambda m: methods[m][metric]["mean"])
                    stats = paired_differences(methods[a]["by_seed"][metric], methods[other]["by_seed"][metric])
                    diffs = ", ".join(f"{d:+.2f}" for d in stats["differences"]) or "–"
                    mean = "–" if stats["mean"] is None else f"{stats['mean']:+.2f}"
                    ci = "–" if stats["ci"] is None else f"[{stats['ci'][0]:+.2f}, {stats['ci'][1]:+.2f}]"
                    label = f"{a} − {other}" + (" (best baseline)" if b is None else "")
                    lines.append(f"| {dataset} | {checkpoint} | {label} | {METRICS[metric]} | {stats['n']} | {diffs} | "
                                 f"{mean} | {ci} | {verdict(stats, a, other, METRICS[metric])} |")
    return "\n".join(lines)


def masking_table(checkpoints: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """Standard AutoAttack's gradient-masking check, per run that has it: robust accuracy on the same fixed subset
    after APGD-CE + APGD-T and after all four attacks (FAB-T and Square added). A large drop would mean the
    gradient attacks of the main table are fooled (masking); a drop of a few tenths is the usual."""
    lines = ["| Method | checkpoint | seed | images | after APGD-CE + APGD-T | standard AA | drop | worst-class standard AA | warnings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    found = False
    for checkpoint in CHECKPOINTS:
        methods = checkpoints.get(checkpoint, {})
        for method in _order(list(methods), list(METHODS) + list(SWEEP)):
            for row in sorted(methods[method]["rows"], key=lambda r: r["seed"]):
                if row.get("check") is None:
                    continue
                found = True
                apgd = row.get("check_apgd")
                drop = "–" if apgd is None else f"{100 * (apgd - row['check']):.2f}"
                lines.append(f"| {method} | {checkpoint} | {row['seed']} | {row['check_attack'].rsplit('@', 1)[-1]} | "
                             f"{'–' if apgd is None else f'{100 * apgd:.2f}'} | {100 * row['check']:.2f} | {drop} | "
                             f"{100 * row['check_worst']:.2f} | {row.get('check_warnings', 0)} |")
    return "\n".join(lines) if found else None


def budget_check(methods: Dict[str, Dict[str, Any]]) -> str:
    """Issue 19's budget test: is PGD-AT's worst-class AA clearly above zero (the 95% interval of its mean
    over seeds excludes 0)?"""
    stat = methods.get("PGD-AT", {}).get("aa_worst")
    if stat is None:
        return "Budget check: no PGD-AT run yet."
    by_seed = methods["PGD-AT"]["by_seed"]["aa_worst"]
    if stat["n"] < 2:
        return f"Budget check: PGD-AT's worst-class AA is {stat['mean']:.2f} on one seed; two seeds are needed to call it."
    low = stat["mean"] - t_quantile_975(stat["n"] - 1) * stat["std"] / math.sqrt(stat["n"])
    clearly = low > 0 and min(by_seed.values()) > 0
    return (f"Budget check: PGD-AT's worst-class AA is {_cell(stat)} (95% interval from {low:.2f}): "
            + ("clearly above zero." if clearly else "not clearly above zero: this budget is too small."))


# --------------------------------------------------------------------------- the sweep
def _sweep_point(method: str):
    parts = dict(p.split("=") for p in method.split()[1:])
    return float(parts["alpha"]), float(parts["gamma"])


def sweep_table(methods: Dict[str, Dict[str, Any]]) -> str:
    """Table 6's two halves: alpha at gamma 0.1 and gamma at alpha 0.3 (AA and worst-class AA, percent)."""
    lines = ["| sweep | alpha | gamma | AA | Worst AA | seeds |", "| --- | --- | --- | --- | --- | --- |"]
    points = {_sweep_point(m): m for m in methods if m in SWEEP}
    for label, keys in (("alpha (gamma 0.1)", sorted(k for k in points if k[1] == 0.1)),
                        ("gamma (alpha 0.3)", sorted((k for k in points if k[0] == 0.3), key=lambda k: k[1]))):
        for alpha, gamma in keys:
            e = methods[points[(alpha, gamma)]]
            lines.append(f"| {label} | {alpha:g} | {gamma:g} | {_cell(e['aa'])} | {_cell(e['aa_worst'])} | {len(e['seeds'])} |")
    return "\n".join(lines)


def sweep_reading(methods: Dict[str, Dict[str, Any]]) -> str:
    """Where this sweep peaks, next to the shape of the paper's Table 6."""
    points = {_sweep_point(m): methods[m] for m in methods if m in SWEEP}

    def argmax(keys, metric, axis):
        keys = [k for k in keys if points[k][metric] is not None]
        return f"{max(keys, key=lambda k: points[k][metric]['mean'])[axis]:g}" if keys else "–"

    alphas = sorted(k for k in points if k[1] == 0.1)
    gammas = sorted((k for k in points if k[0] == 0.3), key=lambda k: k[1])
    aa_gamma = [points[k]["aa"]["mean"] for k in gammas if points[k]["aa"] is not None]
    falling = len(aa_gamma) > 1 and all(x > y for x, y in zip(aa_gamma, aa_gamma[1:]))
    return (
        "The paper's Table 6 (CIFAR-10, one run per point; its alpha sweep is at gamma 0) has average and worst-class AA "
        "rising with alpha and falling again after a peak at alpha 0.3, and, at alpha 0.3, average AA falling steadily as "
        "gamma grows while worst-class AA peaks at gamma 0.1. "
        f"Here (best checkpoints, mean over seeds): over alpha, AA peaks at alpha {argmax(alphas, 'aa', 0)} and worst-class "
        f"AA at alpha {argmax(alphas, 'aa_worst', 0)}; over gamma, AA {'falls steadily' if falling else 'does not fall steadily'} "
        f"and worst-class AA peaks at gamma {argmax(gammas, 'aa_worst', 1)}. Differences smaller than the seed standard "
        "deviations in the table are not evidence of a shape."
    )


# --------------------------------------------------------------------------- figures and the document
def _copy_figures(summary: Dict[str, Any], report_path: Path, figures_dir: Path) -> List[str]:
    """Copy the best checkpoint's class-wise bars and confusion matrix (lowest seed) of the released CSR and
    TRADES into ``figures_dir`` and return markdown lines embedding them by relative path."""
    import os

    lines = []
    for dataset in _order(list(summary), DATASETS):
        methods = summary[dataset].get("best", {})
        for method in (RELEASED_CSR, "TRADES"):
            if method not in methods:
                continue
            row = min(methods[method]["rows"], key=lambda r: r["seed"])
            source = Path(row["run_dir"]) / "best"
            target = figures_dir / dataset / Path(row["run_dir"]).parent.name / f"seed{row['seed']}"
            # a plot copied by an earlier session stays embedded when its run folder no longer has it
            # (the tracked run folders keep no plots)
            found = [name for name in PLOTS if (source / name).is_file() or (target / name).is_file()]
            if not found:
                continue
            target.mkdir(parents=True, exist_ok=True)
            images = []
            for name in found:
                if (source / name).is_file():
                    shutil.copyfile(source / name, target / name)
                rel = os.path.relpath(target / name, report_path.parent).replace(os.sep, "/")
                images.append(f"![{dataset} {method} seed {row['seed']} {name[:-4]}]({rel})")
            lines += [f"{dataset}, {method}, seed {row['seed']}, best checkpoint ({row.get('attack')}):", "", " ".join(images), ""]
    return lines


BEGIN, END = "<!-- reproduction:{}:begin -->", "<!-- reproduction:{}:end -->"


def generate(output_dir, *, label: Optional[str] = None, report_path=None, figures_dir=None, kind: str = "table3") -> str:
    """The generated markdown for the runs under ``output_dir`` (``kind``: ``table3`` or ``sweep``)."""
    rows = collect(output_dir)
    label = label or str(output_dir)
    if not rows:
        return (f"No run has finished under `{label}` yet (no `run.json` there), so there are no numbers to report: "
                "the tables appear here once runs finish.")
    summary = summarize(rows)
    runs = {(r["dataset"], r["method"], r["seed"]): r["seconds"] for r in rows}
    presets = sorted({r["settings"] for r in rows})
    parts = [f"Finished runs under `{label}`: {len(runs)} (preset: {', '.join(presets)}), total wall time "
             f"{sum(runs.values()) / 3600:.2f} h. Percent, mean ± sample std over seeds.", ""]
    if kind == "sweep":
        for dataset in _order(list(summary), DATASETS):
            methods = summary[dataset].get("best", {})
            parts += [f"#### Sweep on {dataset} (best checkpoint, robust column `{next(iter(methods.values()))['attack']}`)",
                      "", sweep_table(methods), "", sweep_reading(methods), ""]
        return "\n".join(parts).rstrip("\n")
    for dataset in _order(list(summary), DATASETS):
        for checkpoint in CHECKPOINTS:
            methods = summary[dataset].get(checkpoint)
            if not methods:
                continue
            first = next(iter(methods.values()))
            parts += [f"#### {dataset}, {checkpoint} checkpoint (AA = `{first['attack']}`)",
                      "", summary_table(methods, checkpoint), ""]
            if checkpoint == "best":
                parts += [budget_check(methods), ""]
        masking = masking_table(summary[dataset])
        if masking:
            parts += [f"#### {dataset}: gradient-masking check (standard AutoAttack on a fixed class-balanced subset, "
                      "percent)", "", masking, ""]
    parts += ["#### Paired differences (points; same seed = same initialisation and data order)", "",
              paired_table(summary), ""]
    if report_path is not None and figures_dir is not None:
        figures = _copy_figures(summary, Path(report_path), Path(figures_dir))
        if figures:
            parts += ["#### Plots", ""] + figures
    return "\n".join(parts).rstrip("\n")


def write_report(path, blocks: Dict[str, str]) -> str:
    """Put each generated block between its markers ``<!-- reproduction:<name>:begin/end -->`` in ``path`` (the
    text around them is kept; a block whose markers are absent is appended). Returns the new text."""
    from hf_csr.utils import atomic_write_text

    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Reproduction on Fashion-MNIST\n"
    for name, block in blocks.items():
        begin, end = BEGIN.format(name), END.format(name)
        body = f"{begin}\n{block}\n{end}"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + body + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    atomic_write_text(path, text)
    return text
