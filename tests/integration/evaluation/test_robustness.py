"""evaluate_robustness on a small Fashion-MNIST model: invariants, AutoAttack agreement, flags, resume."""

import json

import numpy as np
import pytest
import torch

from hf_csr.data import TensorImageDataset
from hf_csr.evaluation import AutoAttackConfig, PGDConfig, evaluate_robustness, parse_attacks


# Cheap AutoAttack for the invariant tests; the agreement test below uses pyautoattack's own budgets.
QUICK_AA = AutoAttackConfig("custom", ("apgd-ce", "apgd-t"), n_iter=5)
ATTACKS = ("clean", "pgd20", "cw20", QUICK_AA)


@pytest.fixture(scope="module")
def report(eps, fmnist_model, fmnist_test):
    return evaluate_robustness(fmnist_model, fmnist_test, attacks=ATTACKS, eps=eps, batch_size=16, progress=False)


def test_report_structure_and_json_schema(eps, report, fmnist_test):
    assert list(report.attacks) == ["clean", "pgd20", "cw20", QUICK_AA.name, "worst_of_all"]
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["num_examples"] == 40 and data["class_names"] == fmnist_test.class_names
    assert data["threat_model"] == {"norm": "Linf", "eps": eps} and data["seed"] == 0 and data["flags"] == []
    for entry in data["attacks"].values():
        assert {"accuracy", "per_class_accuracy", "class_counts", "worst_class", "std", "best_worst_gap",
                "confusion_matrix", "spectral_norm", "l1_norm", "nu"} <= set(entry)
        assert set(entry["worst_class"]) == {"index", "name", "accuracy"}
    assert data["attacks"]["pgd20"]["attack"]["step_size"] == pytest.approx(eps / 4)


def test_per_attack_invariants(report):
    labels = report.labels
    for name, result in report.attacks.items():
        counts, per_class = result.class_counts, result.per_class_accuracy
        assert counts.sum() == report.num_examples == len(result.predictions) == len(result.robust)
        np.testing.assert_array_equal(counts, np.bincount(labels.numpy(), minlength=10))
        assert result.accuracy == pytest.approx(float(result.robust.float().mean()))
        worst = result.worst_class
        assert worst["accuracy"] == per_class.min() and per_class[worst["index"]] == worst["accuracy"]
        assert worst["name"] == report.class_names[worst["index"]]
        c = result.confusion_matrix
        assert np.all(np.diag(c) == 0)
        np.testing.assert_allclose(c.sum(axis=0), 1 - per_class)  # columns: the per-class error
        assert result.metrics["l1_norm"] == pytest.approx(1 - worst["accuracy"])
        assert result.metrics["spectral_norm"] == pytest.approx(np.linalg.svd(c, compute_uv=False)[0])
        assert result.metrics["nu"] == pytest.approx(result.metrics["l1_norm"] / result.metrics["spectral_norm"])
        assert result.metrics["best_worst_gap"] == pytest.approx(per_class.max() - per_class.min())


def test_robustness_is_pointwise_and_never_exceeds_clean(report):
    clean = report["clean"]
    for name, result in report.attacks.items():
        assert not bool((result.robust & ~clean.robust).any()), f"{name}: robust but wrong on the clean input"
        assert result.accuracy <= clean.accuracy
        assert np.all(result.per_class_accuracy <= clean.per_class_accuracy)
        wrong = ~clean.robust  # the clean input is in the threat model: its prediction stands
        assert torch.equal(result.predictions[wrong], clean.predictions[wrong])


def test_worst_of_all_needs_every_attack(report):
    attacked = [r for name, r in report.attacks.items() if name not in ("clean", "worst_of_all")]
    expected = torch.stack([r.robust for r in attacked]).all(dim=0)
    worst = report["worst_of_all"]
    assert torch.equal(worst.robust, expected)
    assert worst.accuracy <= min(r.accuracy for r in attacked)
    # Each broken example keeps the prediction of the first attack that broke it.
    broken = ~worst.robust
    first = torch.stack([~r.robust for r in attacked]).float().argmax(dim=0)
    chosen = torch.stack([r.predictions for r in attacked])[first, torch.arange(len(first))]
    assert torch.equal(worst.predictions[broken], chosen[broken])


def test_attacks_break_examples(report):
    assert report["clean"].accuracy >= 0.5
    assert report["pgd20"].accuracy < report["clean"].accuracy


