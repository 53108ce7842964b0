"""The Hub: published robust checkpoints and DDPM data in, robust checkpoints with class-wise model cards out.

* :func:`load_published` / ``hf-csr convert``: DDPM-data, RobustBench-style, TRADES(-AWP) and PreAct-ResNet
  checkpoints (Hub or local file) -> :class:`~hf_csr.RobustImageClassifier`.
* :func:`download_generated_data`, :func:`convert_generated_data` / ``hf-csr convert-data`` and
  :class:`GeneratedImageDataset`: DDPM-generated ``.npz`` images -> memory-mapped shards.
* :func:`render_model_card` / :func:`write_model_card` / ``hf-csr card``: class-wise model cards.
* :func:`push_checkpoint` / ``hf-csr push``: upload a checkpoint directory (regular files only, safe types only;
  the card is re-rendered for the target repo first).
* :func:`training_setup`: the training set-up of a ``CSRTrainer`` as its card shows it.
"""

from ..lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "CARD_DATASETS": ".cards",
    "MODEL_CARD_TEMPLATE": ".cards",
    "escape_markdown": ".cards",
    "read_card_metadata": ".cards",
    "read_results": ".cards",
    "render_model_card": ".cards",
    "training_setup": ".cards",
    "write_model_card": ".cards",
    "DATASETS": ".checkpoints",
    "LAYOUTS": ".checkpoints",
    "PUBLISHED_CHECKPOINTS": ".checkpoints",
    "ConvertedCheckpoint": ".checkpoints",
    "DatasetInfo": ".checkpoints",
    "PublishedCheckpoint": ".checkpoints",
    "convert_checkpoint": ".checkpoints",
    "load_published": ".checkpoints",
    "read_checkpoint": ".checkpoints",
    "DDPM_DATA_REPO": ".generated_data",
    "GeneratedImageDataset": ".generated_data",
    "ShardedArray": ".generated_data",
    "convert_generated_data": ".generated_data",
    "download_generated_data": ".generated_data",
    "PUSH_PATTERNS": ".push",
    "HubPushError": ".push",
    "check_checkpoint_dir": ".push",
    "push_checkpoint": ".push",
    "regular_files": ".push",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
