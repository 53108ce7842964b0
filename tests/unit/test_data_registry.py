"""The dataset registry (one place for what a dataset is and where it loads from) and the one subset sampler."""

import logging

import numpy as np
import pytest
import torch

import hf_csr
from hf_csr.data import DATASETS, TensorImageDataset, load_image_dataset, register_dataset, stratified_subset
from hf_csr.data.registry import dataset_info


def test_builtin_entries_feed_the_backbones_and_the_tiny_model():
    fmnist, cifar10 = DATASETS["fashion_mnist"], DATASETS["cifar10"]
    assert fmnist.input_size == (1, 28, 28) and len(fmnist.class_names) == fmnist.num_classes == 10
    assert cifar10.hub_id == "uoft-cs/cifar10" and len(DATASETS["cifar100"].class_names) == 100
    from hf_csr.models._common import CIFAR10_MEAN

    assert CIFAR10_MEAN == cifar10.mean
    model = hf_csr.create_robust_classifier("preact_resnet_tiny", class_names=fmnist.class_names, width=2)
    assert (model.config.num_channels, model.config.image_size) == (1, 28)
    assert model.config.image_mean == list(fmnist.mean) and model.config.image_std == list(fmnist.std)


def test_register_dataset_loads_by_name_and_refuses_mistakes():
    calls = []

    def loader(split, *, limit=None, seed=0):
        calls.append((split, limit, seed))
        labels = np.arange(12) % 3
        return TensorImageDataset(torch.zeros(12, 1, 8, 8, dtype=torch.uint8), labels, ["a", "b", "c"], name="toy")

    info = register_dataset("toy_registry_test", class_names=["a", "b", "c"], num_channels=1, image_size=8,
                            mean=[0.5], std=[0.25], loader=loader)
    try:
        assert dataset_info("toy_registry_test") is info and info.name == "toy_registry_test"
        data = load_image_dataset("toy_registry_test", "train", limit=6, seed=3)
        assert len(data) == 12 and calls == [("train", 6, 3)]
        with pytest.raises(ValueError, match="registered already.*overwrite=True"):
            register_dataset("toy_registry_test", class_names=["a"], num_channels=1, image_size=8, mean=[0], std=[1],
                             loader=loader)
        with pytest.raises(ValueError, match="one value per channel"):
            register_dataset("toy_bad", num_classes=2, num_channels=3, image_size=8, mean=[0.5], std=[0.5],
                             hub_id="me/toy")
        with pytest.raises(ValueError, match="hub_id .* or loader"):
            register_dataset("toy_bad", num_classes=2, num_channels=1, image_size=8, mean=[0.5], std=[0.5])
        assert "toy_bad" not in DATASETS
    finally:
        DATASETS.pop("toy_registry_test", None)


def test_stratified_subset_keeps_the_size_and_says_when_classes_cannot_be_equal(caplog):
    labels = np.array([0] * 30 + [1] * 2 + [2] * 30)
    keep = stratified_subset(labels, 6, seed=0)
    assert np.bincount(labels[keep]).tolist() == [2, 2, 2]
    with caplog.at_level(logging.INFO, logger="hf_csr.data.sampling"):
        keep = stratified_subset(labels, 30, seed=0)
    assert len(keep) == 30 and np.bincount(labels[keep]).tolist() == [14, 2, 14]
    assert "cannot have equal class counts" in caplog.text
    assert len(stratified_subset(labels, 100)) == len(labels)
    with pytest.raises(ValueError, match="positive"):
        stratified_subset(labels, 0)


def test_a_registered_hub_dataset_loads_by_key_with_its_channels(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)) for i in range(6)]
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2]})
    data.save_to_disk(str(tmp_path / "toy"))
    register_dataset("toy_hub_registry_test", class_names=["x", "y", "z"], num_channels=1, image_size=8,
                     mean=[0.5], std=[0.5], hub_id=str(tmp_path / "toy"))
    try:
        loaded = load_image_dataset("toy_hub_registry_test", "train", limit=3)
        assert loaded.class_names == ["x", "y", "z"] and len(loaded) == 3
        assert tuple(loaded.image_shape) == (1, 8, 8)  # the entry's channels: decoded as grayscale
    finally:
        DATASETS.pop("toy_hub_registry_test", None)
