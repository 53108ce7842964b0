"""The Hub out: robust checkpoints with class-wise model cards.

(Published checkpoints in -- ``hf-csr convert`` -- live with the models, :mod:`hf_csr.models.published`;
the DDPM-generated data -- ``hf-csr convert-data`` -- with the data, :mod:`hf_csr.data.generated`.)

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
from .push import PUSH_PATTERNS, HubPushError, check_checkpoint_dir, push_checkpoint, regular_files

__all__ = [
    "CARD_DATASETS",
    "MODEL_CARD_TEMPLATE",
    "PUSH_PATTERNS",
    "HubPushError",
    "check_checkpoint_dir",
    "escape_markdown",
    "push_checkpoint",
    "read_card_metadata",
    "read_results",
    "regular_files",
    "render_model_card",
    "training_setup",
    "write_model_card",
]
