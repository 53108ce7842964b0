"""Hostile and broken files (RELIABILITY.md, item 2).

* pickles with embedded code are refused (``torch.load(weights_only=True)`` everywhere) and the code never runs:
  trainer checkpoints (``csr_state.pt``), evaluation progress files, published ``.pt`` checkpoints;
* truncated or corrupted safetensors, npz, ``config.json`` and YAML configs give a clear error naming the file;
* a ``config.json`` with an unknown backbone or absurd sizes is rejected before memory is allocated;
* model cards render user-supplied class names, titles, dataset names and repo ids safely.
"""

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

from hf_csr import CSRTrainer, CSRTrainingArguments
from hf_csr.data import load_image_dataset
from hf_csr.evaluation import evaluate_robustness
from hf_csr.experiment import parse_args
from hf_csr.hub import render_model_card
from hf_csr.models.published import load_published
from hf_csr.models import create_robust_classifier
from hf_csr.trainer import CSR_STATE_NAME


class Payload:
    """Unpickling this creates ``marker``: proof that code in a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_model_dir(tmp_path):
    model = create_robust_classifier("test_tiny_convnet", num_classes=3, num_channels=1, image_size=8)
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


# ------------------------------------------------------------------------------------------- pickles
def test_pickled_code_in_a_trainer_checkpoint_is_refused(fmnist, fmnist_model, tmp_path):
    args = CSRTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, save_steps=1, per_device_train_batch_size=16,
                                attack_steps=1, use_cpu=True, disable_tqdm=True, report_to="none")
    data = fmnist(limit=32)
    CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=args, train_dataset=data).train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    marker = tmp_path / "payload-ran"
    torch.save({"confusion": Payload(marker)}, checkpoint / CSR_STATE_NAME)
    args = CSRTrainingArguments(**{**args.to_dict(), "max_steps": 2})
    trainer = CSRTrainer(model=fmnist_model("test_tiny_convnet"), args=args, train_dataset=data)
    with pytest.raises(ValueError, match=rf"cannot load .*checkpoint-1/{CSR_STATE_NAME}: torch.load\(weights_only=True\) rejected it"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_pickled_code_in_evaluation_progress_is_never_run(trained_toy, tmp_path, caplog):
    model, x, y = trained_toy
    kwargs = dict(attacks="clean,pgd5", eps=8 / 255, batch_size=48, progress=False, resume_dir=tmp_path / "progress")
    first = evaluate_robustness(model, x, y, **kwargs)
    marker = tmp_path / "payload-ran"
    files = sorted((tmp_path / "progress").rglob("*.pt"))
    assert files
    for path in files:
        torch.save({"predictions": Payload(marker)}, path)
    with caplog.at_level(logging.WARNING):
        again = evaluate_robustness(model, x, y, **kwargs)
    assert not marker.exists()
    assert again.to_dict() == first.to_dict()  # recomputed, not trusted
    assert "ignoring unreadable progress file" in caplog.text


def test_pickled_code_in_a_published_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"model_state_dict": {"init_conv.weight": torch.zeros(1)}, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pt.*weights_only=True"):
        load_published(tmp_path / "evil.pt")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- broken files
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_broken_safetensors_names_the_file(tmp_path, damage):
    directory = tiny_model_dir(tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)
    with pytest.raises(ValueError, match=r"cannot load .*model\.safetensors: the file is truncated or corrupted"):
        AutoModelForImageClassification.from_pretrained(directory)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_crc"])
def test_broken_npz_names_the_file(tmp_path, damage):
    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez_compressed(path, image=rng.integers(0, 255, (64, 8, 8), dtype=np.uint8), label=np.arange(64) % 4)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\x00" * 100)
    else:
        data[200:260] = b"\x00" * 60  # inside the compressed image array
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"cannot read the npz file .*data\.npz"):
        load_image_dataset(path)


def test_broken_config_json_names_the_file(tmp_path, capsys):
    from hf_csr.cli import main

    directory = tiny_model_dir(tmp_path)
    config = directory / "config.json"
    config.write_text(config.read_text()[:50])
    with pytest.raises(OSError, match=r"config\.json"):
        AutoModelForImageClassification.from_pretrained(directory)
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(directory), "--dataset", "fashion_mnist", "--output-dir", str(tmp_path / "e")])
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [("csr_alpha: [0.3\n", "is not valid YAML"),
     ("!!python/object/apply:os.system ['touch {marker}']\n", "is not valid YAML"),
     ("- 0.3\n- 0.1\n", "must hold a mapping of setting: value")],
    ids=["truncated", "python-tag", "not-a-mapping"],
)
def test_broken_yaml_config_names_the_file(tmp_path, text, message):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(marker=marker))
    with pytest.raises(ValueError, match=rf"config file .*recipe\.yaml {message}"):
        parse_args(["--config", str(path), "--output_dir", str(tmp_path / "run")])
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, message",
    [({"backbone": "resnet_from_mars"}, r"unknown backbone 'resnet_from_mars'"),
     ({"backbone": "wrn28_10_ddpm", "backbone_kwargs": {"width": 100_000}}, r"parameters, more than the limit"),
     ({"image_size": 10**9}, r"image_size must be an integer in \[1, 4096\]"),
     ({"num_channels": 10**6}, r"num_channels must be an integer in \[1, 64\]"),
     ({"image_mean": [float("nan")]}, r"image_mean must hold 1 finite values")],
    ids=["unknown-backbone", "huge-width", "huge-image", "huge-channels", "nan-mean"],
)
def test_hostile_config_json_is_rejected_before_allocation(tmp_path, change, message):
    directory = tiny_model_dir(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    # A 100000-wide WRN-28 would need terabytes: the check runs on the meta device, before any allocation.
    with pytest.raises(ValueError, match=message):
        AutoModelForImageClassification.from_pretrained(directory)


# ------------------------------------------------------------------------------------------- model cards
HOSTILE = "evil\n---\nlicense: mit\ntags: [pwned]\n---\n# Injected <script>alert(1)</script> | cell | [x](javascript:1)"


def card_results(names):
    k = len(names)
    attack = {"accuracy": 0.5, "per_class_accuracy": [0.5] * k, "worst_class": {"name": names[0], "accuracy": 0.5}}
    return {"class_names": names, "threat_model": {"norm": "Linf", "eps": 8 / 255}, "num_examples": 10,
            "attacks": {"clean": attack, "pgd20": attack}, "flags": [HOSTILE]}


def test_model_card_escapes_user_supplied_text():
    names = [HOSTILE, "ok", "a|b"]
    card = render_model_card(card_results(names), model_name=HOSTILE, dataset_name=HOSTILE,
                             training={HOSTILE: HOSTILE}, repo_id="user/robust-model")
    text = str(card)
    front, body = text.split("\n---\n", 1)[0], text.split("\n---\n", 1)[1]
    assert text.startswith("---\n") and body.count("\n---\n") == 0  # exactly one front matter block
    metadata = yaml.safe_load(front[4:])
    assert metadata["license"] == "apache-2.0" and "pwned" not in metadata["tags"]
    parsed = ModelCard(text)
    assert parsed.data.license == "apache-2.0"
    # in the YAML the text is a quoted string (model_name, dataset name); in the Markdown it is escaped
    assert metadata["model-index"][0]["name"] == HOSTILE
    assert "<script>" not in body and "# Injected" not in body.replace("\\# Injected", "")
    assert "javascript:1)" not in body.replace("javascript:1\\)", "")
    # every table row keeps its column count: the hostile '|' are escaped
    rows = [line for line in body.splitlines() if line.startswith("| ") and "Injected" in line]
    assert rows and all(line.replace("\\|", "").count("|") in (3, 4, 10) for line in rows)  # training, class, summary (with Images) tables


@pytest.mark.parametrize("repo_id", ["user/x\nlicense: mit", "../../etc/passwd", "user/<script>", "a" * 200])
def test_model_card_rejects_hostile_repo_ids(repo_id):
    with pytest.raises(ValueError, match="repo_id must be a Hub repo id like 'namespace/name'"):
        render_model_card(card_results(["a", "b"]), repo_id=repo_id)


# ------------------------------------------------------------------------------------------- a full disk
def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    """results.json, results.md, plots, cards and progress files go through hf_csr.utils.atomic_*: a write that
    fails half-way (here: the disk fills up at fsync) leaves the previous file as it was and no temporary file."""
    import errno
    import os

    from hf_csr import utils

    path = tmp_path / "results.json"
    utils.atomic_write_json(path, {"accuracy": 0.5})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        utils.atomic_write_json(path, {"accuracy": 0.9, "padding": "x" * 100_000})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
