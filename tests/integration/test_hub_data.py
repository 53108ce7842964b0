"""DDPM-generated data in: streaming npz -> memory-mapped shards, bit-exact, bounded memory, bad files."""

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format
from torch.utils.data import DataLoader

from hf_csr.cli import main
from hf_csr.data import RobustImageCollator, TensorImageDataset
from hf_csr.data.generated import DDPM_DATA_REPO, GeneratedImageDataset, convert_generated_data, download_generated_data


REPO_ROOT = Path(__file__).resolve().parents[2]


def _arrays(n, seed, num_classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, n)


def _chunk(start, rows):
    """Deterministic content of rows [start, start + rows) of the large synthetic file."""
    rng = np.random.default_rng(start)
    return rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, rows).astype(np.int64)


def write_streamed_npz(path, n, chunk=10_000):
    """An npz (stored, like np.savez) of ``n`` images written chunk by chunk, never all in memory."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for key, shape, dtype in (("image", (n, 32, 32, 3), np.uint8), ("label", (n,), np.int64)):
            with archive.open(f"{key}.npy", "w", force_zip64=True) as stream:
                header = {"descr": npy_format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
                npy_format.write_array_header_1_0(stream, header)
                for start in range(0, n, chunk):
                    stream.write(_chunk(start, min(chunk, n - start))[0 if key == "image" else 1].tobytes())


# ----------------------------------------------------------------------------- conversion and reading
def test_several_parts_convert_bit_exact_into_shards(tmp_path):
    images_a, labels_a = _arrays(2500, 0)
    images_b, labels_b = _arrays(1700, 1)
    np.savez_compressed(tmp_path / "part1.npz", image=images_a, label=labels_a)  # deflated
    np.savez(tmp_path / "part2.npz", image=images_b, label=labels_b.astype(np.uint8))  # stored, uint8 labels
    dataset = convert_generated_data([tmp_path / "part1.npz", tmp_path / "part2.npz"], tmp_path / "shards",
                                     shard_size=1000, chunk_size=300)
    assert isinstance(dataset, TensorImageDataset) and len(dataset) == 4200
    assert sorted(p.name for p in (tmp_path / "shards").iterdir())[:2] == ["images-00000.npy", "images-00001.npy"]
    assert len(list((tmp_path / "shards").glob("images-*.npy"))) == 5

    reopened = GeneratedImageDataset(tmp_path / "shards")  # what the trainer does
    images, labels = np.concatenate([images_a, images_b]), np.concatenate([labels_a, labels_b])
    assert np.array_equal(reopened.images[:], images) and np.array_equal(reopened.labels.numpy(), labels)
    assert reopened.num_classes == 10 and reopened.class_names[0] == "airplane"
    item = reopened[2600]
    assert item["pixel_values"].dtype == torch.uint8 and item["pixel_values"].shape == (3, 32, 32)
    assert torch.equal(item["pixel_values"], torch.from_numpy(images[2600]).permute(2, 0, 1))
    assert int(item["labels"]) == labels[2600]
    index = np.array([4199, 0, 999, 1000, 2501, -1])
    assert np.array_equal(reopened.images[index], images[index])

    # Batches through a DataLoader with worker processes: the shards are re-opened, not copied.
    assert len(pickle.dumps(reopened.images)) < 2000
    loader = DataLoader(reopened, batch_size=64, shuffle=True, num_workers=2, collate_fn=RobustImageCollator(),
                        generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (64, 3, 32, 32) and batch["pixel_values"].max() <= 1.0


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    images, labels = _arrays(50, 2)
    np.savez(tmp_path / "a.npz", image=images, label=labels)
    convert_generated_data(tmp_path / "a.npz", tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_generated_data(tmp_path / "a.npz", tmp_path / "out")
    np.savez(tmp_path / "b.npz", image=images[:20], label=labels[:20])
    assert len(convert_generated_data(tmp_path / "b.npz", tmp_path / "out", overwrite=True)) == 20
    assert len(GeneratedImageDataset(tmp_path / "out")) == 20


def test_download_from_the_dataset_repo_through_the_client(local_hub, tmp_path, capsys):
    images, labels = _arrays(64, 3)
    path = tmp_path / "1m.npz"
    np.savez(path, image=images, label=labels)
    local_hub.add_repo(DDPM_DATA_REPO, {"cifar10/1m.npz": path.read_bytes()}, repo_type="dataset")
    downloaded = download_generated_data("cifar10/1m.npz")
    assert downloaded.read_bytes() == path.read_bytes() and "datasets--P2333--DM-Improves-AT" in str(downloaded)
    assert ("HEAD", f"/datasets/{DDPM_DATA_REPO}/resolve/main/cifar10/1m.npz") in local_hub.requests
    assert main(["convert-data", "cifar10/1m.npz", str(tmp_path / "gen")]) == 0  # Hub file name -> download
    assert np.array_equal(GeneratedImageDataset(tmp_path / "gen").images[:], images)
    assert "wrote 64 images (10 classes)" in capsys.readouterr().out


def test_download_from_a_prefilled_cache_offline(fill_hf_cache, offline_cache, tmp_path):
    images, labels = _arrays(16, 4, num_classes=100)
    np.savez(tmp_path / "c100.npz", image=images, label=labels)
    fill_hf_cache(offline_cache, DDPM_DATA_REPO, {"cifar100/1m.npz": (tmp_path / "c100.npz").read_bytes()},
                  repo_type="dataset")
    dataset = convert_generated_data(download_generated_data("cifar100/1m.npz"), tmp_path / "out", dataset="cifar100")
    assert dataset.num_classes == 100 and np.array_equal(dataset.labels.numpy(), labels)
    with pytest.raises(FileNotFoundError, match="'cifar10/5m_part1.npz' of the Hub dataset repo .*not in the HF cache"):
        download_generated_data("cifar10/5m_part1.npz")


# ----------------------------------------------------------------------------- bad files
def _bad(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(images=np.zeros((4, 32, 32, 3), np.uint8), label=np.zeros(4, int)), r"has no 'image' array \(it holds \['images', 'label'\]\)"),
        (dict(image=np.zeros((4, 32, 32, 3), np.uint8)), r"has no 'label' array"),
        (dict(image=np.zeros((4, 32, 32, 3), np.uint8), label=np.zeros(5, int)), r"4 images but 5 labels"),
        (dict(image=np.zeros((4, 32, 32, 3), np.float32), label=np.zeros(4, int)), r"'image' must be uint8 .*got float32"),
        (dict(image=np.zeros((4, 3, 32, 32), np.uint8), label=np.zeros(4, int)), r"channels last.*\(4, 3, 32, 32\)"),
        (dict(image=np.zeros((4, 32, 32, 3), np.uint8), label=np.zeros(4, np.float64)), r"'label' must be a 1-D integer"),
        (dict(image=np.zeros((4, 32, 32, 3), np.uint8), label=np.full(4, 10)), r"labels in \[10, 10\] .*10 classes"),
    ],
)
def test_bad_npz_files_name_the_file_and_the_problem(tmp_path, arrays, message):
    with pytest.raises(ValueError, match=message) as error:
        convert_generated_data(_bad(tmp_path, **arrays), tmp_path / "out")
    assert "bad.npz" in str(error.value)
    assert not (tmp_path / "out" / "metadata.json").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_corrupted_npz(tmp_path, damage):
    images, labels = _arrays(200, 5)
    path = tmp_path / "part.npz"
    np.savez_compressed(path, image=images, label=labels)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF  # inside the deflated image stream
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"part\.npz.*(truncated|corrupted)"):
        convert_generated_data(path, tmp_path / "out", shard_size=20, chunk_size=16)  # fails after some shards
    assert not list((tmp_path / "out").glob("*.npy"))  # no shard left behind
    with pytest.raises(FileNotFoundError, match="metadata.json is missing"):
        GeneratedImageDataset(tmp_path / "out")


def test_truncated_shard_is_reported(tmp_path):
    images, labels = _arrays(100, 6)
    np.savez(tmp_path / "a.npz", image=images, label=labels)
    convert_generated_data(tmp_path / "a.npz", tmp_path / "out")
    shard = tmp_path / "out" / "images-00000.npy"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"images-00000\.npy"):
        GeneratedImageDataset(tmp_path / "out")


# ----------------------------------------------------------------------------- memory
_MEASURE = r"""
import json, sys
from hf_csr.data.generated import convert_generated_data

