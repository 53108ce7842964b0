"""CSRTrainer as a transformers citizen on the Hub (issue 16): push_to_hub saves, renders the card for the
repo, then uploads only safe files; push_to_hub=True with every hub_strategy pushes once per save, never a
pickle nor a half-written checkpoint; the inherited create_model_card gives the robust card. Everything is
asserted by listing what the local Hub test server received."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, metadata_load
from transformers import AutoModelForImageClassification

import hf_csr
from hf_csr import CSRTrainer
from hf_csr.models.published import load_published


REPO = Path(__file__).resolve().parents[2]
SAFE = re.compile(r"^(\.gitattributes|README\.md|config\.json|preprocessor_config\.json|results\.json|"
                  r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|trainer_state\.json|.*\.png)$")


def _commits(hub, repo_id):
    return list(hub.repos[("model", repo_id)].commits.values())


def _assert_only_safe(files):
    for name in files:
        assert SAFE.match(name.split("/")[-1]), f"unsafe file pushed: {name}"
        assert not name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")), name


def _assert_no_local_path(files, *paths):
    for name, content in files.items():
        text = content.decode("utf-8", "replace")
        for path in paths:
            assert str(path) not in text, f"{name} leaks the local path {path}"


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint"])
def test_push_to_hub_true_pushes_only_safe_files_once_per_save(fmnist, fmnist_model, make_args, tmp_path, local_hub, strategy):  # noqa: F811
    torch.manual_seed(0)
    args = make_args(tmp_path, push_to_hub=True, hub_model_id=f"me/{strategy}", hub_strategy=strategy,
                     max_steps=4, save_steps=2)
    trainer = CSRTrainer(model=fmnist_model(), args=args, train_dataset=fmnist(limit=64),
                         eval_dataset=fmnist("test", limit=20))
    trainer.train()
    repo_id = f"me/{strategy}"
    pushes = [c for c in _commits(local_hub, repo_id) if "model.safetensors" in c]
    assert len(pushes) == 2  # two saves (steps 2 and 4), one commit each
    for files in _commits(local_hub, repo_id):
        _assert_only_safe(files)
    listing = set(local_hub.files(repo_id))
    top = {".gitattributes", "README.md", "config.json", "preprocessor_config.json", "model.safetensors"}
    if strategy == "checkpoint":
        assert listing == top | {f"last-checkpoint/{n}" for n in
                                 ("config.json", "preprocessor_config.json", "model.safetensors", "trainer_state.json")}
        state = json.loads(local_hub.files(repo_id)["last-checkpoint/trainer_state.json"])
        assert state["global_step"] == 4
    else:
        assert listing == top
    # the pushed weights are the step-4 checkpoint's, complete
    loaded = AutoModelForImageClassification.from_pretrained(repo_id)
    assert all(torch.equal(v, _weights(trainer.model)[k]) for k, v in _weights(loaded).items())
    assert not (Path(args.output_dir) / "training_args.bin").exists()  # transformers' own sync did not run
    card = local_hub.files(repo_id)["README.md"].decode()
    assert f"from_pretrained('{repo_id}')" in card and "| global\\_batch\\_size | 16 |" in card

    # the user's save_model() pushes once, after the files are in place; then evaluate + push_to_hub once more
    before = len(_commits(local_hub, repo_id))
    trainer.save_model()
    assert len(_commits(local_hub, repo_id)) == before + 1
    trainer.evaluate_and_report(attacks="clean,pgd5")
    trainer.push_to_hub()
    assert len(_commits(local_hub, repo_id)) == before + 2
    final = local_hub.files(repo_id)
    assert "results.json" in final and all(SAFE.match(n.split("/")[-1]) for n in final)
    _assert_no_local_path(final, tmp_path, os.getcwd(), REPO)


def test_readme_python_example_pushes_as_written(tmp_path, local_hub, monkeypatch):  # noqa: F811
    """The README's Python block, executed as written; only the data (CIFAR-10 cannot be downloaded here), the
    model width and the run length are shrunk, through the very functions the block calls."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("In Python, CSR is a Trainer:\n\n```python\n")[1].split("```")[0]
    assert "trainer.push_to_hub()" in block and "evaluate_and_report" in block
    import hf_csr.data
    from hf_csr.data.core import TensorImageDataset

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def tiny_cifar(name, split, limit=None, **kwargs):
        assert name == "uoft-cs/cifar10"
        n = limit or 40
        generator = torch.Generator().manual_seed(0 if split == "train" else 1)
        images = torch.randint(0, 256, (min(n, 40), 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.arange(min(n, 40)) % 10
        return TensorImageDataset(images, labels, names, name=f"cifar10[{split}]")

    real_args, real_model = hf_csr.CSRTrainingArguments, hf_csr.create_robust_classifier

    def small_args(**kwargs):
        kwargs.update(output_dir=str(tmp_path / "outputs" / "cifar10-csr"), num_train_epochs=1, max_steps=2,
                      per_device_train_batch_size=8, attack_steps=1, bf16=False, use_cpu=True, disable_tqdm=True,
                      hub_model_id="me/cifar10-csr", eval_strategy="no", report_to="none")
        return real_args(**kwargs)

    monkeypatch.setattr(hf_csr.data, "load_image_dataset", tiny_cifar)
    monkeypatch.setattr(hf_csr, "CSRTrainingArguments", small_args)
    monkeypatch.setattr(hf_csr, "create_robust_classifier",
                        lambda *a, **k: real_model(*a, width=4, num_blocks=(1, 1, 1, 1), **k))
    block = block.replace('attacks="clean,pgd20,cw20,autoattack"', 'attacks="clean,pgd20"')  # AutoAttack: see below
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    trainer = namespace["trainer"]
    files = local_hub.files("me/cifar10-csr")
    _assert_only_safe(files)
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "results.json"} <= set(files)
    metadata = metadata_load(Path(trainer.args.output_dir) / "README.md")
    assert metadata["datasets"] == ["uoft-cs/cifar10"] and metadata["library_name"] == "hf_csr"
    card = files["README.md"].decode()
    assert "from_pretrained('me/cifar10-csr')" in card and "with Confusional Spectral Regularization (CSR)" in card
    assert "| method | PGD-AT \\+ CSR \\(Confusional Spectral Regularization\\) |" in card
    _assert_no_local_path(files, tmp_path, os.getcwd())


def test_create_model_card_is_the_robust_card_and_the_pushed_card_is_complete(make_args, reference, tmp_path, local_hub):  # noqa: F811
    local_hub.add_repo("someone/wrn-ddpm", {"model.pt": _pt_bytes(reference.ddpm_state_dict(10, 1, 10, seed=3))})
    model = load_published("someone/wrn-ddpm", filename="model.pt", dataset="cifar10")
    assert model.config.base_model == "someone/wrn-ddpm"
    from hf_csr.data.core import TensorImageDataset

    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = TensorImageDataset(images, torch.arange(20) % 10, list(model.config.id2label.values()), name="cifar10[train]")
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     save_strategy="no", hub_model_id="me/ddpm-csr", csr_alpha=0.3, csr_gamma=0.1,
                     csr_variant="paper", base_loss="trades", lr_milestones="1")
    trainer = CSRTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    # the inherited entry point, before any evaluation or save: the robust card, from the trainer alone
    path = trainer.create_model_card()
    card = ModelCard.load(path)
    assert card.data.library_name == "hf_csr" and card.data.base_model == "someone/wrn-ddpm"
    assert card.data.license == "other" and card.data.license_link == "https://huggingface.co/someone/wrn-ddpm"
    text = card.text
    assert "backbone wrn28\\_10\\_ddpm" in text and "(N, 3, 32, 32)" in text  # backbone and input shape from the model itself
    for row in ("| method | TRADES \\+ CSR \\(Confusional Spectral Regularization\\) |", "| csr\\_variant | paper |",
                "| csr\\_confusion\\_source | ema |", "| csr\\_alpha | 0.3 |", "| csr\\_gamma | 0.1 |",
                "| global\\_batch\\_size | 8 |", "| devices | 1 |", "| optimizer | sgd \\(momentum=0.9\\) |",
                "| precision | fp32 |", "| base\\_loss | trades |"):
        assert row in text, row
    assert "threat\\_model | Linf, eps = 0.031373 \\(8/255\\)" in text
    assert "## Intended uses and limitations" in text and "## Framework versions" in text
    assert f"- transformers {__import__('transformers').__version__}" in text
    assert "@inproceedings{jin2025enhancing" in text and "Not recorded" not in text

    trainer.train()
    trainer.evaluate_and_report(attacks="clean,pgd5", max_examples=10)
    results = json.loads((Path(args.output_dir) / "results.json").read_text())
    assert results["attacks"]["clean"]["num_examples"] == 10  # max_examples honoured
    info = trainer.push_to_hub()
    files = local_hub.files("me/ddpm-csr")
    pushed = ModelCard(files["README.md"].decode())
    assert info.oid in local_hub.repos[("model", "me/ddpm-csr")].commits
    assert pushed.data.base_model == "someone/wrn-ddpm" and pushed.data.datasets == ["uoft-cs/cifar10"]
    assert pushed.data.model_name == "ddpm-csr" and "from_pretrained('me/ddpm-csr')" in pushed.text
    assert {r.metric_config for r in pushed.data.eval_results} == {"clean", "pgd5", "worst_of_all"}
    assert "| steps | 1 |" in pushed.text
    _assert_only_safe(files)
    _assert_no_local_path(files, tmp_path, os.getcwd(), Path.home())
    config = json.loads(files["config.json"])
    assert config["base_model"] == "someone/wrn-ddpm"


