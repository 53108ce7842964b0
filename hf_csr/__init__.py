"""hf_csr: Confusional Spectral Regularization for adversarially trained image classifiers.

``import hf_csr`` registers the robust backbones in timm's registry and ``RobustImageClassifier``
with transformers' ``AutoConfig`` / ``AutoModelForImageClassification``.
"""

from .attacks import attack_mode, pgd_attack
from .models import RobustClassifierConfig, RobustImageClassifier, create_robust_classifier
from .models.loading import PixelSpaceClassifier, load_robust_model
from .configuration import CSRTrainingArguments
from .regularizer import (
    ConfusionEstimator,
    confusion_counts,
    csr_penalty,
    normalize_confusion,
    spectral_weights,
    top_singular_pair,
)
from .trainer import CSRTrainer
from .utils import parse_pixel_value

__version__ = "0.1.0"

__all__ = [
    "CSRTrainer",
    "CSRTrainingArguments",
    "ConfusionEstimator",
    "PixelSpaceClassifier",
    "RobustClassifierConfig",
    "RobustImageClassifier",
    "attack_mode",
    "confusion_counts",
    "create_robust_classifier",
    "csr_penalty",
    "load_robust_model",
    "normalize_confusion",
    "parse_pixel_value",
    "pgd_attack",
    "spectral_weights",
    "top_singular_pair",
]
