"""Load anything robust in one line (issue 16): transformers classifiers with their image processor and timm
models with their pretrained config, folded into the model so that attacks run in pixel space on the real input;
plain PyTorch classifiers (Python module, or package.module:factory + weights on the command line); published
names and .pt files; pipeline("image-classification") on saved models."""

import json
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch

import hf_csr
from hf_csr.cli import main
from hf_csr.data import FASHION_MNIST_CLASSES, load_image_dataset
from hf_csr.models.loading import PixelSpaceClassifier, load_robust_model


EPS = 0.1
LIMIT = 40


def _data():
    return load_image_dataset("fashion_mnist", "test", limit=LIMIT, seed=0)


def _pil(x):
    """[0, 1] (1, H, W) tensors of uint8 values -> PIL greyscale images (what a user hands a processor)."""
    return [PIL.Image.fromarray((xi[0] * 255).round().to(torch.uint8).numpy(), mode="L") for xi in x]


class _Recorder:
    """Records every input the evaluation feeds the loaded model (pixel space, before folding)."""

    def __init__(self, monkeypatch):
        self.inputs = []
        forward = PixelSpaceClassifier.forward

        def recording(module, pixel_values, **kwargs):
            self.inputs.append(pixel_values.detach().clone())
            return forward(module, pixel_values, **kwargs)

        monkeypatch.setattr(PixelSpaceClassifier, "forward", recording)

    def check_budget(self, clean, eps):
        """Every input lies in [0, 1] and within eps (Linf) of one of the clean images."""
        flat = clean.flatten(1)
        assert self.inputs
        for batch in self.inputs:
            assert batch.min() >= 0 and batch.max() <= 1
            distance = (batch.flatten(1)[:, None, :] - flat[None]).abs().amax(-1).min(1).values
            assert distance.max().item() <= eps + 1e-6, distance.max().item()
        return max((b.flatten(1)[:, None, :] - flat[None]).abs().amax(-1).min(1).values.max().item() for b in self.inputs)


def _evaluate(tmp_path, *model_args):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", *model_args, "--dataset", "fashion_mnist", "--limit", str(LIMIT),
                 "--attacks", "pgd5", "--norm", "Linf", "--eps", str(EPS), "--output-dir", str(out),
                 "--no-progress", "--batch-size", "16"]) == 0
    return json.loads((out / "results.json").read_text())


def test_tiny_transformers_classifier_with_a_resizing_normalising_processor(tmp_path, monkeypatch):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=37, num_labels=10,
                       id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
                       label2id={n: i for i, n in enumerate(FASHION_MNIST_CLASSES)})
    processor = ViTImageProcessor(do_resize=True, size={"height": 32, "width": 32}, do_rescale=True,
                                  do_normalize=True, image_mean=[0.286], image_std=[0.353])
    data = _data()
    x, y = data.tensors()
    model = ViTForImageClassification(config)
    pixel_values = processor(_pil(x), return_tensors="pt")["pixel_values"]  # 28 x 28 -> 32 x 32, normalised
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(pixel_values).logits, y).backward()
        optimizer.step()
    model.eval()
    directory = tmp_path / "vit"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)

    with torch.no_grad():
        direct = model(processor(_pil(x), return_tensors="pt")["pixel_values"]).logits.argmax(-1)
    assert len(set(direct.tolist())) > 2
    loaded = load_robust_model(str(directory))
    assert isinstance(loaded, PixelSpaceClassifier)
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(-1), direct)  # the processor is folded in, example for example

    recorder = _Recorder(monkeypatch)
    results = _evaluate(tmp_path, str(directory))
    assert results["attacks"]["clean"]["accuracy"] == pytest.approx((direct == y).float().mean().item())
    assert results["class_names"] == list(FASHION_MNIST_CLASSES)
    largest = recorder.check_budget(x, EPS)
    assert largest > 0.5 * EPS  # the attack did perturb, in pixel space
    assert results["attacks"]["pgd5"]["accuracy"] < results["attacks"]["clean"]["accuracy"]