def _pt_bytes(state):
    import io

    buffer = io.BytesIO()
    torch.save({"model_state_dict": state}, buffer)
    return buffer.getvalue()


def test_push_does_not_follow_symlinks(fmnist_model, tmp_path, local_hub):  # noqa: F811
    from hf_csr.hub import push_checkpoint

    directory = tmp_path / "run"
    fmnist_model().save_pretrained(directory)
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret.png").write_bytes(b"\x89PNG not yours")
    (secret / "results.json").write_text("{}")
    os.symlink(secret / "secret.png", directory / "plot.png")  # a file link matching a pushed pattern
    os.symlink(secret, directory / "plots")  # a folder link
    push_checkpoint(directory, "me/links")
    received = local_hub.files("me/links")
    assert set(received) == {".gitattributes", "README.md", "config.json", "preprocessor_config.json",
                             "model.safetensors"}
    assert not any(b"not yours" in content for content in received.values())


def test_hf_csr_push_refreshes_the_card_for_the_repo(fmnist_model, tmp_path, local_hub):  # noqa: F811
    from hf_csr.cli import main
    from hf_csr.hub import write_model_card

    directory = tmp_path / "run"
    fmnist_model().save_pretrained(directory)
    write_model_card(directory, training={"base_loss": "pgd"})
    assert "path/to/this/checkpoint" in (directory / "README.md").read_text()
    assert main(["push", str(directory), "me/refreshed"]) == 0
    card = ModelCard(local_hub.files("me/refreshed")["README.md"].decode())
    assert "from_pretrained('me/refreshed')" in card.text and "path/to/this/checkpoint" not in card.text
    assert card.data.model_name == "refreshed" and "| base\\_loss | pgd |" in card.text
    assert "from_pretrained('me/refreshed')" in (directory / "README.md").read_text()  # written after the push