def test_autoattack_accuracy_equals_pyautoattack(wrappers, fmnist_model, fmnist_test):
    """hf_csr's AutoAttack verdicts are those of pyautoattack's own run_standard_evaluation on these inputs.

    24 examples in batches of 16: AutoAttack attacks only the clean-correct examples, regrouped into
    batches of 16 across the data, as in one run_standard_evaluation call. (hf_csr draws APGD's random
    start per example, not per batch -- test_sharded.py checks that the iterations from that start are
    pyautoattack's own -- and on these examples both starts lead to the same verdicts.)
    """
    from pyautoattack import AutoAttack

    x, y, eps = *fmnist_test.tensors(range(24)), 8 / 255
    attacks = ("pgd20", "autoattack:apgd-ce")
    report = evaluate_robustness(fmnist_model, x, y, attacks=attacks, eps=eps, seed=3, batch_size=16, progress=False)
    adversary = AutoAttack(wrappers.logits_of(fmnist_model), attacks=["apgd-ce"], version="custom", eps=eps,
                           norm="Linf", seed=3, device="cpu")
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=16)
    with torch.no_grad():
        direct = (wrappers.logits_of(fmnist_model)(x_adv).argmax(1) == y).double().mean().item()
    ours = report["autoattack:apgd-ce"]
    assert ours.accuracy == (y_adv == y).double().mean().item() == direct
    assert torch.equal(ours.predictions, y_adv)
    assert ours.extra["robust_accuracy_after"] == {"apgd-ce": ours.accuracy}
    assert 16 < int(report["clean"].robust.sum())  # so the attacked examples span two batches
    # PGD already breaks examples here, and AutoAttack is at least as strong.
    assert report["pgd20"].accuracy < report["clean"].accuracy
    assert ours.accuracy <= report["pgd20"].accuracy


