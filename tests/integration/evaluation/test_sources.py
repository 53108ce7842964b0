"""load_image_dataset: the built-in Fashion-MNIST, npz files and `datasets` sources, all offline."""

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import hf_csr  # noqa: F401  (registers the timm backbones)
from hf_csr.data import load_image_dataset, stratified_subset
from hf_csr.evaluation import evaluate_robustness

NAMES = ["cat", "dog", "bird"]


def _images(n, size=8, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels) if channels > 1 else (n, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _hf_dataset(n=12, channels=3):
    pixels = _images(n, channels=channels)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(n)]}, features=features
    ), pixels


def test_builtin_fashion_mnist():
    data = load_image_dataset("fashion_mnist", "test", limit=20, seed=0)
    x, y = data.tensors()
    assert x.shape == (20, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert np.bincount(y.numpy(), minlength=10).tolist() == [2] * 10
    assert data.class_names[6] == "Shirt"


def test_npz_with_channels_last_images(tmp_path):
    pixels, labels = _images(10), np.arange(10) % 2
    np.savez(tmp_path / "data.npz", image=pixels, label=labels)
    data = load_image_dataset(tmp_path / "data.npz", class_names=["a", "b"])
    x, y = data.tensors()
    assert x.shape == (10, 3, 8, 8) and data.class_names == ["a", "b"]
    torch.testing.assert_close(x, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(y, torch.from_numpy(labels))
    np.savez(tmp_path / "gray.npz", x=_images(6, channels=1), y=np.zeros(6, dtype=np.int64))
    gray = load_image_dataset(tmp_path / "gray.npz", image_column="x", label_column="y", class_names=["a", "b"])
    assert gray.tensors()[0].shape == (6, 1, 8, 8)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(images=_images(4), label=np.zeros(4, dtype=int)), r"has no \['image'\] array\(s\); it holds"),
        (dict(image=_images(4), label=np.zeros(3, dtype=int)), "4 images but 3 labels"),
        (dict(image=_images(4).astype(np.float32), label=np.zeros(4, dtype=int)), "must be uint8"),
        (dict(image=_images(4), label=np.zeros(4)), "integer class indices"),
    ],
)
def test_bad_npz_files(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_image_dataset(tmp_path / "bad.npz")


def test_save_to_disk_folder_parquet_file_and_imagefolder(tmp_path):
    dataset, pixels = _hf_dataset()
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    datasets.DatasetDict({"test": dataset}).save_to_disk(tmp_path / "dict")
    dataset.save_to_disk(tmp_path / "single")
    dataset.to_parquet(tmp_path / "data.parquet")
    for source in (tmp_path / "dict", tmp_path / "single", tmp_path / "data.parquet"):
        data = load_image_dataset(source, "test")
        x, y = data.tensors()
        assert data.class_names == NAMES, source
        torch.testing.assert_close(x, expected)
        assert y.tolist() == [i % 3 for i in range(12)]
    for name, image in zip(("cat", "dog", "bird"), pixels[:3]):
        (tmp_path / "folder" / "train" / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(image).save(tmp_path / "folder" / "train" / name / f"{k}.png")
    folder = load_image_dataset(tmp_path / "folder", "train")
    assert sorted(folder.class_names) == sorted(NAMES) and len(folder) == 6
    assert folder.tensors()[0].shape == (6, 3, 8, 8)


def test_columns_are_detected_or_named(tmp_path):
    pixels = _images(6)
    plain = datasets.Dataset.from_dict({"picture": [Image.fromarray(p) for p in pixels], "kind": ["b", "a"] * 3,
                                        "target": [1, 0] * 3})
    plain.save_to_disk(tmp_path / "plain")
    by_type = load_image_dataset(tmp_path / "plain")  # Image feature found by type, 'target' by name
    assert by_type.tensors()[1].tolist() == [1, 0] * 3 and by_type.class_names == ["0", "1"]
    by_strings = load_image_dataset(tmp_path / "plain", label_column="kind")  # string labels, sorted
    assert by_strings.class_names == ["a", "b"] and by_strings.tensors()[1].tolist() == [1, 0] * 3
    ordered = load_image_dataset(tmp_path / "plain", label_column="kind", class_names=["b", "a"])
    assert ordered.tensors()[1].tolist() == [0, 1] * 3
    with pytest.raises(ValueError, match=r"has labels \['b'\] that are not in class_names \['a'\]"):
        load_image_dataset(tmp_path / "plain", label_column="kind", class_names=["a"])
    with pytest.raises(ValueError, match=r"has no label column 'fine_label'; its columns are"):
        load_image_dataset(tmp_path / "plain", label_column="fine_label")


def test_a_dataset_without_a_label_column_is_an_error(tmp_path):
    unlabeled = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in _images(3)], "caption": ["x"] * 3})
    unlabeled.save_to_disk(tmp_path / "unlabeled")
    message = r"cannot find a label column among \['img', 'caption'\]; name it with label_column"
    with pytest.raises(ValueError, match=message):
        load_image_dataset(tmp_path / "unlabeled")


def test_mixed_modes_and_sizes(tmp_path):
    rgb, gray = _images(2), _images(2, channels=1)
    mixed = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in (*rgb, *gray)], "label": [0, 1, 0, 1]})
    mixed.save_to_disk(tmp_path / "mixed")
    as_rgb = load_image_dataset(tmp_path / "mixed", num_channels=3)
    x, _ = as_rgb.tensors()
    assert x.shape == (4, 3, 8, 8) and torch.equal(x[2, 0], x[2, 1])  # grey images replicated to RGB
    assert load_image_dataset(tmp_path / "mixed").tensors()[0].shape[1] == 3  # the first image is RGB
    assert load_image_dataset(tmp_path / "mixed", num_channels=1).tensors()[0].shape == (4, 1, 8, 8)
    sizes = datasets.Dataset.from_dict({"image": [Image.fromarray(_images(1, size=s)[0]) for s in (8, 9)],
                                        "label": [0, 1]})
    sizes.save_to_disk(tmp_path / "sizes")
    with pytest.raises(ValueError, match="differ in size"):
        load_image_dataset(tmp_path / "sizes")
    with pytest.raises(ValueError, match=r"has no split 'validation'; it has \['test'\]"):
        datasets.DatasetDict({"test": mixed}).save_to_disk(tmp_path / "dd")
        load_image_dataset(tmp_path / "dd", "validation")


def test_limit_is_stratified_and_selects_before_decoding(tmp_path):
    dataset, _ = _hf_dataset(n=30)
    dataset.save_to_disk(tmp_path / "d")
    data = load_image_dataset(tmp_path / "d", limit=9, seed=1)
    assert np.bincount(data.tensors()[1].numpy()).tolist() == [3, 3, 3]
    labels = np.array([0] * 10 + [1] * 2 + [2] * 20)
    keep = stratified_subset(labels, 8, seed=0)
    assert np.bincount(labels[keep]).tolist() == [3, 2, 3]  # the rare class is kept whole
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_image_dataset(tmp_path / "d", limit=0)


def test_a_timm_model_on_a_datasets_source(tmp_path):
    dataset, _ = _hf_dataset(n=9)
    dataset.save_to_disk(tmp_path / "d")
    data = load_image_dataset(tmp_path / "d", "test")
    torch.manual_seed(0)
    model = timm.create_model("preact_resnet_tiny", num_classes=3, in_chans=3, width=4).eval()
    report = evaluate_robustness(model, data, attacks="pgd3", eps=8 / 255, progress=False)
    assert report.class_names == NAMES and report.num_examples == 9
    assert report["pgd3"].accuracy <= report["clean"].accuracy