def test_converted_third_party_model_keeps_its_licence(reference, tmp_path, local_hub):  # noqa: F811
    from hf_csr.cli import main

    local_hub.add_repo("someone/wrn-ddpm", {"model.pt": _pt_bytes(reference.ddpm_state_dict(10, 1, 10, seed=3))})
    out = tmp_path / "converted"
    assert main(["convert", "someone/wrn-ddpm", str(out), "--filename", "model.pt"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "someone/wrn-ddpm" and card.data.license == "other"
    assert card.data.license_link == "https://huggingface.co/someone/wrn-ddpm"
    assert json.loads((out / "config.json").read_text())["base_model"] == "someone/wrn-ddpm"
    assert main(["convert", "someone/wrn-ddpm", str(tmp_path / "mit"), "--filename", "model.pt", "--license", "mit"]) == 0
    assert ModelCard.load(tmp_path / "mit" / "README.md").data.license == "mit"


def test_hub_repos_of_transformers_and_timm_models_load_in_one_line(tmp_path, local_hub):  # noqa: F811
    import timm
    from timm.models._hub import save_for_hf
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from hf_csr import load_robust_model

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16,
                                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                              num_labels=4)).eval()
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        tmp_path / "vit")
    vit.save_pretrained(tmp_path / "vit")
    local_hub.add_repo("me/vit", {p.name: p.read_bytes() for p in (tmp_path / "vit").iterdir()})
    net = timm.create_model("test_resnet", num_classes=4, pretrained_cfg_overlay=dict(input_size=(3, 16, 16),
                                                                                     crop_pct=1.0)).eval()
    save_for_hf(net, tmp_path / "tm")
    local_hub.add_repo("me/tiny-timm", {p.name: p.read_bytes() for p in (tmp_path / "tm").iterdir()})

    x = torch.rand(3, 3, 24, 24)  # another size: resized inside
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        assert torch.allclose(load_robust_model("me/vit")(x), vit((small - 0.5) / 0.25).logits, atol=1e-5)
        expected = net((small - torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1))
                       / torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1))
        for name in ("me/tiny-timm", "hf-hub:me/tiny-timm"):
            assert torch.allclose(load_robust_model(name)(x), expected, atol=1e-5), name


def test_a_failed_checkpoint_push_is_logged_and_the_next_save_pushes(fmnist, fmnist_model, make_args, tmp_path, local_hub, caplog):  # noqa: F811
    torch.manual_seed(0)
    args = make_args(tmp_path, push_to_hub=True, hub_model_id="me/flaky", max_steps=4, save_steps=2)
    trainer = CSRTrainer(model=fmnist_model(), args=args, train_dataset=fmnist(limit=64))
    local_hub.fail_next("commit", 500)
    with caplog.at_level("WARNING", logger="hf_csr.trainer"):
        trainer.train()  # goes on after the failed push at step 2
    assert any("training goes on" in record.getMessage() for record in caplog.records)
    pushes = [c for c in _commits(local_hub, "me/flaky") if "model.safetensors" in c]
    assert len(pushes) == 1 and (Path(args.output_dir) / "checkpoint-4").is_dir()
    loaded = AutoModelForImageClassification.from_pretrained("me/flaky")
    assert all(torch.equal(v, _weights(trainer.model)[k]) for k, v in _weights(loaded).items())
