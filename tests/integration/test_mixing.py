"""The DDPM-data batch schedule against DM-Improves-AT's sampler, through the Trainer, on 1 and 2 processes."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_csr.data import MixedBatchOrderSampler


REPO = Path(__file__).resolve().parents[2]


def dm_at_batches(num_real, num_generated, batch_size, generated_fraction, num_batches, rng):
    """DM-Improves-AT's SemiSupervisedSampler (core/data/semisup.py), re-written from its description:
    keep drawing fresh shuffles of the real set; walk each in slices of B - int(f * B); top every slice up
    to B with generated images drawn uniformly with replacement; stop after num_batches batches. The
    random draws come from ``rng`` in the order the original makes them (one permutation per pass, one
    draw per batch); the original's shuffle *inside* a batch only reorders it and is left out."""
    unsup_size = int(batch_size * generated_fraction)
    sup_size = batch_size - unsup_size
    if num_batches is None:
        num_batches = int(np.ceil(num_real / batch_size))
    batches = []
    counter = 0
    while counter < num_batches:
        order = [int(i) for i in rng.permutation(num_real)]
        for k in range(0, num_real, sup_size):
            if counter == num_batches:
                break
            batch = order[k : k + sup_size]
            draws = rng.integers(0, num_generated, size=batch_size - len(batch))
            batch = batch + [num_real + int(i) for i in draws]
            batches.append(batch)
            counter += 1
    return batches


@pytest.mark.parametrize(
    "num_real, num_generated, batch_size, num_batches",
    [(50_000, 1_000_000, 128, None), (500, 7, 128, None), (100, 3000, 20, 23), (37, 1000, 10, None), (30, 50, 7, 12)],
)
def test_sampler_is_dm_improves_at_schedule(num_real, num_generated, batch_size, num_batches):
    sampler = MixedBatchOrderSampler(num_real, num_generated, batch_size, real_fraction=0.3, seed=5, num_batches=num_batches)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        stream = np.fromiter(iter(sampler), dtype=np.int64)
        expected_batches = math.ceil(num_real / batch_size) if num_batches is None else num_batches
        assert len(stream) == len(sampler) == expected_batches * batch_size  # epoch length
        ours = stream.reshape(-1, batch_size)
        reference = dm_at_batches(num_real, num_generated, batch_size, 0.7, num_batches,
                                  np.random.default_rng([5, epoch]))
        assert len(reference) == len(ours)
        for mine, theirs in zip(ours, reference):
            assert sorted(mine.tolist()) == sorted(theirs)  # same images, same multiplicities
        real_counts = (ours < num_real).sum(1)
        full = batch_size - int(batch_size * 0.7)
        # B - int(0.7 B) real images, except the batch where a shuffle of the real set runs out
        assert (real_counts == full).sum() >= len(real_counts) - math.ceil(len(real_counts) * full / num_real)
        assert (real_counts <= full).all()
        # successive slices of one shuffle: no real image twice within one pass over the real set
        real_stream = stream[stream < num_real]
        for start in range(0, len(real_stream), num_real):
            part = real_stream[start : start + num_real]
            assert len(np.unique(part)) == len(part)


def test_paper_fine_tune_is_782_steps_not_a_pass_over_the_generated_set():
    sampler = MixedBatchOrderSampler(50_000, 1_000_000, 128, 0.3, seed=0)
    assert sampler.num_batches == 391 and sampler.real_per_batch == 39 and sampler.generated_per_batch == 89
    assert 2 * sampler.num_batches == 782


def test_generated_images_are_drawn_with_replacement_uniformly():
    sampler = MixedBatchOrderSampler(num_real=2000, num_generated=40, batch_size=100, real_fraction=0.3, seed=0)
    stream = np.fromiter(iter(sampler), dtype=np.int64)
    batches = stream.reshape(-1, 100)
    generated = batches[batches >= 2000] - 2000
    assert len(generated) == 20 * 70
    # with replacement: repeats inside one batch (70 draws from 40 images), every image drawn
    assert any(len(np.unique(b[b >= 2000])) < 70 for b in batches)
    counts = np.bincount(generated, minlength=40)
    assert counts.min() > 0
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2 < 80  # 39 degrees of freedom: uniform (p > 0.9999 for a uniform draw to exceed it)
    # a different epoch draws differently, the same epoch again identically
    sampler.set_epoch(1)
    assert not np.array_equal(np.fromiter(iter(sampler), dtype=np.int64), stream)
    sampler.set_epoch(0)
    assert np.array_equal(np.fromiter(iter(sampler), dtype=np.int64), stream)


