"""The Fashion-MNIST reproduction: a --quick smoke on a tiny subset, resumability, the table."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from hf_csr_paper.reproduction import markdown_table, reading, summarize, write_report

REPO = Path(__file__).resolve().parents[2]


def load_recipe():
    spec = importlib.util.spec_from_file_location("reproduce_fashion_mnist", REPO / "recipes" / "reproduce_fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_smoke_on_a_tiny_subset_and_resume(tmp_path):
    recipe = load_recipe()
    out, report = tmp_path / "runs", tmp_path / "REPRODUCTION.md"
    report.write_text("# Title\n\nhand-written text kept\n", encoding="utf-8")
    argv = ["--quick", "--train_examples", "60", "--eval_examples", "20", "--epochs", "1", "--seeds", "0",
            "--methods", "PGD-AT,CSR gamma=0.1 (TRADES)", "--output_dir", str(out), "--report", str(report)]
    assert recipe.main(argv) == 0
    files = sorted(out.glob("*/*/seed0/results.json"))
    assert len(files) == 4  # 2 methods x 2 datasets
    results = json.loads(files[0].read_text())
    assert results["run"]["settings"]["aa_n_iter"] == 10 and "per_class_accuracy" in results["attacks"]["clean"]
    lt = json.loads((out / "fashion_mnist_lt" / "PGD-AT" / "seed0" / "results.json").read_text())
    counts = lt["train_class_counts"]
    assert counts[0] == 6 and counts[-1] == 1  # exponential subsampling, ratio 100
    text = report.read_text()
    assert "hand-written text kept" in text and "| PGD-AT |" in text and "| CSR gamma=0.1 (TRADES) |" in text
    assert "fashion_mnist_lt" in text and "<!-- reproduction:quick:begin -->" in text
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    assert recipe.main(argv) == 0  # everything exists: nothing is retrained
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps
    assert report.read_text().count("| PGD-AT |") == 2  # one table per dataset, block replaced, not appended


def test_table_mean_std_and_reading(tmp_path):
    rows = [
        {"dataset": "d", "method": m, "seed": s, "settings": "quick", "seconds": 1.0, "clean": c, "clean_worst": c - 0.2,
         "aa": a, "aa_worst": w, "attack": "autoattack"}
        for m, s, c, a, w in [("PGD-AT", 0, 0.8, 0.5, 0.10), ("PGD-AT", 1, 0.9, 0.6, 0.20),
                              ("CSR gamma=0.0 (TRADES)", 0, 0.8, 0.5, 0.40), ("CSR gamma=0.0 (TRADES)", 1, 0.8, 0.5, 0.42)]
    ]
    summary = summarize(rows)["d"]
    assert summary["PGD-AT"]["clean"][0] == pytest.approx(85.0)
    assert summary["PGD-AT"]["clean"][1] == pytest.approx(7.0710678, rel=1e-6)  # sample std over seeds
    table = markdown_table(summary)
    assert "| PGD-AT | 85.00 ± 7.07 | 65.00 ± 7.07 | 55.00 ± 7.07 | 15.00 ± 7.07 | 2 |" in table
    assert "worst-class AA: best CSR CSR gamma=0.0 (TRADES) 41.00" in reading(summary)
    assert "more than the seed standard deviations" in reading(summary)


def test_report_without_runs(tmp_path):
    block = write_report(tmp_path / "nothing", tmp_path / "R.md", section="quick")
    assert "Finished runs: 0" in block
