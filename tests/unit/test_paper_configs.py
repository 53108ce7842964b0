"""The paper-table configs run the paper's job: the released confusion pass unless they say why not,
and the Table 2 recipe fine-tunes as DM-Improves-AT trained its checkpoints."""

from pathlib import Path

import pytest

from hf_csr.experiment import parse_args, training_summary
from hf_csr.recipes import config_recipe

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes" / "configs").glob("table*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_use_the_released_confusion_pass_or_say_why_not(config):
    _, training = parse_args(["--config", str(config)])  # the config names its recipe
    assert training.max_grad_norm == 0.0
    first = config.read_text().splitlines()[0]  # "# Table ...: ... recipes/<recipe>.py"
    assert f"recipes/{config_recipe(str(config))}.py" in first
    if training.fairness_method != "csr":
        return
    if training.fairness_config.confusion_source != "epoch":
        text = config.read_text()
        assert "Why not:" in text, f"{config.name} uses {training.fairness_config.confusion_source!r} without saying why"


def test_table2_recipe_fine_tunes_as_dm_improves_at():
    config = REPO / "recipes" / "configs" / "table2_wrn28_10_linf_csr_gamma0.yaml"
    experiment, training = parse_args(["--config", str(config)])  # the config names its recipe
    assert training.label_smoothing_factor == 0.1  # DM-Improves-AT: --ls 0.1
    assert experiment.real_fraction == 0.3 and experiment.generated_epoch_batches is None
    assert training.num_train_epochs == 2 and training.per_device_train_batch_size == 128
    summary = training_summary(training)  # what the model card shows
    assert summary["label_smoothing"] == 0.1 and "max_grad_norm" not in summary