def test_tiny_timm_model_in_timm_hub_format(tmp_path, monkeypatch):
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1, pretrained_cfg_overlay=dict(
        input_size=(1, 32, 32), crop_pct=0.875, crop_mode="center", mean=(0.286,), std=(0.353,),
        interpolation="bilinear"))
    data = _data()
    x, y = data.tensors()
    transform = create_transform(**resolve_data_config({}, model=model))  # resize 36, centre crop 32, normalise
    pixel_values = torch.stack([transform(image) for image in _pil(x)])
    assert pixel_values.shape == (LIMIT, 1, 32, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(pixel_values), y).backward()
        optimizer.step()
    model.eval()
    directory = tmp_path / "timm-model"
    save_for_hf(model, directory, model_config={"label_names": list(FASHION_MNIST_CLASSES)})
    assert json.loads((directory / "config.json").read_text())["architecture"] == "test_resnet"

    with torch.no_grad():
        # timm's own eval transform, on the very images the evaluation sees (float [0, 1] tensors: resize 36,
        # centre crop 32, normalise), and on PIL images (uint8 after PIL's resize: off by rounding at most)
        direct = model(torch.stack([transform(image) for image in x])).argmax(-1)
        via_pil = model(torch.stack([transform(image) for image in _pil(x)])).argmax(-1)
    assert len(set(direct.tolist())) > 2 and (direct == via_pil).float().mean() >= 0.9
    for source in (str(directory), f"local-dir:{directory}"):
        loaded = load_robust_model(source)
        with torch.no_grad():
            assert torch.equal(loaded(x).argmax(-1), direct), source

    recorder = _Recorder(monkeypatch)
    results = _evaluate(tmp_path, str(directory))
    assert results["attacks"]["clean"]["accuracy"] == pytest.approx((direct == y).float().mean().item())
    assert results["class_names"] == list(FASHION_MNIST_CLASSES)
    assert recorder.check_budget(x, EPS) > 0.5 * EPS


LENET = textwrap.dedent('''
    import torch
    from torch import nn

    class LeNet(nn.Module):
        """Flattens with .view: needs contiguous inputs."""

        def __init__(self, classes=10):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 5)
            self.fc = nn.Linear(4 * 12 * 12, classes)

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.conv(x)), 2)
            return self.fc(x.view(x.size(0), -1))

    def lenet(classes=10):
        return LeNet(classes)
''')


def test_plain_pytorch_classifier_from_the_command_line_and_from_python(tmp_path, monkeypatch):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(LENET)
    monkeypatch.syspath_prepend(str(tmp_path))
    from userpkg.nets import lenet

    torch.manual_seed(0)
    data = _data()
    x, y = data.tensors()
    model = lenet()
    normalised = (x - 0.286) / 0.353
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(normalised), y).backward()
        optimizer.step()
    model.eval()
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "lenet.safetensors")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "lenet.pt")
    with torch.no_grad():
        direct = model(normalised).argmax(-1)

    wrapped = load_robust_model(model, input_size=(1, 28, 28), mean=[0.286], std=[0.353],
                                class_names=FASHION_MNIST_CLASSES)
    with torch.no_grad():
        assert torch.equal(wrapped(x).argmax(-1), direct)

    recorder = _Recorder(monkeypatch)
    for weights in ("lenet.safetensors", "lenet.pt"):
        results = _evaluate(tmp_path, "userpkg.nets:lenet", "--weights", str(tmp_path / weights), "--input-size",
                            "1,28,28", "--mean", "0.286", "--std", "0.353", "--class-names", ",".join(FASHION_MNIST_CLASSES),
                            "--factory-kwargs", '{"classes": 10}')
        assert results["attacks"]["clean"]["accuracy"] == pytest.approx((direct == y).float().mean().item())
    recorder.check_budget(x, EPS)

    with pytest.raises(SystemExit):  # a named error, not a traceback
        main(["evaluate", "--model", "userpkg.nets:missing", "--weights", str(tmp_path / "lenet.pt"),
              "--input-size", "1,28,28", "--dataset", "fashion_mnist", "--output-dir", str(tmp_path / "e")])
    with pytest.raises(ValueError, match="do not fit the model"):
        load_robust_model("userpkg.nets:lenet", weights=tmp_path / "lenet.pt", input_size=(1, 28, 28),
                          factory_kwargs={"classes": 3})
    with pytest.raises(ValueError, match="give the input size"):
        load_robust_model(model)


def test_published_names_and_pt_files_load_like_the_recipes(reference, tmp_path, offline_cache):  # noqa: F811

    torch.save({"model_state_dict": reference.ddpm_state_dict(10, 1, 10, seed=2)}, tmp_path / "wrn.pt")
    model = load_robust_model(str(tmp_path / "wrn.pt"))
    assert isinstance(model, hf_csr.RobustImageClassifier) and model.config.backbone.startswith("wrn")
    with pytest.raises(FileNotFoundError, match="not in the HF cache|cannot be reached|does not exist"):
        load_robust_model("wrn28_10_ddpm.dm_cifar10_linf")  # the published name resolves to its Hub file
    with pytest.raises(ValueError, match="cannot load 'no-such-thing'"):
        load_robust_model("no-such-thing")


