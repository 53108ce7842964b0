"""timm's Hub format inside a ``save_pretrained`` directory of a :class:`RobustImageClassifier`.

``timm.create_model("hf-hub:<repo>", pretrained=True)`` reads ``config.json`` (``architecture``,
``num_classes``, ``model_args``, ``pretrained_cfg``) and one weights file whose keys match the timm model.
transformers reads the same ``config.json`` (``model_type``, ``backbone``, ...) and ``model.safetensors``
(keys ``backbone.*`` plus the ``image_mean``/``image_std`` buffers). One directory serves both:

* the timm keys are merged into transformers' ``config.json`` (timm ignores transformers' keys, and
  :class:`~hf_csr.models.RobustClassifierConfig` drops timm's when it loads);
* for a backbone registered by hf_csr, ``pretrained_cfg.hf_hub_filename`` names ``model.safetensors``
  itself: the backbone's ``pretrained_filter_fn`` strips the ``backbone.`` prefix and the normalisation
  buffers, so the weights are stored once;
* for any other timm backbone (whose own filter knows nothing of that layout) the backbone's state dict is
  written a second time, as :data:`TIMM_WEIGHTS_NAME`, and ``hf_hub_filename`` names that file.

The timm model does **not** normalise its input: it is the bare backbone, and expects
``(pixel_values - mean) / std`` with the ``mean``/``std`` of its ``pretrained_cfg`` (the values the
``RobustImageClassifier`` applies inside its ``forward``); ``timm.data.resolve_data_config`` +
``create_transform`` do that for PIL images. Attack budgets are in pixel units only for the
``RobustImageClassifier`` (or the timm model wrapped with that normalisation in front).
"""

import json
import logging
import os
import tempfile
from typing import Any, Dict, Optional

import timm
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from ..utils import apply_umask

__all__ = ["TIMM_CONFIG_KEYS", "TIMM_WEIGHTS_NAME", "timm_hub_config", "write_timm_hub_files", "is_hf_csr_backbone"]

logger = logging.getLogger(__name__)

#: Top-level ``config.json`` keys that belong to timm's Hub format (not to transformers' config).
TIMM_CONFIG_KEYS = (
    "architecture",
    "num_classes",
    "num_features",
    "global_pool",
    "model_args",
    "pretrained_cfg",
    "label_names",
    "label_descriptions",
)
#: The timm-format weights written for backbones that hf_csr does not register.
TIMM_WEIGHTS_NAME = "timm_model.safetensors"
#: What ``save_pretrained`` writes the transformers weights to (single file).
_HF_WEIGHTS_NAME = "model.safetensors"
#: pretrained_cfg fields that describe the *source* of the backbone's default tag (a published
#: checkpoint), not the weights being saved.
_SOURCE_FIELDS = ("tag", "origin_url", "paper_name", "paper_ids", "notes", "license", "description")


def is_hf_csr_backbone(name: str) -> bool:
    """Whether the timm model ``name`` is one hf_csr registers (its filter reads ``model.safetensors``)."""
    arch = timm.models.get_arch_name(name)
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__.startswith("hf_csr.")


def timm_hub_config(model, weights_name: str) -> Dict[str, Any]:
    """The timm ``config.json`` content for ``model.backbone`` (timm's own ``save_config_for_hf``), with the
    classifier's normalisation, input size and class names, and ``hf_hub_filename = weights_name``."""
    config = model.config
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    data_config = dict(
        input_size=(config.num_channels, config.image_size, config.image_size),
        mean=tuple(config.image_mean),
        std=tuple(config.image_std),
        crop_pct=1.0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        save_config_for_hf(model.backbone, path, model_config=dict(label_names=names), data_config=data_config)
        with open(path, encoding="utf-8") as handle:
            timm_config = json.load(handle)
    pretrained_cfg = timm_config["pretrained_cfg"]
    for key in _SOURCE_FIELDS:
        pretrained_cfg.pop(key, None)
    pretrained_cfg["hf_hub_filename"] = weights_name
    return timm_config


def write_timm_hub_files(model, save_directory: str, variant: Optional[str] = None) -> bool:
    """Add timm's Hub format to the ``save_pretrained`` directory of ``model`` (a ``RobustImageClassifier``):
    merge the timm keys into ``config.json`` (rewritten atomically) and, for a backbone hf_csr does not
    register, write :data:`TIMM_WEIGHTS_NAME`. Returns False (and changes nothing) when the weights were
    saved sharded or as a variant, which timm cannot read, or when the backbone was not built by timm's
    ``build_model_with_cfg`` (no ``pretrained_cfg``: a plain ``nn.Module`` registered by hand)."""
    config_path = os.path.join(save_directory, "config.json")
    if not isinstance(getattr(model.backbone, "pretrained_cfg", None), dict):
        logger.info(
            "Not adding timm's Hub format to %s: backbone %r has no timm pretrained_cfg (it was not built with "
            "timm's build_model_with_cfg).", save_directory, model.config.backbone,
        )
        return False
    if variant is not None or not os.path.isfile(os.path.join(save_directory, _HF_WEIGHTS_NAME)):
        logger.info(
            "Not adding timm's Hub format to %s: the weights are sharded or saved as a variant; timm reads a single "
            "%s.", save_directory, _HF_WEIGHTS_NAME,
        )
        return False
    if is_hf_csr_backbone(model.config.backbone):
        weights_name = _HF_WEIGHTS_NAME
    else:
        weights_name = TIMM_WEIGHTS_NAME
        state = {k: v.detach().contiguous().cpu() for k, v in model.backbone.state_dict().items()}
        _atomic_write(os.path.join(save_directory, weights_name), lambda path: save_file(state, path))
    with open(config_path, encoding="utf-8") as handle:
        merged = json.load(handle)
    merged.update(timm_hub_config(model, weights_name))

    def write_json(path):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(merged, handle, indent=2, sort_keys=True)
            handle.write("\n")

    _atomic_write(config_path, write_json)
    return True


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)  # mkstemp (and safetensors) create 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
