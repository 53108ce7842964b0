"""The Fashion-MNIST reproduction (hf_csr_paper): paired statistics, the report from a fixture of run folders,
the runner's arguments, and a tiny end-to-end smoke through the recipe."""

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from hf_csr_paper.report import generate, paired_differences, sweep_reading, sweep_table, summarize, collect, write_report
from hf_csr_paper.reproduction import METHODS, POWER, QUICK, SWEEP, run_arguments

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reproduction"


def load_recipe():
    spec = importlib.util.spec_from_file_location("reproduce_fashion_mnist", REPO / "recipes" / "reproduce_fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_differences_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, half-width t_{0.975, 2} / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    stats = paired_differences({0: 11.0, 1: 14.0, 2: 17.0, 9: 1.0}, {0: 10.0, 1: 12.0, 2: 14.0})
    assert stats["seeds"] == [0, 1, 2] and stats["differences"] == [1.0, 2.0, 3.0]
    assert stats["mean"] == pytest.approx(2.0) and stats["sd"] == pytest.approx(1.0)
    assert stats["half_width"] == pytest.approx(4.302652729749464 / math.sqrt(3))
    assert stats["half_width"] == pytest.approx(2.484, abs=5e-4)
    assert stats["ci"] == pytest.approx((2.0 - 2.4841, 2.0 + 2.4841), abs=1e-4)
    single = paired_differences({0: 1.0}, {0: 0.5})
    assert single["n"] == 1 and single["mean"] == 0.5 and single["ci"] is None
    assert paired_differences({}, {0: 1.0})["mean"] is None


EXPECTED_BEST = """| Method | Clean | Worst clean | AA | Worst AA | seeds | min per run | best epochs |
| --- | --- | --- | --- | --- | --- | --- | --- |
| TRADES | 81.00 ± 1.00 | 52.00 ± 2.00 | 61.00 ± 1.00 | 12.00 ± 2.00 | 3 | 60.0 | 5, 6, 7 |
| CSR reference/epoch | 80.00 ± 0.00 | 55.00 ± 0.00 | 59.00 ± 0.00 | 14.00 ± 3.00 | 3 | 60.0 | 5, 6, 7 |"""

EXPECTED_MASKING = """| Method | checkpoint | seed | images | after APGD-CE + APGD-T | standard AA | drop | worst-class standard AA | warnings |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| TRADES | best | 0 | 1000 | 60.50 | 60.30 | 0.20 | 11.00 | 0 |"""

EXPECTED_PAIRED_FINAL = """\
| fashion_mnist | final | CSR reference/epoch − TRADES | Worst AA | 3 | +3.00, +4.00, +5.00 | +4.00 | [+1.52, +6.48] | supports CSR reference/epoch above TRADES on Worst AA. |
| fashion_mnist | final | CSR reference/epoch − TRADES | AA | 3 | -1.00, -2.00, -3.00 | -2.00 | [-4.48, +0.48] | cannot decide on AA: the interval contains 0. |"""

EXPECTED_PAIRED_BEST = """\
| fashion_mnist | best | CSR reference/epoch − TRADES | Worst AA | 3 | +1.00, +2.00, +3.00 | +2.00 | [-0.48, +4.48] | cannot decide on Worst AA: the interval contains 0. |"""


def test_report_command_reproduces_the_tables_of_the_fixture(tmp_path):
    report = tmp_path / "REPRODUCTION.md"
    report.write_text("# Title\n\nhand-written text kept\n\n<!-- reproduction:power:begin -->\nold\n"
                      "<!-- reproduction:power:end -->\n\n## Appendix\n", encoding="utf-8")
    argv = ["--report_only", "--size", "power", "--output_dir", str(FIXTURE), "--report", str(report),
            "--figures_dir", str(tmp_path / "figures")]
    assert load_recipe().main(argv) == 0
    text = report.read_text(encoding="utf-8")
    assert "hand-written text kept" in text and "old" not in text and text.rstrip().endswith("## Appendix")
    assert EXPECTED_BEST in text
    assert EXPECTED_PAIRED_FINAL in text and EXPECTED_PAIRED_BEST in text
    assert EXPECTED_MASKING in text  # the check of the one run that has it, from its robust accuracy after each attack
    assert f"Finished runs under `{FIXTURE}`: 6 (preset: fixture), total wall time 6.00 h." in text
    assert "Budget check: no PGD-AT run yet." in text
    assert not (tmp_path / "figures").exists()  # the fixture has no plots


def test_report_without_runs_says_so(tmp_path):
    block = generate(tmp_path / "nothing", label="outputs/x")
    assert block.startswith("No run has finished under `outputs/x` yet") and "|" not in block


def test_report_copies_and_embeds_the_plots(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURE, runs)
    best = runs / "fashion_mnist" / "CSR_reference_epoch" / "seed0" / "best"
    (best / "classwise_accuracy.png").write_bytes(b"png")
    report, figures = tmp_path / "doc" / "R.md", tmp_path / "doc" / "figs"
    report.parent.mkdir()
    block = generate(runs, report_path=report, figures_dir=figures)
    assert (figures / "fashion_mnist" / "CSR_reference_epoch" / "seed0" / "classwise_accuracy.png").read_bytes() == b"png"
    assert "](figs/fashion_mnist/CSR_reference_epoch/seed0/classwise_accuracy.png)" in block


def test_sweep_table_and_reading():
    rows = []
    for (alpha, gamma), (aa, worst) in {(0.0, 0.1): (0.50, 0.10), (0.3, 0.1): (0.52, 0.20), (0.4, 0.1): (0.51, 0.15),
                                        (0.3, 0.0): (0.53, 0.18), (0.3, 0.2): (0.49, 0.16)}.items():
        for seed in (0, 1):
            rows.append({"dataset": "fashion_mnist", "method": f"CSR alpha={alpha:g} gamma={gamma:g}", "seed": seed,
                         "checkpoint": "best", "best_epoch": 1, "clean": 0.8, "clean_worst": 0.5, "aa": aa,
                         "aa_worst": worst, "attack": "a"})
    methods = summarize(rows)["fashion_mnist"]["best"]
    table = sweep_table(methods)
    assert "| alpha (gamma 0.1) | 0.3 | 0.1 | 52.00 ± 0.00 | 20.00 ± 0.00 | 2 |" in table
    order = [table.index(f"| gamma (alpha 0.3) | 0.3 | {g} |") for g in ("0", "0.1", "0.2")]
    assert order == sorted(order)
    reading = sweep_reading(methods)
    assert "AA peaks at alpha 0.3 and worst-class AA at alpha 0.3" in reading
    assert "AA falls steadily and worst-class AA peaks at gamma 0.1" in reading
    assert set(SWEEP) >= {"CSR alpha=0 gamma=0.1", "CSR alpha=0.4 gamma=0.1", "CSR alpha=0.3 gamma=0.2"}


def test_runs_are_built_for_the_runner(tmp_path):
    experiment, training = run_arguments("fashion_mnist_lt", "CSR paper/ema", 2, POWER, tmp_path)
    assert experiment.long_tail_ratio == 100 and experiment.validation_size == 1000 and experiment.subset_seed == 0
    assert experiment.train_limit is None and experiment.eval_limit == 3000  # all training images, 300 test per class
    assert experiment.model == "mlp_tiny" and training.crop_padding == 0
    # standard AutoAttack's masking check: seed 0 only, on the reported (best) checkpoint
    assert experiment.final_eval_attacks == "clean,autoattack:apgd-ce+apgd-t" and experiment.extra_eval is None
    seed0, _ = run_arguments("fashion_mnist_lt", "CSR paper/ema", 0, POWER, tmp_path)
    assert seed0.extra_eval == "autoattack@1000" and seed0.extra_eval_on == "best"
    assert training.output_dir == str(tmp_path) and training.seed == 2 and training.resume_from_checkpoint == "last"
    assert training.fairness_config.variant == "paper" and training.fairness_config.confusion_source == "ema"
    assert training.fairness_config.gamma == 0.1 and training.max_grad_norm in (None, 0, 0.0)
    balanced, _ = run_arguments("fashion_mnist", "PGD-AT", 0, POWER, tmp_path)
    assert balanced.long_tail_ratio is None
    assert {m for m in METHODS if m.startswith("CSR")} == {
        "CSR reference/epoch", "CSR paper/epoch", "CSR reference/ema", "CSR paper/ema"}


@pytest.mark.slow
def test_quick_smoke_end_to_end_and_resume(tmp_path):
    """2 methods x 1 seed x 1 dataset through the runner, then the report; a rerun trains nothing."""
    recipe = load_recipe()
    out, report = tmp_path / "runs", tmp_path / "R.md"
    argv = ["--quick", "--max_steps", "2", "--train_examples", "200", "--eval_examples", "30", "--validation_size", "30",
            "--extra_eval", "pgd2@20", "--datasets", "fashion_mnist", "--seeds", "0", "--methods",
            "PGD-AT,CSR reference/epoch", "--output_dir", str(out), "--report", str(report),
            "--figures_dir", str(tmp_path / "figs")]
    assert recipe.main(argv) == 0
    records = sorted(out.glob("fashion_mnist/*/seed0/run.json"))
    assert len(records) == 2
    for record in records:
        run_dir = record.parent
        assert (run_dir / "results.json").is_file() and (run_dir / "best" / "results.json").is_file()
        assert (run_dir / "extra_eval" / "results.json").is_file() and not list(run_dir.glob("checkpoint-*"))
        assert json.loads((run_dir / "best" / "selection.json").read_text())["best_epoch"] == 1
    text = report.read_text()
    assert "| PGD-AT |" in text and "| CSR reference/epoch |" in text and "<!-- reproduction:quick:begin -->" in text
    assert "](figs/fashion_mnist/CSR_reference_epoch/seed0/classwise_accuracy.png)" in text
    stamps = {f: os.stat(f).st_mtime_ns for f in records}
    assert recipe.main(argv) == 0
    assert {f: os.stat(f).st_mtime_ns for f in records} == stamps
    assert len(collect(out)) == 4 and write_report(report, {"quick": "x"}).count("reproduction:quick:begin") == 1


@pytest.mark.slow
def test_analysis_phi_trains_through_the_runner_and_reuses_the_run(tmp_path):
    from hf_csr_paper.analysis import run_phi
    from hf_csr_paper.reproduction import override

    tiny = override(QUICK, max_steps=1, train_examples=100, eval_examples=20, validation_size=20,
                    eval_attacks="clean", extra_eval=None)
    out = run_phi(tmp_path, methods=["PGD-AT"], settings=tiny)
    record = tmp_path / "runs" / "fashion_mnist" / "PGD-AT" / "seed0" / "run.json"
    assert record.is_file() and out["methods"]["PGD-AT"]["n"] > 5
    stamp = os.stat(record).st_mtime_ns
    again = run_phi(tmp_path, methods=["PGD-AT"], settings=tiny)  # the finished run is reused, not retrained
    assert os.stat(record).st_mtime_ns == stamp
    assert again["methods"]["PGD-AT"]["log_phi_prime"] == out["methods"]["PGD-AT"]["log_phi_prime"]
    from hf_csr_paper.analysis import run_sharpness

    sharp = run_sharpness(tmp_path, methods=["PGD-AT"], settings=tiny, examples=20, num_samples=1, scales=("absolute",))
    assert os.stat(record).st_mtime_ns == stamp  # the same run again
    assert 0 <= sharp["methods"]["PGD-AT"]["sharpness_absolute"]["sigma2"] <= 1


def test_estimate_counts_the_passes_by_hand():
    from dataclasses import replace

    from hf_csr_paper.reproduction import estimate_seconds

    s = replace(QUICK, train_examples=1000, eval_examples=100, epochs=2, attack_steps=3, validation_size=None,
                eval_attacks="clean,pgd20,autoattack:apgd-ce+apgd-t", extra_eval=None)
    e = estimate_seconds(s, "PGD-AT", "fashion_mnist", ms_per_unit=1000.0, robust=0.5)
    assert e["train"] == pytest.approx(2 * 1000 * 5)  # 2 epochs x 1000 images x (PGD-3 + 2)
    assert e["evaluation"] == pytest.approx(100 * (1 + 20 + 100 + 0.5 * 900))  # clean + PGD-20 + APGD-CE + APGD-T
    csr = estimate_seconds(s, "CSR reference/epoch", "fashion_mnist", ms_per_unit=1000.0, robust=0.5)
    assert csr["train"] == pytest.approx(2 * 1000 * 5 + 2 * 1000 * 11)  # + the epoch pass, PGD-10 per image


def test_t_table_matches_scipy_and_is_used_without_it(monkeypatch):
    import builtins
    import sys

    from hf_csr_paper import report

    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert report.T975_TABLE[df - 1] == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-6)
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "scipy.stats", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert report.t_quantile_975(2) == 4.302653
    with pytest.raises(ValueError, match="install scipy"):
        report.t_quantile_975(31)


def test_two_processes_never_take_the_same_run(tmp_path):
    import os
    import subprocess
    import sys

    from hf_csr_paper.reproduction import CLAIM, _claim

    run = tmp_path / "fashion_mnist" / "PGD-AT" / "seed0"
    assert _claim(run) and _claim(run)  # this process holds it (and may ask again)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / CLAIM).write_text(str(sleeper.pid))
        assert not _claim(run)  # another live process holds it
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _claim(run) and (run / CLAIM).read_text() == str(os.getpid())  # a dead holder's claim is taken over
