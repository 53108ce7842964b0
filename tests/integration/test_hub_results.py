"""Evaluation output and file safety (issues 16 and 17): results.json merges per attack and number of examples;
worst-class ties are reported as ties; convert --overwrite never deletes its input; decompression bombs and
malformed results.json / card.json are named errors; cards accept fashion_mnist; the metric cards are honest."""

import json
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_csr.cli import main
from hf_csr.evaluation.report import AttackResult
from hf_csr.hub import render_model_card, write_model_card
from hf_csr.models.published import read_checkpoint


REPO = Path(__file__).resolve().parents[2]


def _index(card):
    return {(r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}


def test_a_small_autoattack_run_after_a_large_pgd_run_keeps_both(fmnist_model, tmp_path):
    torch.manual_seed(0)
    directory = tmp_path / "model"
    fmnist_model().save_pretrained(directory)
    common = ["--dataset", "fashion_mnist", "--output-dir", str(directory), "--no-progress", "--batch-size", "250"]
    assert main(["evaluate", "--model", str(directory), "--limit", "1000", "--attacks", "pgd20", *common]) == 0
    first = json.loads((directory / "results.json").read_text())
    assert first["attacks"]["pgd20"]["num_examples"] == 1000
    assert main(["evaluate", "--model", str(directory), "--limit", "20", "--attacks", "autoattack", *common]) == 0
    merged = json.loads((directory / "results.json").read_text())
    assert merged["attacks"]["pgd20"] == first["attacks"]["pgd20"]  # the 1000-image PGD-20 is kept as it was
    assert merged["attacks"]["clean"]["num_examples"] == 1000  # the larger clean evaluation wins
    assert merged["attacks"]["autoattack"]["num_examples"] == 20
    assert [e["num_examples"] for e in merged["evaluations"]] == [1000, 20]
    card = ModelCard.load(directory / "README.md")
    index = _index(card)
    assert index[("pgd20", "accuracy")] == first["attacks"]["pgd20"]["accuracy"]
    assert index[("autoattack", "accuracy")] == merged["attacks"]["autoattack"]["accuracy"]
    assert "| PGD-20 | 1000 |" in card.text and "| AutoAttack | 20 |" in card.text
    assert str(tmp_path) not in (directory / "results.json").read_text()  # no local path in what is pushed


def test_a_larger_rerun_replaces_and_another_threat_model_is_kept_aside(card_results, tmp_path):
    from hf_csr.evaluation.report import merge_results

    path = tmp_path / "results.json"
    small = card_results.results(names=["a", "b"], attacks=("clean", "pgd20"))
    small["num_examples"] = 20
    path.write_text(json.dumps(merge_results(path, small)))
    large = card_results.results(names=["a", "b"], attacks=("pgd20",))
    large["num_examples"], large["attacks"]["pgd20"]["accuracy"] = 500, 0.25
    merged = merge_results(path, large)
    assert merged["attacks"]["pgd20"]["accuracy"] == 0.25 and merged["attacks"]["pgd20"]["num_examples"] == 500
    assert merged["attacks"]["clean"]["num_examples"] == 20
    path.write_text(json.dumps(merged))
    other = card_results.results(names=["a", "b"], attacks=("clean",))
    other["threat_model"] = {"norm": "L2", "eps": 0.5}
    fresh = merge_results(path, other)
    assert set(fresh["attacks"]) == {"clean"}
    assert json.loads((tmp_path / "results.previous-1.json").read_text())["attacks"]["pgd20"]["num_examples"] == 500


def test_worst_class_ties_are_reported_as_ties(card_results):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 0, 2])  # classes 1 and 2 both at 50%
    result = AttackResult("pgd", predictions, labels, ["cat", "dog", "frog"])
    worst = result.worst_class
    assert worst["accuracy"] == 0.5 and worst["ties"] == ["dog", "frog"] and worst["tie_indices"] == [1, 2]
    untied = AttackResult("pgd", torch.tensor([0, 0, 0, 1, 2, 2]), labels, ["cat", "dog", "frog"]).worst_class
    assert "ties" not in untied and untied["name"] == "dog"
    results = card_results.results(names=["cat", "dog", "frog"], attacks=("pgd20",))
    results["attacks"]["pgd20"]["worst_class"] = {**worst}
    assert "| dog, frog \\(tie\\) |" in render_model_card(results).text


def test_convert_overwrite_never_deletes_its_input(reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    source = out / "model.pt"
    torch.save({"model_state_dict": reference.ddpm_state_dict(10, 1, 10, seed=1)}, source)
    before = source.read_bytes()
    with pytest.raises(SystemExit):
        main(["convert", str(source), str(out), "--overwrite"])
    assert source.read_bytes() == before
    with pytest.raises(SystemExit):
        main(["convert", str(source), str(source), "--overwrite"])  # the output is the input file itself
    assert source.read_bytes() == before
    assert main(["convert", str(source), str(tmp_path / "elsewhere")]) == 0
    assert main(["convert", str(source), str(tmp_path / "elsewhere"), "--overwrite"]) == 0
    assert (tmp_path / "elsewhere" / "model.safetensors").is_file() and source.read_bytes() == before


def test_convert_with_an_unknown_backbone_names_it(reference, tmp_path, capsys):
    torch.save({"model_state_dict": reference.ddpm_state_dict(10, 1, 10, seed=1)}, tmp_path / "m.pt")
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "o"), "--backbone", "my_lenet5"])
    err = capsys.readouterr().err
    assert "unknown backbone 'my_lenet5'" in err and "package.module:factory" in err and "Traceback" not in err


