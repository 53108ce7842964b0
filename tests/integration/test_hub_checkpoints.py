"""Published checkpoints in: layouts, logits against the independent re-implementations, Hub loading
through the real client (pre-filled cache offline, and a local Hub server), ``hf-csr convert``, bad input."""

import io
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification

import hf_csr  # noqa: F401  (registers the model with transformers)
from hf_csr.cli import main
from hf_csr.models.published import PUBLISHED_CHECKPOINTS, convert_checkpoint, load_published, read_checkpoint
from hf_csr.models._common import CIFAR100_MEAN, CIFAR100_STD


X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
DM_REPO = "wzekai99/DM-Improves-AT"


def _bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def _strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items()}


# ----------------------------------------------------------------------------- layouts vs the references
@pytest.mark.parametrize("depth, width", [(10, 1), (16, 2)])
def test_ddpm_checkpoint_matches_reference(reference, tmp_path, depth, width):
    original = reference.ddpm_state_dict(depth, width, 10, seed=depth)  # keys "module.0.*", as published
    path = tmp_path / "cifar10_linf.pt"
    torch.save({"model_state_dict": original}, path)  # EMA weights under model_state_dict
    model = load_published(path)
    assert model.config.backbone == "wrn28_10_ddpm" and model.config.backbone_kwargs == {"depth": depth, "width": width}
    assert model.config.id2label[0] == "airplane" and not model.training
    assert torch.allclose(_logits(model), reference.ddpm_reference_forward(original, X, depth), atol=1e-5)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module."])
def test_robustbench_style_state_dicts(reference, tmp_path, wrap):
    original = reference.ddpm_state_dict(10, 1, 10, seed=3)
    plain = _strip(original, "module.0.")
    checkpoint = {"plain": plain, "state_dict": {"state_dict": plain, "epoch": 7},
                  "module.": {"module." + k: v for k, v in plain.items()}}[wrap]
    torch.save(checkpoint, tmp_path / "rb.pt")
    model = load_published(tmp_path / "rb.pt")
    assert torch.allclose(_logits(model), reference.ddpm_reference_forward(original, X, 10), atol=1e-5)


@pytest.mark.parametrize("depth, width", [(10, 1), (16, 2)])
def test_trades_checkpoint_matches_reference(reference, tmp_path, depth, width):
    original = reference.trades_state_dict(depth, width, 10, seed=depth)  # "module." prefix, unused sub_block1
    torch.save(original, tmp_path / "model-wideres-epoch76.pt")
    model = load_published(tmp_path / "model-wideres-epoch76.pt")
    assert model.config.backbone == "wrn28_10_trades" and model.config.image_mean == [0.0, 0.0, 0.0]
    assert torch.allclose(_logits(model), reference.trades_reference_forward(original, X, depth), atol=1e-5)


def test_trades_awp_wrn34_10_keeps_its_registered_name(reference):
    with torch.device("meta"):
        state = reference.trades_state_dict(34, 10, 10, seed=0)
    converted = convert_checkpoint({"state_dict": state})
    assert (converted.backbone, converted.backbone_kwargs, converted.layout) == ("wrn34_10_trades", {}, "trades")


def test_safetensors_checkpoint_and_explicit_metadata(reference, tmp_path):
    original = reference.ddpm_state_dict(10, 1, 100, seed=4)
    save_file(_strip(original, "module.0."), tmp_path / "cifar100.safetensors")
    model = load_published(tmp_path / "cifar100.safetensors", threat_model={"norm": "L2", "eps": 0.5})
    assert model.config.num_labels == 100 and model.config.id2label[99] == "worm"
    assert model.config.threat_model == {"norm": "L2", "eps": 0.5}
    mean, std = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    assert torch.allclose(_logits(model), reference.ddpm_reference_forward(original, X, 10, mean, std), atol=1e-5)


# ----------------------------------------------------------------------------- the Hub, through the real client
def test_published_table_matches_the_dm_repo():
    files = {entry.filename for entry in PUBLISHED_CHECKPOINTS.values()}
    assert files == {f"checkpoint/{n}" for n in ("cifar10_linf_wrn28-10.pt", "cifar10_linf_wrn70-16.pt",
                                                  "cifar10_l2_wrn28-10.pt", "cifar10_l2_wrn70-16.pt",
                                                  "cifar100_linf_wrn28-10.pt", "cifar100_linf_wrn70-16.pt")}
    l2 = PUBLISHED_CHECKPOINTS["wrn70_16_ddpm.dm_cifar10_l2"]
    assert (l2.repo_id, l2.backbone, l2.threat_model["norm"]) == (DM_REPO, "wrn70_16_ddpm", "L2")
    assert l2.threat_model["eps"] == pytest.approx(128 / 255)


def test_load_by_hub_id_from_a_prefilled_cache_offline(fill_hf_cache, reference, offline_cache):
    original = reference.ddpm_state_dict(10, 1, 10, seed=5)
    fill_hf_cache(offline_cache, DM_REPO, {"checkpoint/cifar10_l2_wrn28-10.pt": _bytes({"model_state_dict": original})})
    model = load_published("wrn28_10_ddpm.dm_cifar10_l2")  # HF_HUB_OFFLINE=1: served from the cache
    assert model.config.threat_model["norm"] == "L2"
    assert torch.allclose(_logits(model), reference.ddpm_reference_forward(original, X, 10), atol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"cifar10_linf_wrn28-10.pt.*is not in the HF cache and the Hub cannot be reached"):
        load_published("wrn28_10_ddpm.dm_cifar10_linf")  # not in the cache