@pytest.mark.slow
def test_standard_autoattack_on_a_few_images(eps, wrappers, fmnist_model, fmnist_test):
    from pyautoattack import AutoAttack

    x, y = fmnist_test.tensors(range(0, 36, 3))  # 12 examples in batches of 8: survivors are regrouped
    report = evaluate_robustness(fmnist_model, x, y, attacks=("pgd20", "autoattack"), eps=eps, batch_size=8,
                                 progress=False)
    adversary = AutoAttack(wrappers.logits_of(fmnist_model), eps=eps, norm="Linf", seed=0, device="cpu")
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=8)
    assert torch.equal(report["autoattack"].predictions, y_adv)
    assert report["autoattack"].accuracy == (y_adv == y).double().mean().item()
    assert report["autoattack"].accuracy <= report["pgd20"].accuracy
    assert report["autoattack"].config["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_autoattack_leaves_the_global_rng_alone(eps, fmnist_model, fmnist_test):
    x, y = fmnist_test.tensors(range(8))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    evaluate_robustness(fmnist_model, x, y, attacks=(AutoAttackConfig("custom", ("apgd-ce",), n_iter=3),),
                        eps=eps, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_same_results(eps, report, fmnist_model, fmnist_test):
    again = evaluate_robustness(fmnist_model, fmnist_test, attacks=ATTACKS, eps=eps, batch_size=16, progress=False)
    assert again.to_dict() == report.to_dict()
    for name in report.attacks:
        assert torch.equal(again[name].predictions, report[name].predictions)


def test_models_returning_tensors_tuples_and_model_outputs_agree(eps, wrappers, fmnist_model, fmnist_test):
    as_tuple = wrappers.Wrap(fmnist_model, lambda m, x: (m(x).logits,))
    x, y = fmnist_test.tensors(range(12))
    kwargs = dict(attacks=("pgd5",), eps=eps, class_names=fmnist_test.class_names, progress=False)
    reports = [evaluate_robustness(m, x, y, **kwargs) for m in (fmnist_model, wrappers.logits_of(fmnist_model), as_tuple)]
    assert reports[0].to_dict()["attacks"] == reports[1].to_dict()["attacks"] == reports[2].to_dict()["attacks"]


def test_l2_threat_model_and_bf16_autocast(fmnist_model, fmnist_test):
    x, y = fmnist_test.tensors(range(16))
    report = evaluate_robustness(fmnist_model, x, y, attacks="pgd10,cw10", norm="L2", eps="64/255",
                                 autocast_dtype="bf16", progress=False)
    assert report.threat_model == {"norm": "L2", "eps": 64 / 255}
    assert report.to_dict()["evaluation"]["autocast"] == "bfloat16"
    assert report["worst_of_all"].accuracy <= report["pgd10"].accuracy <= report["clean"].accuracy
    # Names come from the model's config when the images are a bare tensor.
    assert report.class_names == list(fmnist_model.config.id2label.values())


def test_gradient_masking_is_flagged(eps, wrappers, fmnist_model, fmnist_test):
    masked = wrappers.Rounding(fmnist_model)
    x, y = fmnist_test.tensors(range(16))
    report = evaluate_robustness(masked, x, y, attacks=("pgd20", AutoAttackConfig("custom", ("apgd-t",), n_iter=5)),
                                 eps=eps, class_names=fmnist_test.class_names, progress=False)
    assert any(f.startswith("gradient masking: 16 of 16 examples") for f in report.flags), report.flags
    assert any("AutoAttack warned" in f and "zero gradient" in f for f in report.flags), report.flags
    assert report.to_dict()["flags"] == report.flags
    assert "**Warnings:**" in report.markdown_table() and "gradient masking" in report.markdown_table()


def test_a_model_without_input_gradients_is_refused(wrappers, fmnist_model, fmnist_test):
    no_graph = wrappers.Wrap(fmnist_model, lambda m, x: m(x).logits.detach())
    x, y = fmnist_test.tensors(range(4))
    with pytest.raises(ValueError, match="do not depend differentiably"):
        evaluate_robustness(no_graph, x, y, attacks="pgd5", progress=False)
    # Gradient-free evaluations still run.
    square = AutoAttackConfig("custom", ("square",), n_queries=20)
    report = evaluate_robustness(no_graph, x, y, attacks=(square,), progress=False)
    assert report["worst_of_all"].accuracy <= report["clean"].accuracy


def _progress_files(directory):
    return sorted(directory.rglob("*.pt"))


def test_interrupted_evaluation_resumes_exactly(eps, wrappers, fmnist_model, fmnist_test, tmp_path):
    x, y = fmnist_test.tensors(range(32))
    attacks = ("pgd10", AutoAttackConfig("custom", ("apgd-ce", "apgd-dlr"), n_iter=4))
    kwargs = dict(attacks=attacks, eps=eps, batch_size=8, seed=1, class_names=fmnist_test.class_names, progress=False)
    full_model = wrappers.CountingModel(fmnist_model)
    full = evaluate_robustness(full_model, x, y, resume_dir=tmp_path / "reference", **kwargs)
    assert full.to_dict() == evaluate_robustness(fmnist_model, x, y, **kwargs).to_dict()
    total = len(_progress_files(tmp_path / "reference"))

    progress = tmp_path / "progress"
    flaky = wrappers.CountingModel(fmnist_model, fail_after=full_model.calls // 2)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        evaluate_robustness(flaky, x, y, resume_dir=progress, **kwargs)
    saved = len(_progress_files(progress))
    assert 4 < saved < total  # the clean pass (4 batches) finished, the attacks did not

    resumed_model = wrappers.CountingModel(fmnist_model)
    resumed = evaluate_robustness(resumed_model, x, y, resume_dir=progress, **kwargs)
    assert resumed.to_dict() == full.to_dict()
    assert len(_progress_files(progress)) == total  # each batch was written once
    assert resumed_model.calls < full_model.calls - flaky.fail_after // 2

    again = wrappers.CountingModel(fmnist_model)
    assert evaluate_robustness(again, x, y, resume_dir=progress, **kwargs).to_dict() == full.to_dict()
    assert again.calls == 1  # only the probe that reads the number of classes
    # Another seed is another evaluation (issue 17, cache identity): its progress starts afresh, and says so.
    other = wrappers.CountingModel(fmnist_model)
    evaluate_robustness(other, x, y, resume_dir=progress, **{**kwargs, "seed": 2})
    assert other.calls > full_model.calls // 2 and len(_progress_files(progress)) == total


def test_damaged_progress_files_are_recomputed(eps, fmnist_model, fmnist_test, tmp_path):
    x, y = fmnist_test.tensors(range(8))
    kwargs = dict(attacks="pgd5", eps=eps, batch_size=4, class_names=fmnist_test.class_names, progress=False)
    first = evaluate_robustness(fmnist_model, x, y, resume_dir=tmp_path, **kwargs)
    for path in _progress_files(tmp_path):
        path.write_bytes(b"not a checkpoint")
    assert evaluate_robustness(fmnist_model, x, y, resume_dir=tmp_path, **kwargs).to_dict() == first.to_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(attacks=("clean", "fgsm")), "unknown attack 'fgsm'"),
        (dict(attacks="autoattack:apgd-ce+apgd-xl"), r"unknown AutoAttack component\(s\) \['apgd-xl'\]"),
        (dict(attacks=("worst_of_all",)), "not an attack"),
        (dict(norm="L1"), r"norm must be one of \['Linf', 'L2'\]"),
        (dict(eps=0), "eps must be a finite budget > 0"),
        (dict(eps="8/0"), "eps must be a number or a fraction"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(autocast_dtype="fp8"), "autocast_dtype must be None, 'bf16' or 'fp16'"),
        (dict(autoattack_version="plus"), r"autoattack_version must be one of \['standard', 'rand'\]"),
        (dict(images_scale=2.0), r"must lie in \[0, 1\]"),
        (dict(images_dtype=torch.uint8), "floating-point tensor in \\[0, 1\\]"),
        (dict(labels_offset=12), r"labels lie in \[\d+, \d+\] but the model has num_classes = 10"),
        (dict(labels=None), "labels are required"),
    ],
)
def test_bad_input_gives_a_clear_error(fmnist_model, fmnist_test, change, message):
    x, y = fmnist_test.tensors(range(4))
    x = x * change.pop("images_scale", 1.0)
    x = (x * 255).to(change.pop("images_dtype")) if "images_dtype" in change else x
    y = y + change.pop("labels_offset", 0)
    kwargs = {"labels": y, "attacks": ("clean",), "progress": False, **change}
    with pytest.raises(ValueError, match=message):
        evaluate_robustness(fmnist_model, x, **kwargs)