def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])

before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
convert_generated_data(sys.argv[1], sys.argv[2])
print(json.dumps({"rss_before_kib": before, "peak_kib": kib("VmHWM")}))
"""


@pytest.mark.subprocess
def test_200k_image_conversion_streams_in_bounded_memory(tmp_path):
    n = 200_000
    source = tmp_path / "200k.npz"
    write_streamed_npz(source, n)
    decompressed = n * 32 * 32 * 3
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(source), str(tmp_path / "shards")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = (measured["peak_kib"] - measured["rss_before_kib"]) * 1024
    print(f"\n200k npz: {source.stat().st_size / 2**20:.0f} MiB file, {decompressed / 2**20:.0f} MiB of images; "
          f"converting process RSS {measured['rss_before_kib'] / 1024:.0f} MiB before (interpreter + torch), "
          f"peak {measured['peak_kib'] / 1024:.0f} MiB: +{growth / 2**20:.1f} MiB for the conversion")
    assert growth < decompressed / 10, measured

    dataset = GeneratedImageDataset(tmp_path / "shards")
    assert len(dataset) == n
    for start in range(0, n, 10_000):  # bit-exact, shard by shard
        expected_images, expected_labels = _chunk(start, 10_000)
        assert np.array_equal(dataset.images[start:start + 10_000], expected_images)
        assert np.array_equal(dataset.labels[start:start + 10_000].numpy(), expected_labels)
