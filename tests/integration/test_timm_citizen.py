"""hf_csr's backbones as timm models: features_only / feature_info, forward_intermediates, the head API,
TorchScript, gradient checkpointing (also through transformers' and the Trainer's switch, and inside the
attacks), and timm's Hub format in a saved / pushed RobustImageClassifier."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import checkpoint_seq
from timm.optim import param_groups_layer_decay

import hf_csr  # noqa: F401
from hf_csr import CSRTrainer, CSRTrainingArguments
from hf_csr.attacks import pgd_attack
from hf_csr.models import create_robust_classifier
from hf_csr.models.timm_format import TIMM_CONFIG_KEYS, TIMM_WEIGHTS_NAME


REPO_ROOT = Path(__file__).resolve().parents[2]
#: timm's peer test suite (a ``run.sh`` that runs timm's own tests/test_models.py on the models registered by
#: ``import hf_csr``) lives outside this repository; set this variable to its run.sh to run the test.
PEER_SUITE_VARIABLE = "HF_CSR_TIMM_PEER_SUITE"
PEER_SUITE = os.environ.get(PEER_SUITE_VARIABLE, "")

# name, tiny kwargs, expected feature_info: (module, channels, reduction)
FAMILIES = [
    ("preact_resnet18", dict(width=4, num_blocks=(1, 2, 1, 1)),
     [("conv1", 4, 1), ("layer1", 4, 1), ("layer2", 8, 2), ("layer3", 16, 4), ("layer4", 32, 8)]),
    ("wrn28_10_ddpm", dict(depth=16, width=2),
     [("init_conv", 16, 1), ("layer.0", 32, 1), ("layer.1", 64, 2), ("layer.2", 128, 4)]),
    ("wrn34_10_trades", dict(depth=10, width=1),
     [("init_conv", 16, 1), ("layer.0", 16, 1), ("layer.1", 32, 2), ("layer.2", 64, 4)]),
    ("mlp_tiny", dict(in_chans=3, img_size=32, hidden=(16, 8, 8, 4)),
     [("conv1", 16, 32), ("stages.0", 8, 32), ("stages.1", 8, 32), ("stages.2", 4, 32)]),
]
IDS = [f[0] for f in FAMILIES]
X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _hooked_outputs(model, names, x):
    """The outputs of the named submodules in a plain forward (an independent read of the stage outputs)."""
    captured = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
               for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [captured[n] for n in names]


# ----------------------------------------------------------------------------- features
@pytest.mark.parametrize("name, kwargs, expected", FAMILIES, ids=IDS)
def test_features_only_returns_stage_outputs_with_feature_info(name, kwargs, expected, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)

    def extractor(**options):  # the weights go in through timm's pretrained loading, as for a checkpoint
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 features_only=True, **kwargs, **options).eval()

    features = extractor()
    info = features.feature_info
    assert info.module_name() == [m for m, _, _ in expected]
    assert info.channels() == [c for _, c, _ in expected]
    assert info.reduction() == [r for _, _, r in expected]
    with torch.no_grad():
        outputs = features(X)
    reference = _hooked_outputs(model, info.module_name(), X)
    assert len(outputs) == len(expected)
    for out, ref, (_, channels, reduction) in zip(outputs, reference, expected):
        assert out.shape == (3, channels, 32 // reduction, 32 // reduction)
        assert torch.equal(out, ref)

    # a subset of levels, and timm's forward_intermediates-based extractor
    with torch.no_grad():
        got = extractor(out_indices=(1, -1))(X)
        assert [o.shape[1] for o in got] == [expected[1][1], expected[-1][1]]
        assert torch.equal(got[0], reference[1]) and torch.equal(got[1], reference[-1])
        for a, b in zip(extractor(feature_cls="getter")(X), reference, strict=True):
            assert torch.equal(a, b)
        pruned = extractor(feature_cls="getter", out_indices=(1, 2))  # prune_intermediate_layers drops the rest
        assert pruned.feature_info.channels() == [expected[1][1], expected[2][1]]
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in features.parameters())
        for a, b in zip(pruned(X), reference[1:3], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name, kwargs, expected", FAMILIES, ids=IDS)
def test_forward_intermediates_and_head_api(name, kwargs, expected):
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(X)
        assert torch.equal(final, model.forward_features(X))
        assert len(intermediates) == len(expected)
        normed = model.forward_intermediates(X, indices=1, norm=True, intermediates_only=True)
        assert torch.equal(normed[0], final)  # the final norm + activation applied to the last stage
        pre = model.forward_head(final, pre_logits=True)
        assert pre.shape == (3, model.head_hidden_size) == (3, model.num_features)
        assert torch.allclose(model.get_classifier()(pre), model(X))
        model.reset_classifier(0, "")
        assert model(X).shape == final.shape and model.num_classes == 0
    groups = param_groups_layer_decay(model, weight_decay=0.0, layer_decay=0.5)  # via group_matcher
    assert len({g["lr_scale"] for g in groups}) >= 3
    bare = timm.create_model(name, num_classes=0, global_pool="", **kwargs).eval()
    assert isinstance(bare.get_classifier(), torch.nn.Identity)
    with torch.no_grad():
        assert bare(X).shape == final.shape


@pytest.mark.parametrize("name, kwargs, expected", FAMILIES, ids=IDS)
def test_torchscript_matches_eager(name, kwargs, expected):
    with timm.set_scriptable(True):
        model = timm.create_model(name, num_classes=5, **kwargs).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(X), model(X), atol=1e-6)


# ----------------------------------------------------------------------------- gradient checkpointing
def _train_step(model, x, checkpointed):
    model = copy.deepcopy(model).train()
    model.set_grad_checkpointing(checkpointed)
    x = x.clone().requires_grad_(True)
    loss = model(x).logsumexp(1).mean() + model(x.flip(0) * 0.5).square().mean()  # two forwards, one backward
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), x.grad, grads, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, kwargs, expected", FAMILIES, ids=IDS)
def test_grad_checkpointing_gives_the_same_loss_gradients_and_batchnorm_statistics(name, kwargs, expected):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs)
    plain = _train_step(model, X, False)
    ckpt = _train_step(model, X, True)
    assert torch.equal(plain[0], ckpt[0])
    assert torch.allclose(plain[1], ckpt[1], atol=1e-7)  # input gradient through the checkpointed blocks
    for key in plain[2]:
        assert torch.allclose(plain[2][key], ckpt[2][key], atol=1e-7), key
    for key in plain[3]:  # BatchNorm running statistics: updated once per forward, as without checkpointing
        assert torch.equal(plain[3][key], ckpt[3][key]), key
    # torch.autograd.grad (what the attacks use) through checkpointed blocks, eval mode
    model.eval().set_grad_checkpointing(True)
    x = X.clone().requires_grad_(True)
    (grad_ckpt,) = torch.autograd.grad(model(x).sum(), [x])
    model.set_grad_checkpointing(False)
    (grad_plain,) = torch.autograd.grad(model(x).sum(), [x])
    assert torch.allclose(grad_ckpt, grad_plain, atol=1e-7)


def test_plain_checkpointing_would_count_batchnorm_twice():
    """Why hf_csr's blocks do not use timm's checkpoint_seq as is: the recomputation in the backward
    pass updates the BatchNorm running statistics a second time."""
    torch.manual_seed(0)
    model = timm.create_model("wrn28_10_ddpm", depth=10, width=1, num_classes=5).train()
    naive = copy.deepcopy(model)
    x = X.clone().requires_grad_(True)
    model(x).sum().backward()
    out = naive.act(naive.batchnorm(checkpoint_seq(naive.checkpointed_blocks(), naive.init_conv(x))))
    naive.forward_head(out).sum().backward()
    bn = "layer.0.block.0.batchnorm_0"
    assert int(naive.state_dict()[f"{bn}.num_batches_tracked"]) == 2
    assert int(model.state_dict()[f"{bn}.num_batches_tracked"]) == 1


def test_transformers_gradient_checkpointing_routes_to_the_backbone_and_the_attacks_agree():
    torch.manual_seed(0)
    model = create_robust_classifier("wrn28_10_ddpm", 4, depth=10, width=1).eval()
    assert model.supports_gradient_checkpointing
    y = torch.tensor([0, 1, 2])
    settings = dict(eps=8 / 255, step_size=2 / 255, steps=3, random_start="none")
    plain = pgd_attack(model, X, y, **settings)
    model.activation_checkpointing_enable()  # what the Trainer calls for gradient_checkpointing=True
    assert model.backbone.grad_checkpointing and model.is_activation_checkpointing
    assert torch.allclose(pgd_attack(model, X, y, **settings), plain, atol=1e-6)
    with pytest.raises(ValueError, match="use_reentrant"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.activation_checkpointing_disable()
    assert not model.backbone.grad_checkpointing
    with pytest.warns(FutureWarning):  # the deprecated transformers name still routes to the backbone
        model.gradient_checkpointing_enable()
    assert model.backbone.grad_checkpointing


@pytest.fixture
def _csr_trainer(fmnist, fmnist_model):
    def _csr_trainer(tmp_path, checkpointing):
        torch.manual_seed(0)
        model = fmnist_model("wrn28_10_ddpm", depth=10, width=1)
        args = CSRTrainingArguments(
            output_dir=str(tmp_path / ("ckpt" if checkpointing else "plain")), max_steps=2, per_device_train_batch_size=16,
            learning_rate=0.05, attack_steps=2, logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
            seed=0, base_loss="trades", csr_variant="paper", csr_gamma=0.1, awp_gamma=0.005, awp_warmup=0,
            csr_confusion_source="ema", gradient_checkpointing=checkpointing, report_to=[],
        )
        trainer = CSRTrainer(model=model, args=args, train_dataset=fmnist(limit=32))
        trainer.train()
        return trainer
    return _csr_trainer


def test_trades_csr_awp_training_with_gradient_checkpointing_matches_plain(_csr_trainer, tmp_path):
    plain = _csr_trainer(tmp_path, False)
    ckpt = _csr_trainer(tmp_path, True)
    assert ckpt.model.backbone.grad_checkpointing and not plain.model.backbone.grad_checkpointing
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, ckpt)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    a, b = plain.model.state_dict(), ckpt.model.state_dict()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-5, rtol=0), key


# ----------------------------------------------------------------------------- timm's Hub format
def _normalised(model, x):
    return (x - model.image_mean) / model.image_std


@pytest.mark.parametrize("backbone, kwargs", [("wrn28_10_ddpm", dict(depth=10, width=1)),
                                              ("test_resnet", {})])  # one of timm's own small models
def test_pushed_model_loads_with_timm_hf_hub(fmnist_model, local_hub, tmp_path, backbone, kwargs):
    from hf_csr.hub import push_checkpoint

    torch.manual_seed(0)
    model = fmnist_model(backbone, **kwargs).eval()
    with torch.no_grad():  # as after training: non-trivial BatchNorm statistics, no zero-initialised weights
        for name, buffer in model.backbone.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
        for parameter in model.backbone.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.1)
    directory = tmp_path / "run"
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "robust_image_classifier" and config["architecture"] == backbone
    assert config["pretrained_cfg"]["mean"] == pytest.approx(model.config.image_mean)
    assert config["label_names"] == [model.config.id2label[i] for i in range(10)]
    assert "tag" not in config["pretrained_cfg"]  # not the published checkpoint the default tag names
    own = backbone == "wrn28_10_ddpm"
    assert config["pretrained_cfg"]["hf_hub_filename"] == ("model.safetensors" if own else TIMM_WEIGHTS_NAME)
    assert (directory / TIMM_WEIGHTS_NAME).exists() != own  # hf_csr's backbones store the weights once

    reloaded = type(model).from_pretrained(directory)
    assert not any(hasattr(reloaded.config, key) for key in TIMM_CONFIG_KEYS if key != "num_classes")

    push_checkpoint(directory, "me/robust")
    timm_model = timm.create_model("hf-hub:me/robust", pretrained=True).eval()
    assert type(timm_model) is type(model.backbone)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).logits
        assert torch.equal(timm_model(_normalised(model, x)), expected)  # the timm model does not normalise
        assert not torch.allclose(timm_model(x), expected)
    data_config = timm.data.resolve_data_config(model=timm_model)
    assert data_config["mean"] == pytest.approx(tuple(model.config.image_mean))
    assert data_config["input_size"] == (1, 28, 28)


def test_backbone_without_timm_metadata_saves_as_before(fmnist_model, tmp_path):
    model = fmnist_model("test_tiny_convnet")  # a plain nn.Module registered by hand: no pretrained_cfg
    model.save_pretrained(tmp_path)
    assert "architecture" not in json.loads((tmp_path / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]


def test_save_pretrained_merges_timm_keys_without_breaking_transformers(tmp_path):
    model = create_robust_classifier("preact_resnet18", 3, width=4, num_blocks=(1, 1, 1, 1)).eval()
    model.save_pretrained(tmp_path)
    local = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(local(_normalised(model, X)), model(X).logits)
    # saving again (e.g. after fine-tuning) rewrites the timm keys from the current model
    model.config.id2label = {0: "a", 1: "b", 2: "c"}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["label_names"] == ["a", "b", "c"]


# ----------------------------------------------------------------------------- timm's own model tests
@pytest.mark.subprocess
@pytest.mark.skipif(not PEER_SUITE, reason=f"set {PEER_SUITE_VARIABLE} to the timm peer suite's run.sh to run it")
@pytest.mark.slow
def test_timm_model_test_suite_passes_on_every_registered_model():
    """timm's own tests/test_models.py, run by the peer suite's run.sh (``$HF_CSR_TIMM_PEER_SUITE``) on every
    model `import hf_csr` registers (the pretrained-download tests aside)."""
    assert Path(PEER_SUITE).is_file(), f"{PEER_SUITE_VARIABLE}={PEER_SUITE!r} is not a file; point it at the suite's run.sh"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(["bash", str(PEER_SUITE), sys.executable], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True)
    tail = (result.stdout + result.stderr)[-3000:]
    summary = [line for line in result.stdout.splitlines() if re.search(r"\d+ passed", line)]
    assert result.returncode == 0 and summary, tail
    assert "failed" not in summary[-1] and "error" not in summary[-1], summary[-1]
