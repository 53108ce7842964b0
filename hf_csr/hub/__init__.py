"""The Hub out: robust checkpoints with class-wise model cards.

(Published checkpoints in -- ``hf-csr convert`` -- live with the models, :mod:`hf_csr.models.published`;
the DDPM-generated data -- ``hf-csr convert-data`` -- with the data, :mod:`hf_csr.data.generated`.)

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
    "PUSH_PATTERNS": ".push",
    "HubPushError": ".push",
    "check_checkpoint_dir": ".push",
    "push_checkpoint": ".push",
    "regular_files": ".push",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
