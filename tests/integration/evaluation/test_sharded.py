"""Sharded evaluation, results independent of the split, and the identity of cached progress.

Quick, in-process: the keyed random numbers (checked against a pure-Python re-implementation of the hash),
an evaluation split into 2 shards (two threads, each running ``evaluate_robustness`` as rank 0 or 1 of 2,
exchanging their outcomes through an in-memory all-gather) against one process, with another batch size
too, and cached progress refused for another model. The real multi-process runs (``accelerate launch``,
``torchrun``, a kill and a resume under 1 process) are in ``test_sharded_processes.py`` (slow).
"""

import copy
import logging
import threading
import zlib

import pytest
import torch

from hf_csr.evaluation import AutoAttackConfig, evaluate_robustness, robustness
from hf_csr.evaluation.sharding import Shards, example_keys, keyed_normal, keyed_uniform


# Every split-independent attack: clean, PGD-20, CW-20 and AutoAttack's APGD-CE, APGD-T and FAB-T.
DETERMINISTIC_AA = AutoAttackConfig("custom", ("apgd-ce", "apgd-t", "fab-t"), n_iter=4)
ATTACKS = ("clean", "pgd20", "cw20", DETERMINISTIC_AA)


# ---------------------------------------------------------------- keyed random numbers
def _lowbias32(x: int) -> int:
    """The hash, written again in plain Python integers (independently of the torch version)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _reference_uniform(key: int, numel: int):
    out = []
    for counter in range(numel):
        c = _lowbias32(counter * 2 + 1)
        bits = _lowbias32((_lowbias32(key ^ c) + key) & 0xFFFFFFFF)
        out.append((bits >> 8) / float(1 << 24))
    return out


def test_keyed_uniforms_match_a_plain_python_hash_and_depend_on_their_own_key_only():
    indices = torch.tensor([0, 1, 7, 2**33 + 5, 123456])
    keys = example_keys(3, "pgd20/start", indices)
    salt = zlib.crc32(b"3/pgd20/start")
    for index, key in zip(indices.tolist(), keys.tolist()):
        mixed = _lowbias32(index & 0xFFFFFFFF) ^ _lowbias32((index >> 32) + 0x9E3779B9)
        assert key == _lowbias32(mixed ^ salt)
    u = keyed_uniform(keys, (2, 3))
    assert u.shape == (5, 2, 3) and u.dtype == torch.float32
    for row, key in zip(u, keys.tolist()):
        assert row.flatten().tolist() == _reference_uniform(key, 6)
    # a row is the same whatever else is in the batch, and in any order
    again = keyed_uniform(keys[[3, 1]], (2, 3))
    assert torch.equal(again, u[[3, 1]])
    # another seed or stream gives other numbers
    assert not torch.equal(keyed_uniform(example_keys(4, "pgd20/start", indices), (2, 3)), u)
    assert not torch.equal(keyed_uniform(example_keys(3, "cw20/start", indices), (2, 3)), u)


def test_keyed_numbers_have_the_right_distribution():
    keys = example_keys(0, "stats", torch.arange(400))
    u = keyed_uniform(keys, (250,))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert float((counts - 10_000).abs().max()) < 500  # 100,000 draws, 10 bins
    z = keyed_normal(keys, (250,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z.abs() < 1).float().mean()) - 0.6827) < 0.01


# ---------------------------------------------------------------- shards simulated in-process
class _ThreadShards(Shards):
    """Rank ``rank`` of ``world_size`` threads; all-gather and broadcast through shared memory."""

    def __init__(self, rank, world_size, board):
        self.rank, self.world_size, self.board = rank, world_size, board

    def _exchange(self, value):
        board = self.board
        board["barrier"].wait()
        with board["lock"]:
            board["round"].setdefault(self.rank, []).append(value)
        board["barrier"].wait()
        values = [board["round"][r][-1] for r in range(self.world_size)]
        board["barrier"].wait()
        return values

    def gather(self, local):
        merged = {}
        for part in self._exchange(dict(local)):
            merged.update(part)
        return merged

    def broadcast(self, value):
        return self._exchange(value)[0]

    def barrier(self):
        self.board["barrier"].wait()


def _sharded(model, data, world_size, monkeypatch, **kwargs):
    """``evaluate_robustness`` run by ``world_size`` threads, each as one rank; the reports of every rank."""
    board = {"barrier": threading.Barrier(world_size), "lock": threading.Lock(), "round": {}}
    local = threading.local()
    real = robustness.Shards
    monkeypatch.setattr(robustness, "Shards", lambda distributed: local.shards if distributed else real(False))
    reports, errors = [None] * world_size, []

    def work(rank):
        local.shards = _ThreadShards(rank, world_size, board)
        torch.set_num_threads(1)
        try:
            reports[rank] = evaluate_robustness(copy.deepcopy(model), data, distributed=True, progress=False, **kwargs)
        except BaseException as error:  # pragma: no cover - shown by the assertion below
            errors.append(error)
            board["barrier"].abort()

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return reports


def _outcomes(report):
    return {name: result.predictions for name, result in report.attacks.items()}


def _same(a, b):
    assert a.to_dict() == b.to_dict()
    for name, predictions in _outcomes(a).items():
        assert torch.equal(predictions, b.attacks[name].predictions), name


def test_two_shards_and_another_batch_size_give_the_same_per_example_outcomes(eps, fmnist_model, fmnist_test, monkeypatch):
    data = fmnist_test.subset(list(range(28)))
    kwargs = dict(attacks=ATTACKS, eps=eps, seed=7)
    single = evaluate_robustness(fmnist_model, data, batch_size=16, progress=False, **kwargs)
    assert single["pgd20"].accuracy < single["clean"].accuracy  # the attacks do break examples here
    assert single[DETERMINISTIC_AA.name].accuracy < single["clean"].accuracy
    assert single.metadata["randomness"]["per_chunk"] == []
    assert "batch_size" not in single.metadata["evaluation"]
    two = _sharded(fmnist_model, data, 2, monkeypatch, batch_size=16, **kwargs)
    two_small = _sharded(fmnist_model, data, 2, monkeypatch, batch_size=6, **kwargs)
    for report in two + two_small:  # every rank holds the whole report
        _same(report, single)


def test_shards_take_every_other_chunk(fmnist_model, fmnist_test, monkeypatch):
    seen = {0: [], 1: []}
    original = robustness._Evaluation.run

    def run(self, label, chunks, compute, settings):
        def spy(index, x, y, indices):
            seen[self.shards.rank].append((label, index))
            return compute(index, x, y, indices)

        return original(self, label, chunks, spy, settings)

    monkeypatch.setattr(robustness._Evaluation, "run", run)
    _sharded(fmnist_model, fmnist_test, 2, monkeypatch, attacks=("clean",), batch_size=8)
    assert seen == {0: [("clean", 0), ("clean", 2), ("clean", 4)], 1: [("clean", 1), ("clean", 3)]}


def test_distributed_without_a_process_group_is_a_clear_error(fmnist_model, fmnist_test):
    with pytest.raises(ValueError, match="distributed=True needs an initialised torch.distributed process group"):
        evaluate_robustness(fmnist_model, fmnist_test, attacks=("clean",), distributed=True, progress=False)


def test_the_apgd_start_is_pyautoattacks_start_keyed_per_example(wrappers, fmnist_model, fmnist_test):
    """The keyed APGD runs pyautoattack's own iterations from a start drawn as pyautoattack draws it."""
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack


    x, y = fmnist_test.tensors(range(12))
    net = wrappers.logits_of(fmnist_model).eval()
    with torch.no_grad():
        correct = (net(x).argmax(1) == y).nonzero().squeeze(1)
    config = AutoAttackConfig("custom", ("apgd-ce",), n_iter=5)
    report = evaluate_robustness(fmnist_model, x, y, attacks=(config,), eps=8 / 255, seed=2, batch_size=12,
                                 class_names=fmnist_test.class_names, progress=False)
    # independently: pyautoattack's stock APGD (not the keyed subclass) from the start t = 2u - 1, u keyed
    adversary = AutoAttack(net, attacks=["apgd-ce"], version="custom", eps=8 / 255, norm="Linf", seed=2)
    apgd = adversary.apgd
    assert type(apgd) is APGDAttack
    apgd.n_iter = apgd.n_iter_orig = 5
    apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = 1, 1, 1
    apgd.init_hyperparam(x)
    keys = example_keys(2, f"{config.name}/apgd-ce/0/0", correct)
    t = 2 * keyed_uniform(keys, tuple(x.shape[1:])) - 1
    xc, yc = x[correct], y[correct]
    start = xc + apgd.eps * t / (t.flatten(1).abs().max(1)[0].view(-1, 1, 1, 1) + 1e-12)
    with torch.no_grad():
        _, acc, _, adv = apgd.attack_single_run(xc, yc, x_init=start)
        expected = y.clone()
        expected[correct] = torch.where(acc.bool(), yc, net(adv).argmax(1))
        expected[~torch.isin(torch.arange(12), correct)] = net(x).argmax(1)[~torch.isin(torch.arange(12), correct)]
    assert torch.equal(report[config.name].predictions, expected)


