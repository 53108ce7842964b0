"""Robust checkpoints out: push through the real client to a local commit-API server, load back, failures."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

import hf_csr  # noqa: F401
from hf_csr.hub import HubPushError, push_checkpoint, write_model_card
from hf_csr.models.published import load_published


REPO_ROOT = Path(__file__).resolve().parents[2]
X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def checkpoint_dir(card_results, reference, tmp_path):
    """A save_pretrained directory as training + evaluation leave it: weights, config, results, plots,
    a card, and pickles (optimizer / training args) that must never be uploaded."""
    torch.save({"model_state_dict": reference.ddpm_state_dict(10, 1, 10, seed=21)}, tmp_path / "source.pt")
    model = load_published(tmp_path / "source.pt")
    directory = tmp_path / "run"
    model.save_pretrained(directory)
    (directory / "results.json").write_text(json.dumps(card_results.results(names=CIFAR10)))
    (directory / "plots").mkdir()
    (directory / "plots" / "confusion_matrix_autoattack.png").write_bytes(b"\x89PNG fake")
    torch.save({"lr": 0.01}, directory / "optimizer.pt")
    (directory / "training_args.bin").write_bytes(b"pickle")
    write_model_card(directory, repo_id="me/wrn-csr", training={"base_loss": "trades", "csr_alpha": 0.3})
    return directory, model


def _snapshot(directory):
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def test_push_then_load_back_with_identical_logits_and_card(card_results, local_hub, checkpoint_dir):
    directory, model = checkpoint_dir
    info = push_checkpoint(directory, "me/wrn-csr")
    assert info.oid in local_hub.repos[("model", "me/wrn-csr")].commits
    uploaded = set(local_hub.files("me/wrn-csr"))
    assert uploaded == {".gitattributes", "config.json", "preprocessor_config.json", "model.safetensors", "README.md", "results.json",
                        "plots/confusion_matrix_autoattack.png"}  # no pickles
    assert ("POST", "/api/models/me/wrn-csr/commit/main") in local_hub.requests

    loaded = AutoModelForImageClassification.from_pretrained("me/wrn-csr").eval()  # downloads via the server
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.config.id2label == model.config.id2label and loaded.config.threat_model == model.config.threat_model

    card = ModelCard.load("me/wrn-csr")
    results = json.loads((directory / "results.json").read_text())
    assert card_results.model_index(card) == card_results.expected_index(results)
    assert "from_pretrained('me/wrn-csr')" in card.text


def test_push_to_a_branch_writes_a_missing_card(local_hub, checkpoint_dir):
    directory, model = checkpoint_dir
    (directory / "README.md").unlink()
    push_checkpoint(directory, "me/wrn-csr", revision="dev", commit_message="CSR fine-tune")
    assert (directory / "README.md").is_file()  # written before uploading
    assert "README.md" in local_hub.files("me/wrn-csr", revision="dev")
    assert "model.safetensors" not in local_hub.files("me/wrn-csr", revision="main")
    loaded = AutoModelForImageClassification.from_pretrained("me/wrn-csr", revision="dev").eval()
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("failure", [500, "disconnect", "stop"])
def test_failed_push_leaves_the_directory_intact_and_says_what_to_retry(local_hub, checkpoint_dir, failure):
    directory, _ = checkpoint_dir
    before = _snapshot(directory)
    local_hub.fail_next("commit", failure)
    with pytest.raises(HubPushError) as error:
        push_checkpoint(directory, "me/wrn-csr")
    message = str(error.value)
    assert "failed while trying to upload" in message and "local checkpoint directory is unchanged" in message
    assert f"retry: `hf-csr push {directory} me/wrn-csr`" in message
    assert _snapshot(directory) == before
    if failure != "stop":
        assert set(local_hub.files("me/wrn-csr")) == {".gitattributes"}  # nothing committed
        push_checkpoint(directory, "me/wrn-csr")  # the retry succeeds
        assert "model.safetensors" in local_hub.files("me/wrn-csr")


def test_push_refuses_broken_directories_before_any_request(local_hub, checkpoint_dir):
    directory, _ = checkpoint_dir
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupted"):
        push_checkpoint(directory, "me/wrn-csr")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"no safetensors weights \(found pickles \['optimizer.pt', 'training_args.bin'\]"):
        push_checkpoint(directory, "me/wrn-csr")
    with pytest.raises(ValueError, match="repo_id must be a Hub repo id like"):
        push_checkpoint(directory, "a/b/c")
    assert local_hub.requests == []


@pytest.mark.subprocess
def test_cli_push_with_hf_endpoint_in_the_environment(local_hub, checkpoint_dir, tmp_path):
    directory, model = checkpoint_dir
    env = {**os.environ, "HF_ENDPOINT": local_hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
           "HF_TOKEN": "hf_local_test_token", "HF_HOME": str(tmp_path / "hf-home")}
    command = [sys.executable, "-m", "hf_csr.cli", "push", str(directory), "me/from-cli"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"pushed {directory} to me/from-cli" in result.stdout
    loaded = AutoModelForImageClassification.from_pretrained("me/from-cli").eval()
    assert torch.equal(_logits(loaded), _logits(model))

    local_hub.fail_next("commit", 500)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1 and "hf-csr push: error: pushing" in result.stderr
    assert "Traceback" not in result.stderr