@pytest.mark.parametrize("batch_size, device_batch", [(128, 64), (128, 16), (128, 32), (96, 12)])
def test_every_device_batch_holds_its_share(batch_size, device_batch):
    sampler = MixedBatchOrderSampler(5000, 10_000, batch_size, 0.3, seed=1)
    real = (np.fromiter(iter(sampler), dtype=np.int64) < 5000).reshape(-1, device_batch).sum(1)
    share = (batch_size - int(0.7 * batch_size)) * device_batch / batch_size
    assert set(real.tolist()) <= {math.floor(share), math.ceil(share)}


def test_options_and_errors(mixing_worker):
    dataset = mixing_worker.mixed_dataset(batches_per_epoch=5)
    assert dataset.make_sampler(10, seed=0).num_batches == 5
    assert mixing_worker.mixed_dataset().make_sampler(10, seed=0).num_batches == 5  # ceil(50 / 10)
    with pytest.raises(ValueError, match="0 generated images"):
        MixedBatchOrderSampler(10, 10, 1, 0.3)
    with pytest.raises(ValueError, match="batches_per_epoch must be a positive integer"):
        mixing_worker.mixed_dataset(batches_per_epoch=0)


# --------------------------------------------------------------------------- through the Trainer


def global_batches(seen):
    """{global step: images of the step, in stream order}, from (step, indices) records."""
    out = {}
    for step, indices in seen:
        out.setdefault(step, []).extend(indices)
    return out


def test_trainer_batches_follow_the_sampler_and_survive_a_resume(mixing_worker, StopAt, tmp_path):
    # 50 real images, global batch 8: 7 steps per epoch, so 10 steps cross an epoch boundary.
    straight = mixing_worker.make_trainer(str(tmp_path / "straight"), 8, 10, save_strategy="no")
    straight.train()
    batches = global_batches(straight.seen)
    sampler = mixing_worker.mixed_dataset().make_sampler(8, seed=0)
    expected = [b.tolist() for b in sampler.batches()]
    sampler.set_epoch(1)
    expected += [b.tolist() for b in sampler.batches()]
    assert [batches[s] for s in range(10)] == expected[:10]
    assert straight.state.epoch == pytest.approx(10 / 7)

    interrupted = mixing_worker.make_trainer(str(tmp_path / "resumed"), 8, 10, callbacks=[StopAt(3)])
    interrupted.train()
    resumed = mixing_worker.make_trainer(str(tmp_path / "resumed"), 8, 10)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    after = global_batches(resumed.seen)
    assert sorted(after) == list(range(3, 10))
    assert all(after[s] == batches[s] for s in after)

    # gradient accumulation: two micro-batches of 4 make the same global batch of 8
    accumulated = mixing_worker.make_trainer(str(tmp_path / "accumulated"), 4, 10, accumulation=2, save_strategy="no")
    accumulated.train()
    assert global_batches(accumulated.seen) == batches


@pytest.fixture
def run_worker(free_port):
    def run_worker(tmp_path, processes, per_device_batch, accumulation=1):
        out = tmp_path / f"seen-{processes}-{accumulation}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(REPO / "tests" / "support" / "mixing_worker.py"), "--out", str(out), "--per-device-batch", str(per_device_batch),
               "--accumulation", str(accumulation), "--steps", "9"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(processes)]
    return run_worker


@pytest.mark.subprocess
@pytest.mark.slow
def test_one_and_two_processes_see_the_same_global_batches(mixing_worker, run_worker, tmp_path):
    (one,) = run_worker(tmp_path, 1, 8)
    rank0, rank1 = run_worker(tmp_path, 2, 4)
    single = global_batches(one)
    assert sorted(single) == list(range(9))
    # two processes: rank 0 holds the first half of every global batch, rank 1 the second
    assert [step for step, _ in rank0] == [step for step, _ in rank1] == list(range(9))
    assert {s: a + b for (s, a), (_, b) in zip(rank0, rank1)} == single
    # each device batch holds its share of the 3 real images of a global batch of 8
    for _, indices in rank0 + rank1:
        assert sum(i < 50 for i in indices) in (1, 2)
    expected = mixing_worker.mixed_dataset().make_sampler(8, seed=0)
    assert [single[s] for s in range(7)] == [b.tolist() for b in expected.batches()]
