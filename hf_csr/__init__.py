"""hf_csr: Confusional Spectral Regularization for adversarially trained image classifiers.

``import hf_csr`` registers the robust backbones in timm's registry and ``RobustImageClassifier`` with
transformers' ``AutoConfig`` / ``AutoModelForImageClassification`` / ``AutoImageProcessor``. Everything
else is imported on first use (:mod:`hf_csr.lazy`): ``from hf_csr import CSRTrainer`` loads the Trainer,
``hf_csr.evaluation`` the evaluation (and with it datasets, evaluate, AutoAttack, matplotlib).

The one exception is the ``hf-csr`` command (the ``hf-csr`` script or ``python -m hf_csr.<module>``): its
code imports the models itself where a command needs them, so the registration waits for that, and
``hf-csr --help`` loads no torch at all.
"""

import os as _os
import sys as _sys

from .lazy import lazy_exports as _lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "CSRTrainer": ".trainer",
    "CSRTrainingArguments": ".configuration",
    "ConfusionEstimator": ".regularizer",
    "PixelSpaceClassifier": ".models.loading",
    "RobustClassifierConfig": ".models",
    "RobustImageClassifier": ".models",
    "attack_mode": ".attacks",
    "confusion_counts": ".regularizer",
    "create_robust_classifier": ".models",
    "csr_penalty": ".regularizer",
    "load_robust_model": ".models.loading",
    "normalize_confusion": ".regularizer",
    "parse_pixel_value": ".utils",
    "pgd_attack": ".attacks",
    "spectral_weights": ".regularizer",
    "top_singular_pair": ".regularizer",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)


def _started_as_command() -> bool:
    """True when this import starts the ``hf-csr`` script, or ``python -m hf_csr.<module>`` (while Python
    locates the module of ``-m``, ``sys.argv[0]`` is ``"-m"``, and ``sys.orig_argv`` names the module: the
    package is imported as the parent of the module about to run, which imports what it needs)."""
    argv0 = (getattr(_sys, "argv", None) or [""])[0]
    if _os.path.splitext(_os.path.basename(argv0))[0] == "hf-csr":
        return True
    if argv0 != "-m":
        return False
    original = list(getattr(_sys, "orig_argv", []))
    for index, arg in enumerate(original[1:], start=1):
        if arg.startswith("-m"):
            module = arg[2:] or (original[index + 1] if index + 1 < len(original) else "")
            return module == __name__ or module.startswith(__name__ + ".")
    return False


if not _started_as_command():
    from . import models  # noqa: E402,F401  (registers the backbones and the Auto classes)