# ---------------------------------------------------------------- identity of cached progress
def _counting(model):
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__("n", calls["n"] + 1))
    return calls


def _permuted_rows(model):
    """The same network with its classifier rows (and labels' meaning) permuted: same per-tensor sums."""
    other = copy.deepcopy(model)
    linear = other.backbone.linear
    order = torch.roll(torch.arange(linear.out_features), 1)
    with torch.no_grad():
        linear.weight.copy_(linear.weight[order])
        linear.bias.copy_(linear.bias[order])
    return other


def _other_config(model):
    other = copy.deepcopy(model)
    other.config.threat_model = {"norm": "L2", "eps": 0.5}  # forward unchanged, config not
    return other


@pytest.mark.parametrize("change, what", [(_permuted_rows, "model_weights"), (_other_config, "model_config")],
                         ids=["permuted-classifier-rows", "config-only"])
def test_cached_progress_is_not_reused_for_another_model(eps, fmnist_model, fmnist_test, tmp_path, caplog, change, what):
    x, y = fmnist_test.tensors(range(16))
    kwargs = dict(attacks="pgd5", eps=eps, batch_size=8, class_names=fmnist_test.class_names, progress=False,
                  resume_dir=tmp_path)
    first = evaluate_robustness(fmnist_model, x, y, **kwargs)
    mine = [tmp_path / "notes" / "keep.txt", tmp_path / "ab" / "keep.txt", tmp_path / "keep.pt"]
    for path in mine:  # the user's own files in the folder are never removed
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
    other = change(fmnist_model)
    for name in ("weight", "bias"):  # what the old fingerprint (one float sum per tensor) saw: the same
        assert float(getattr(other.backbone.linear, name).detach().double().sum()) == pytest.approx(
            float(getattr(fmnist_model.backbone.linear, name).detach().double().sum()), rel=1e-12)
    calls = _counting(other)
    with caplog.at_level(logging.WARNING, logger="hf_csr.evaluation.robustness"):
        second = evaluate_robustness(other, x, y, **kwargs)
    assert f"belongs to another evaluation ({what} differs): starting afresh, its 4 cached" in caplog.text
    assert all(path.read_text() == "mine" for path in mine)
    assert calls["n"] >= 3  # the probe and the 2 clean batches at least: recomputed (a reuse costs the probe only)
    fresh = evaluate_robustness(other, x, y, **{**kwargs, "resume_dir": None})
    assert second.to_dict() == fresh.to_dict()
    if what == "model_weights":
        assert not torch.equal(second["clean"].predictions, first["clean"].predictions)
    # the same model again: its own progress (now in the folder) is reused, silently
    caplog.clear()
    calls["n"] = 0
    with caplog.at_level(logging.WARNING, logger="hf_csr.evaluation.robustness"):
        assert evaluate_robustness(other, x, y, **kwargs).to_dict() == fresh.to_dict()
    assert calls["n"] == 1 and "another evaluation" not in caplog.text


def test_identity_covers_weights_bytes_config_data_attacks_and_seed(eps, fmnist_model, fmnist_test):
    from hf_csr.evaluation.robustness import _Images, _run_identity, model_identity
    from hf_csr.evaluation.specs import parse_attacks

    base = model_identity(fmnist_model)
    assert base == model_identity(copy.deepcopy(fmnist_model))
    assert model_identity(_permuted_rows(fmnist_model))["weights"] != base["weights"]
    assert model_identity(_other_config(fmnist_model))["config"] != base["config"]
    x, y = fmnist_test.tensors(range(8))

    def identity(x=x, y=y, attacks="pgd5", seed=0, eps=eps):
        return _run_identity(fmnist_model, _Images(x, y), parse_attacks(attacks), norm="Linf", eps=eps, seed=seed,
                             dtype=None, autoattack_version="standard")

    reference = identity()
    assert reference == identity()
    for changed in (identity(y=torch.roll(y, 1)), identity(x=x[:6], y=y[:6]), identity(attacks="pgd6"),
                    identity(seed=1), identity(eps=eps / 2)):
        assert changed != reference
