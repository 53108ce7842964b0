"""Shared fixtures of the whole suite.

The suite is laid out by layer: ``tests/unit`` (one module of the library at a time, in process),
``tests/integration`` (the trainer, the Hub, the CLI and the recipes working together, some in
subprocesses) and ``tests/reliability`` (kill and resume, hostile files and inputs, numerics).
``tests/support`` holds plain code that is not a test: the subprocess workers, a local Hub server and
reference implementations. Test modules never import each other or ``tests.support``: everything they
share is a fixture defined here (or in a folder's own ``conftest.py``), named like the helper it returns.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from tests.support import cards, helpers, reference_models  # noqa: E402  (helpers registers test_tiny_convnet)
from tests.support import hub_server  # noqa: E402
from tests.support.hub_server import local_hub, offline_cache  # noqa: E402,F401  (fixtures: a Hub server on
# localhost, and an offline client on a private cache)


# ----------------------------------------------------------------------------- tiny toy model and data (8 x 8)
@pytest.fixture(scope="session")
def toy_net():
    """The class of a tiny conv net with BatchNorm on 1 x 8 x 8 images: ``toy_net(num_classes=3)``."""
    return helpers.ToyNet


@pytest.fixture(scope="session")
def toy_data():
    """``toy_data(n=96, num_classes=3, seed=0) -> (x, y)``: class c lights up the c-th band of an 8 x 8 image."""
    return helpers.toy_data


@pytest.fixture(scope="session")
def trained_toy():
    torch.manual_seed(0)
    model = helpers.ToyNet()
    x, y = helpers.toy_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, x, y


# ----------------------------------------------------------------------------- Fashion-MNIST models and data
@pytest.fixture(scope="session")
def fmnist():
    """``fmnist(split="train", limit=64, seed=0)``: a stratified Fashion-MNIST subset."""
    return helpers.fmnist


@pytest.fixture(scope="session")
def fmnist_model():
    """``fmnist_model(backbone="preact_resnet18", **kwargs)``: an untrained tiny Fashion-MNIST classifier."""
    return helpers.fmnist_model


# ----------------------------------------------------------------------------- trainer runs
@pytest.fixture(scope="session")
def make_args():
    """``make_args(tmp_path, **overrides)``: small CPU training arguments."""
    return helpers.make_args


@pytest.fixture(scope="session")
def weights():
    """``weights(trainer)``: a detached copy of the trainer's model state dict."""
    return helpers.weights


@pytest.fixture(scope="session")
def assert_same_weights():
    """``assert_same_weights(a, b, atol=0.0)``: equal keys, and tensors equal (or within ``atol``)."""
    return helpers.assert_same_weights


@pytest.fixture(scope="session")
def StopAt():  # noqa: N802  (returns a class)
    """The callback class ``StopAt(step)``: stops training after optimizer step ``step``."""
    return helpers.StopAt


@pytest.fixture(scope="session")
def parse_recipe():
    """``parse_recipe(tmp, *flags, config=None)``: the recipes' ``parse_args``, output under ``tmp``."""
    return helpers.parse_recipe


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a free TCP port on 127.0.0.1 (for torchrun's rendezvous)."""
    return helpers.free_port


@pytest.fixture(scope="session")
def run_ddp_workers():
    """``run_ddp_workers(tmp_path, processes, batch, extra, worker="ddp_worker.py")``: torchrun a worker."""
    return helpers.run_ddp_workers


# ----------------------------------------------------------------------------- checkpoints and cards
@pytest.fixture(scope="session")
def reference():
    """Reference WideResNet implementations and random checkpoints of the published layouts
    (``reference.ddpm_state_dict``, ``reference.ddpm_reference_forward``, ``reference.trades_*``)."""
    return reference_models


@pytest.fixture(scope="session")
def card_results():
    """``card_results.results(names=..., attacks=...)`` (a results.json with hostile class names),
    ``card_results.model_index(card)``, ``card_results.expected_index(results)``, ``card_results.HOSTILE_NAMES``."""
    return cards


@pytest.fixture(scope="session")
def fill_hf_cache():
    """``fill_hf_cache(cache_dir, repo_id, files, repo_type="model", revision="main")``."""
    return hub_server.fill_hf_cache


@pytest.fixture(scope="session")
def mixing_worker():
    """The mixed real/generated data worker (``mixing_worker.mixed_dataset()``, ``mixing_worker.make_trainer(...)``)."""
    from tests.support import mixing_worker

    return mixing_worker


@pytest.fixture(scope="session")
def originals():
    """Re-implementations of the fairness baselines' original update rules (``originals.cost_sensitive`` ...)."""
    from tests.support import originals

    return originals