def test_class_count_mismatch_is_an_error(fmnist_model):
    images = torch.zeros(6, 1, 28, 28, dtype=torch.uint8)
    three_classes = TensorImageDataset(images, [0, 1, 2, 0, 1, 2], ["a", "b", "c"])
    with pytest.raises(ValueError, match="class count mismatch: the model outputs 10 logits but the dataset has 3"):
        evaluate_robustness(fmnist_model, three_classes, progress=False)
    with pytest.raises(ValueError, match="labels must be None when images is a dataset"):
        evaluate_robustness(fmnist_model, three_classes, torch.zeros(6, dtype=torch.long), progress=False)


def test_autoattack_targets_fit_the_number_of_classes(toy_data, toy_net):
    model = toy_net(num_classes=3).eval()
    x, y = toy_data(n=12)
    with pytest.raises(ValueError, match="apgd-t needs at least 4 classes; the model has 3"):
        evaluate_robustness(model, x, y, attacks="autoattack", progress=False)
    report = evaluate_robustness(model, x, y, attacks=(AutoAttackConfig("custom", ("apgd-ce", "fab-t"), n_iter=3),),
                                 progress=False)
    assert report.class_names == ["0", "1", "2"] and len(report.attacks) == 3


def test_attack_names_parse():
    configs = parse_attacks("pgd20, cw40,autoattack,autoattack:apgd-ce+square,pgd20", autoattack_version="rand")
    assert [c.name for c in configs] == ["clean", "pgd20", "cw40", "autoattack-rand", "autoattack:apgd-ce+square"]
    assert configs[2] == PGDConfig(steps=40, loss="cw")
    commas = parse_attacks("clean,autoattack:apgd-ce,apgd-t,pgd20")
    assert [c.name for c in commas] == ["clean", "autoattack:apgd-ce+apgd-t", "pgd20"]
    assert parse_attacks(["autoattack:apgd-ce,square"])[1].attacks == ("apgd-ce", "square")
    assert AutoAttackConfig("custom", ("apgd-ce",), n_iter=5).name == "autoattack:apgd-ce[n_iter=5]"
    with pytest.raises(ValueError, match="exactly when version='custom'"):
        AutoAttackConfig("standard", ("apgd-ce",))


def test_autoattack_components_after_every_example_is_broken_are_skipped():
    # With a huge budget APGD-CE breaks every example; the next component has nothing left to attack
    # (it used to be handed one empty chunk, on which AutoAttack crashes).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).eval()
    x = torch.rand(12, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    config = AutoAttackConfig("custom", ("apgd-ce", "apgd-t"), n_iter=5)
    report = evaluate_robustness(model, x, y, attacks=["clean", config], eps=0.5, batch_size=8, progress=False,
                                 class_names=[str(i) for i in range(5)])
    result = report.attacks[config.name]
    assert result.accuracy == 0.0 and result.extra["robust_accuracy_after"] == {"apgd-ce": 0.0, "apgd-t": 0.0}