def test_pipeline_on_a_saved_model_returns_the_models_top_class(fmnist_model, tmp_path):
    from transformers import AutoImageProcessor, pipeline

    torch.manual_seed(0)
    model = fmnist_model().eval()
    data = load_image_dataset("fashion_mnist", "test", limit=20, seed=3)
    x, y = data.tensors()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x).logits, y).backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "preprocessor_config.json").is_file()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "m")
    assert processor.do_normalize is False  # the model normalises inside
    classify = pipeline("image-classification", model=str(tmp_path / "m"), device="cpu")
    with torch.no_grad():
        expected = [model.config.id2label[int(i)] for i in model(x).logits.argmax(-1)]
    predicted = [out[0]["label"] for out in classify(_pil(x))]
    assert predicted == expected and len(set(expected)) > 1


def test_create_robust_classifier_from_the_data_and_mismatches_caught_at_construction(make_args, tmp_path):
    from hf_csr import CSRTrainer, create_robust_classifier


    data = load_image_dataset("fashion_mnist", "train", limit=40)
    model = create_robust_classifier("preact_resnet18", dataset=data, width=4, num_blocks=(1, 1, 1, 1))
    assert (model.config.num_channels, model.config.image_size, model.config.num_labels) == (1, 28, 10)
    assert model.config.id2label[9] == "Ankle boot"
    with pytest.raises(ValueError, match="num_channels = 3 but the dataset's images have 1"):
        create_robust_classifier("preact_resnet18", dataset=data, num_channels=3)
    wrong = create_robust_classifier("preact_resnet18", num_classes=10, width=4, num_blocks=(1, 1, 1, 1))  # 3x32x32
    with pytest.raises(ValueError, match="1-channel images but the model expects num_channels = 3"):
        CSRTrainer(model=wrong, args=make_args(tmp_path), train_dataset=data)
    wrong_size = create_robust_classifier("preact_resnet18", num_classes=10, num_channels=1, image_size=32, width=4,
                                          num_blocks=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="28x28 images but the model was built for image_size = 32"):
        CSRTrainer(model=wrong_size, args=make_args(tmp_path), eval_dataset=data, train_dataset=data)


def test_raw_datasets_dataset_is_accepted_or_refused_with_what_to_do(fmnist_model, make_args, tmp_path):
    import datasets

    from hf_csr import CSRTrainer


    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in range(30)]
    raw = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 10 for i in range(30)]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}))
    torch.manual_seed(0)
    trainer = CSRTrainer(model=fmnist_model(), args=make_args(tmp_path, max_steps=1), train_dataset=raw)
    batch = trainer.train_dataset[3]
    assert batch["pixel_values"].shape == (1, 28, 28) and int(batch["labels"]) == 3
    assert torch.equal(batch["pixel_values"], torch.from_numpy(np.array(images[3]))[None])
    trainer.train()
    renamed = raw.rename_columns({"image": "img", "label": "labels"})
    CSRTrainer(model=fmnist_model(), args=make_args(tmp_path), train_dataset=renamed)
    typed = raw.rename_columns({"image": "picture", "label": "target"})  # found by their Image / ClassLabel types
    CSRTrainer(model=fmnist_model(), args=make_args(tmp_path), train_dataset=typed)
    odd = datasets.Dataset.from_dict({"picture": images, "target": [i % 10 for i in range(30)]},
                                     features=datasets.Features({"picture": datasets.Image(),
                                                                 "target": datasets.Value("int64")}))
    with pytest.raises(ValueError, match="'image' \\(or 'img'\\) column and a 'label'"):
        CSRTrainer(model=fmnist_model(), args=make_args(tmp_path), train_dataset=odd)


def test_channels_last_sources_reach_the_model_contiguous():
    data = load_image_dataset("fashion_mnist", "test", limit=8)
    x, _ = data.tensors()
    assert x.stride() == torch.empty(x.shape).stride()
    assert data[0]["pixel_values"].stride() == (28 * 28, 28, 1)
    x.view(x.shape[0], -1)  # what a flattening model does