def test_load_by_hub_id_from_a_local_hub_server(reference, local_hub, tmp_path):
    original = reference.ddpm_state_dict(10, 1, 100, seed=6)
    payload = _bytes({"model_state_dict": original})
    first = local_hub.add_repo(DM_REPO, {"checkpoint/cifar100_linf_wrn28-10.pt": payload})
    local_hub.add_repo(DM_REPO, {"checkpoint/cifar100_linf_wrn28-10.pt": _bytes({"model_state_dict": reference.ddpm_state_dict(10, 1, 100, seed=7)})})
    mean, std = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    expected = reference.ddpm_reference_forward(original, X, 10, mean, std)

    # by published name, pinned to a full commit hash
    model = load_published("wrn28_10_ddpm.dm_cifar100_linf", revision=first)
    assert model.config.id2label[0] == "apple" and torch.allclose(_logits(model), expected, atol=1e-5)
    # by repo id + filename (the table supplies the metadata), main = the newer commit
    newer = load_published(DM_REPO, filename="checkpoint/cifar100_linf_wrn28-10.pt")
    assert not torch.allclose(_logits(newer), expected, atol=1e-3)
    assert ("HEAD", f"/{DM_REPO}/resolve/{first}/checkpoint/cifar100_linf_wrn28-10.pt") in local_hub.requests
    # the file now sits in the HF cache: hf_hub_download's layout, reusable offline
    assert list((tmp_path / "hf-cache").glob("models--wzekai99--DM-Improves-AT/snapshots/*/checkpoint/*.pt"))
    with pytest.raises(FileNotFoundError, match=r"'checkpoint/missing.pt' does not exist in the Hub model repo"):
        load_published(DM_REPO, filename="checkpoint/missing.pt")


def test_convert_command_writes_a_save_pretrained_directory(reference, local_hub, tmp_path, capsys):
    original = reference.trades_state_dict(10, 1, 10, seed=8)
    local_hub.add_repo("someone/trades-awp", {"model.pt": _bytes(original)})
    out = tmp_path / "converted"
    assert main(["convert", "someone/trades-awp", str(out), "--filename", "model.pt", "--threat-model", "Linf:8/255"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "card.json", "config.json", "model.safetensors",
                                                    "preprocessor_config.json"]
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert torch.allclose(_logits(model), reference.trades_reference_forward(original, X, 10), atol=1e-5)
    assert "base_model: someone/trades-awp" in (out / "README.md").read_text()
    with pytest.raises(SystemExit):
        main(["convert", "someone/trades-awp", str(out), "--filename", "model.pt"])  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input
def test_unknown_layout_names_the_closest_layout_and_the_bad_keys(reference, tmp_path):
    state = _strip(reference.trades_state_dict(10, 1, 10, seed=9), "module.")
    state.pop("block2.layer.0.conv1.weight")
    state["block2.layer.0.attention.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ValueError) as error:
        load_published(tmp_path / "odd.pt")
    message = str(error.value)
    assert "odd.pt" in message and "Closest: 'trades'" in message
    assert "missing keys (1): layer.1.block.0.conv_0.weight" in message
    assert "unexpected keys (1): block2.layer.0.attention.weight" in message
    preact = timm.create_model("preact_resnet18").state_dict()
    with pytest.raises(ValueError, match=r"(?s)Closest: 'preact'.*unexpected keys \(1\): features.0.weight"):
        convert_checkpoint({**preact, "features.0.weight": torch.zeros(3)}, backbone="preact_resnet18")


def test_wrong_class_count_is_refused(reference, tmp_path):
    torch.save({"model_state_dict": reference.ddpm_state_dict(10, 1, 10, seed=10)}, tmp_path / "ten.pt")
    with pytest.raises(ValueError, match=r"10-class classifier .*but 100 classes were requested"):
        load_published(tmp_path / "ten.pt", dataset="cifar100")
    with pytest.raises(ValueError, match="but 3 classes were requested"):
        load_published(tmp_path / "ten.pt", class_names=["a", "b", "c"])


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create the marker file when unpickled

    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"init_conv.weight": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pt.*weights_only=True"):
        load_published(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoints_name_the_file(reference, tmp_path, suffix):
    state = _strip(reference.ddpm_state_dict(10, 1, 10, seed=11), "module.0.")
    path = tmp_path / f"weights{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"weights\{suffix}.*truncated or corrupted"):
        read_checkpoint(path)


def test_corrupted_config_json_names_the_file(reference, tmp_path):
    torch.save(reference.ddpm_state_dict(10, 1, 10, seed=12), tmp_path / "c.pt")
    assert main(["convert", str(tmp_path / "c.pt"), str(tmp_path / "out")]) == 0
    config = tmp_path / "out" / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(OSError, match="config.json"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    from hf_csr.hub import check_checkpoint_dir

    with pytest.raises(ValueError, match=r"config\.json.*not valid JSON.*truncated"):
        check_checkpoint_dir(tmp_path / "out")


def test_sources_that_are_neither_files_nor_repos(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        load_published(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="needs filename=.*cifar10_linf_wrn28-10.pt"):
        load_published(DM_REPO)
    with pytest.raises(ValueError, match="is a directory"):
        load_published(tmp_path)
    torch.save(json.loads("[1, 2]"), tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_published(tmp_path / "list.pt")
