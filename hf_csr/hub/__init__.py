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

from .cards import (
    CARD_DATASETS,
    MODEL_CARD_TEMPLATE,
    escape_markdown,
    read_card_metadata,
    read_results,
    render_model_card,
    training_setup,
    write_model_card,
)
from .checkpoints import (
    DATASETS,
    LAYOUTS,
    PUBLISHED_CHECKPOINTS,
    ConvertedCheckpoint,
    DatasetInfo,
    PublishedCheckpoint,
    convert_checkpoint,
    load_published,
    read_checkpoint,
)
from .generated_data import (
    DDPM_DATA_REPO,
    GeneratedImageDataset,
    ShardedArray,
    convert_generated_data,
    download_generated_data,
)
from .push import PUSH_PATTERNS, HubPushError, check_checkpoint_dir, push_checkpoint, regular_files

__all__ = [
    "CARD_DATASETS",
    "DATASETS",
    "DDPM_DATA_REPO",
    "LAYOUTS",
    "MODEL_CARD_TEMPLATE",
    "PUBLISHED_CHECKPOINTS",
    "PUSH_PATTERNS",
    "ConvertedCheckpoint",
    "DatasetInfo",
    "GeneratedImageDataset",
    "HubPushError",
    "PublishedCheckpoint",
    "ShardedArray",
    "check_checkpoint_dir",
    "convert_checkpoint",
    "convert_generated_data",
    "download_generated_data",
    "escape_markdown",
    "load_published",
    "push_checkpoint",
    "read_card_metadata",
    "read_checkpoint",
    "read_results",
    "regular_files",
    "render_model_card",
    "training_setup",
    "write_model_card",
]
