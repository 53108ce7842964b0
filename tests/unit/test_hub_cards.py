"""Model cards: metadata and model-index from results.json, class-wise tables, escaping, the template file."""

import filecmp
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load

from hf_csr.hub import MODEL_CARD_TEMPLATE, render_model_card, write_model_card

REPO_ROOT = Path(__file__).resolve().parents[2]
def test_card_metadata_and_model_index_round_trip(card_results, tmp_path):
    results = card_results.results()
    card = render_model_card(results, repo_id="me/wrn-csr", base_model="wzekai99/DM-Improves-AT", dataset="cifar10",
                             training={"base_loss": "trades", "csr_variant": "paper", "csr_alpha": 0.3, "gamma": 0.1,
                                       "confusion source": "ema", "attack": "PGD-10", "epochs": 2, "lr": 0.01})
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert card_results.model_index(loaded) == card_results.expected_index(results)  # exact floats, every attack present
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["library_name"] == "hf_csr" and metadata["base_model"] == "wzekai99/DM-Improves-AT"
    assert {"adversarial-robustness", "robust-fairness", "csr", "image-classification"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["uoft-cs/cifar10"] and metadata["license"] == "apache-2.0"
    assert "license: mit" not in loaded.content.split("---")[1]  # no YAML injected through a class name
    text = loaded.text
    assert "AutoModelForImageClassification.from_pretrained('me/wrn-csr')" in text and "import hf_csr" in text
    assert "@inproceedings{jin2025enhancing" in text
    for setting in ("base\\_loss", "csr\\_alpha", "confusion source", "epochs", "lr"):
        assert f"| {setting} |" in text


def test_class_wise_table_escapes_hostile_class_names(card_results):
    results = card_results.results()
    text = render_model_card(results, dataset="cifar10").text
    table = text.split("### Class-wise accuracy (%)")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| Class | Clean | PGD-20 | CW-20 | AutoAttack | Worst of all attacks |"
    rows = table[2:]
    assert len(rows) == len(card_results.HOSTILE_NAMES)
    for row, name in zip(rows, card_results.HOSTILE_NAMES):
        cells = [c for c in row.replace("\\|", "").split("|")]
        assert len(cells) == 1 + 1 + 5 + 1, row  # leading "", name, five attacks, trailing ""
    assert rows[0].startswith("| T-shirt \\| top |")
    assert "<script>" not in text and "&lt;script&gt;alert\\('x'\\)&lt;/script&gt;" in text
    assert "Trouser --- license: mit ---" in text  # newlines collapsed: no front-matter break
    assert "\\[link\\]\\(http://evil.example\\)" in text and "\\*bold\\* \\_it\\_ \\`code\\`" in text
    assert "\n#" not in text.split("## Evaluation")[1].split("## Training")[0].replace("\n### ", "\n")


def test_only_the_attacks_present_are_rendered(card_results):
    results = card_results.results(names=["cat", "dog", "frog"], attacks=("clean", "autoattack"))
    card = render_model_card(results)
    assert set(card_results.model_index(card)) == {("clean", "accuracy"), ("clean", "worst_class_accuracy"),
                                      ("autoattack", "accuracy"), ("autoattack", "worst_class_accuracy")}
    assert "PGD-20" not in card.text and "| Class | Clean | AutoAttack |" in card.text
    bare = render_model_card(None, config={"backbone": "preact_resnet18", "id2label": {"0": "a", "1": "b"}})
    assert bare.data.eval_results is None and "Not evaluated yet" in bare.text


def test_write_model_card_uses_the_directory(card_results, tmp_path):
    import json

    (tmp_path / "plots").mkdir()
    for name in ("plots/confusion_matrix_pgd20.png", "per_class accuracy.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    results = card_results.results(names=["cat", "dog"], attacks=("clean", "pgd20"))
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "config.json").write_text(json.dumps({"backbone": "wrn28_10_ddpm", "id2label": {"0": "cat", "1": "dog"},
                                                      "threat_model": {"norm": "L2", "eps": 0.5}}))
    path = write_model_card(tmp_path, repo_id="me/m")
    text = path.read_text()
    assert "![per class accuracy](per_class%20accuracy.png)" in text
    assert "![confusion matrix pgd20](plots/confusion_matrix_pgd20.png)" in text
    assert card_results.model_index(ModelCard.load(path)) == card_results.expected_index(results)
    assert not list(tmp_path.glob(".README.md.*"))  # atomic write leaves no temporary file


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(repo_id="not a repo id"), "repo_id must be a Hub repo id"),
        (dict(base_model="../../etc"), "base_model must be a Hub repo id"),
        (dict(plots=["../outside.png"]), "plot paths must be relative"),
        (dict(plots=["https://evil.example/x.png"]), "plot paths must be relative"),
        (dict(dataset="imagenet"), "dataset must be a registered dataset"),
    ],
)
def test_bad_card_arguments(card_results, kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_model_card(card_results.results(names=["a", "b"]), **kwargs)


def test_bad_results_are_reported(card_results):
    results = card_results.results(names=["a", "b"])
    results["attacks"]["pgd20"]["per_class_accuracy"] = [0.5]
    with pytest.raises(ValueError, match=r"\['pgd20'\]\['per_class_accuracy'\] has 1 entries but there are 2"):
        render_model_card(results)
    results = card_results.results(names=["a", "b"])
    results["attacks"]["clean"]["accuracy"] = float("nan")
    with pytest.raises(ValueError, match="must be a finite number"):
        render_model_card(results)


def test_template_is_installed_with_the_package_and_mirrored_in_model_cards():
    assert MODEL_CARD_TEMPLATE.is_file() and MODEL_CARD_TEMPLATE.parent.name == "templates"
    public = REPO_ROOT / "model_cards" / "template.md"
    assert public.is_file() and filecmp.cmp(public, MODEL_CARD_TEMPLATE, shallow=False)


def test_card_command(card_results, tmp_path, capsys):
    import json

    from hf_csr.cli import main

    results = card_results.results(names=["cat", "dog"], attacks=("clean", "pgd20", "autoattack"))
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "training.json").write_text(json.dumps({"base_loss": "pgd", "csr_variant": "reference", "csr_alpha": 0.3}))
    assert main(["card", str(tmp_path), "--repo-id", "me/m", "--training", str(tmp_path / "training.json")]) == 0
    card = ModelCard.load(tmp_path / "README.md")
    assert card_results.model_index(card) == card_results.expected_index(results) and "| csr\\_variant | reference |" in card.text
    assert "Confusional Spectral Regularization (CSR)" in card.text
    with pytest.raises(SystemExit):
        main(["card", str(tmp_path), "--training", str(tmp_path / "missing.json")])
    assert "--training" in capsys.readouterr().err