def test_a_small_deflated_checkpoint_that_expands_to_gigabytes_is_refused(reference, tmp_path, monkeypatch):
    import hf_csr.models.published as checkpoints

    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        with archive.open("archive/data/0", "w") as handle:
            chunk = bytes(16 * 1024**2)
            for _ in range(16):  # 256 MiB of zeros in about 256 KiB (the gigabyte case only takes longer to build)
                handle.write(chunk)
    assert bomb.stat().st_size < 1024**2
    with pytest.raises(ValueError, match="expand to 268,435,456 .*decompression bomb"):
        read_checkpoint(bomb)
    with pytest.raises(SystemExit):
        main(["convert", str(bomb), str(tmp_path / "o")])
    # the total bound (8 GiB by default), checked from the zip directory before anything is read
    monkeypatch.setattr(checkpoints, "_MAX_COMPRESSION_RATIO", 10**9)
    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", 128 * 1024**2)
    with pytest.raises(ValueError, match="would expand to 0.3 GiB, more than the 0.125 GiB limit"):
        read_checkpoint(bomb)
    fine = tmp_path / "fine.pt"
    torch.save({"model_state_dict": reference.ddpm_state_dict(10, 1, 10, seed=1)}, fine)
    assert "model_state_dict" in read_checkpoint(fine)  # a real checkpoint passes


@pytest.mark.parametrize("content, message", [
    ({"attacks": {"pgd20": {"accuracy": "high"}}}, "must be a finite number"),
    ({"attacks": {"pgd20": {"accuracy": 0.5, "per_class_accuracy": 0.5}}}, "must be a list of numbers"),
    ({"attacks": {"pgd20": {"accuracy": 0.5, "worst_class": 3}}}, "'worst_class'\\] must be a mapping"),
    ({"attacks": ["pgd20"]}, "'attacks' mapping"),
    ({"class_names": "cat", "attacks": {}}, "'class_names' must be a list"),
    ({"threat_model": "Linf", "attacks": {}}, "'threat_model' must be a mapping"),
    ([1, 2], "must hold a JSON object"),
])
def test_malformed_results_json_is_a_named_error(fmnist_model, tmp_path, content, message):
    fmnist_model().save_pretrained(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        write_model_card(tmp_path)
    assert "results.json" in str(error.value)


@pytest.mark.parametrize("content, message", [
    ({"training": ["lr", 0.1]}, "'training' must be a Mapping"),
    ({"tags": "csr"}, "'tags' must be a list"),
    ({"repo_id": 3}, "'repo_id' must be a str"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ("just text", "must hold a JSON object"),
])
def test_malformed_card_json_is_a_named_error(fmnist_model, tmp_path, content, message):
    fmnist_model().save_pretrained(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        write_model_card(tmp_path)
    assert "card.json" in str(error.value)


def test_malformed_card_inputs_fail_before_training_or_evaluation(fmnist, fmnist_model, make_args, tmp_path, capsys):
    from hf_csr import CSRTrainer


    args = make_args(tmp_path)
    Path(args.output_dir).mkdir(parents=True)
    (Path(args.output_dir) / "card.json").write_text(json.dumps({"training": "fast"}))
    with pytest.raises(ValueError, match="card.json.*'training' must be a Mapping"):
        CSRTrainer(model=fmnist_model(), args=args, train_dataset=fmnist(limit=32))
    model_dir = tmp_path / "m"
    fmnist_model().save_pretrained(model_dir)
    (model_dir / "results.json").write_text(json.dumps({"attacks": {"pgd20": {"accuracy": None}}}))
    with pytest.raises(SystemExit):  # refused before the model or data are loaded
        main(["evaluate", "--model", str(model_dir), "--dataset", "fashion_mnist", "--output-dir", str(model_dir)])
    assert "results.json" in capsys.readouterr().err


def test_card_command_accepts_fashion_mnist_and_a_licence(fmnist_model, tmp_path):
    fmnist_model().save_pretrained(tmp_path)
    assert main(["card", str(tmp_path), "--dataset", "fashion_mnist", "--license", "mit", "--repo-id", "me/f"]) == 0
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"] and card.data.license == "mit"
    assert "Fashion-MNIST" in card.text and "(N, 1, 28, 28)" in card.text


def test_metric_cards_cite_the_published_paper_and_declare_no_missing_app():
    for readme in sorted((REPO / "hf_csr" / "metrics").glob("*/README.md")):
        text = readme.read_text()
        assert "Anonymous" not in text and "double-blind" not in text, readme
        front = text.split("---")[1]
        app = [line.split(":", 1)[1].strip() for line in front.splitlines() if line.startswith("app_file:")]
        assert all((readme.parent / name).is_file() for name in app), readme
        assert "@inproceedings{jin2025enhancing" in text and "ICLR" in text
