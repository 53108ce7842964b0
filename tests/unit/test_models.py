"""Backbones in timm's registry, published layouts, and the transformers RobustImageClassifier."""

import pytest
import timm
import torch
from transformers import AutoConfig, AutoModelForImageClassification

import hf_csr  # noqa: F401  (registers everything)
from hf_csr.models import RobustClassifierConfig, RobustImageClassifier, create_robust_classifier
from hf_csr.models.wide_resnet import checkpoint_filter_fn


@pytest.mark.parametrize(
    "name, expected_millions",
    [("preact_resnet18", 11.2), ("preact_resnet_tiny", 0.0776), ("wrn28_10_ddpm", 36.5), ("wrn34_10_ddpm", 46.2), ("wrn70_16_ddpm", 267.0),
     ("wrn28_10_trades", 36.5), ("wrn34_10_trades", 46.2), ("wrn70_16_trades", 267.0)],
)
def test_parameter_counts(name, expected_millions):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - expected_millions) / expected_millions < 0.005, count


def test_pretrained_cfgs_carry_input_size_mean_std():
    for name in ("preact_resnet18", "wrn28_10_ddpm", "wrn34_10_trades", "wrn70_16_ddpm.dm_cifar10_linf"):
        cfg = timm.models.get_pretrained_cfg(name if "." in name else timm.models.get_arch_name(name))
        assert cfg.input_size == (3, 32, 32) and len(cfg.mean) == 3 and len(cfg.std) == 3
    assert timm.models.get_pretrained_cfg("wrn34_10_trades").mean == (0.0, 0.0, 0.0)  # TRADES: no normalisation
    dm = timm.models.get_pretrained_cfg("wrn28_10_ddpm.dm_cifar10_linf")
    assert dm.hf_hub_id == "wzekai99/DM-Improves-AT" and dm.hf_hub_filename == "checkpoint/cifar10_linf_wrn28-10.pt"


def test_small_variants_are_constructible():
    x = torch.rand(2, 3, 32, 32)
    for name, kwargs in (("preact_resnet18", dict(width=4, num_blocks=(1, 1, 1, 1))),
                         ("wrn28_10_ddpm", dict(depth=10, width=1)),
                         ("wrn34_10_trades", dict(depth=10, width=1))):
        model = timm.create_model(name, num_classes=5, **kwargs)
        assert model(x).shape == (2, 5)
        assert model.get_classifier().out_features == 5
        model.reset_classifier(7)
        assert model(x).shape == (2, 7)


# ----------------------------------------------------------------------------- reference implementations (tests/support/reference_models.py)
@pytest.mark.parametrize("depth, width", [(10, 1), (16, 2)])
def test_ddpm_layout_matches_reference_implementation(reference, depth, width, tmp_path):
    checkpoint = reference.ddpm_state_dict(depth, width, 10, seed=depth)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = reference.ddpm_reference_forward(checkpoint, x, depth)

    # 1) through timm's own pretrained loading (file source + hf_csr's filter fn), as hf_hub would.
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": checkpoint}, path)
    backbone = timm.create_model("wrn28_10_ddpm", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 depth=depth, width=width, num_classes=10).eval()
    with torch.no_grad():
        got = backbone((x - reference.CIFAR10_MEAN) / reference.CIFAR10_STD)
    assert torch.allclose(got, expected, atol=1e-5)

    # 2) inside a RobustImageClassifier, which normalises [0, 1] inputs itself.
    model = create_robust_classifier("wrn28_10_ddpm", 10, depth=depth, width=width).eval()
    model.backbone.load_state_dict(checkpoint_filter_fn(checkpoint))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, expected, atol=1e-5)


@pytest.mark.parametrize("depth, width", [(10, 1), (16, 2)])
def test_trades_layout_matches_reference_implementation(reference, depth, width):
    checkpoint = reference.trades_state_dict(depth, width, 10, seed=depth)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = reference.trades_reference_forward(checkpoint, x, depth)
    model = create_robust_classifier("wrn34_10_trades", 10, depth=depth, width=width).eval()
    model.backbone.load_state_dict(checkpoint_filter_fn({"model_state_dict": checkpoint}))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, expected, atol=1e-5)


# ----------------------------------------------------------------------------- RobustImageClassifier
def test_backbone_keeps_its_own_initialisation():
    torch.manual_seed(3)
    direct = timm.create_model("wrn28_10_ddpm", num_classes=4, depth=10, width=1)
    torch.manual_seed(3)
    wrapped = create_robust_classifier("wrn28_10_ddpm", 4, depth=10, width=1)
    for (name, a), b in zip(direct.state_dict().items(), wrapped.backbone.state_dict().values()):
        assert torch.equal(a, b), name


def test_round_trip_through_auto_classes(tmp_path):
    names = ["t-shirt", "trouser", "pullover"]
    model = create_robust_classifier("preact_resnet18", class_names=names, num_channels=1, image_size=28,
                                     mean=[0.286], std=[0.353], threat_model={"norm": "L2", "eps": 0.5}, width=4)
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, RobustClassifierConfig)
    assert config.id2label == {0: "t-shirt", 1: "trouser", 2: "pullover"}
    assert config.threat_model == {"norm": "L2", "eps": 0.5} and config.image_mean == [0.286]
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RobustImageClassifier)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    out = loaded(x, labels=torch.tensor([0, 1, 2, 0, 1]))
    assert out.loss is not None and out.logits.shape == (5, 3)


def test_bad_inputs_to_the_classifier():
    model = create_robust_classifier("preact_resnet18", 3, width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"pixel_values must lie in \[0, 1\]"):
        model((x - 0.5) / 0.25)
    with pytest.raises(ValueError, match="has 1 channels but the model expects num_channels = 3"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x.masked_fill(x > 0.9, float("nan")))
    with pytest.raises(ValueError, match="floating-point"):
        model((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"labels lie in \[.*\] but the model has num_classes"):
        model(x, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="unknown backbone 'wrn28_10_dpm'.*Did you mean"):
        RobustClassifierConfig(backbone="wrn28_10_dpm")
    with pytest.raises(ValueError, match="threat_model\\['norm'\\] must be one of"):
        RobustClassifierConfig(threat_model={"norm": "L1", "eps": 1.0})
    with pytest.raises(ValueError, match="image_mean must hold 3"):
        RobustClassifierConfig(image_mean=[0.5])


def test_absurd_sizes_are_rejected_before_allocation():
    config = RobustClassifierConfig(backbone="wrn28_10_ddpm", backbone_kwargs={"width": 4000})
    with pytest.raises(ValueError, match="more than the limit"):
        RobustImageClassifier(config)
