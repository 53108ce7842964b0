"""docs/extending.md's code runs as written: a registered fairness method takes its setting by flag, a timm
backbone registered in the page trains-ready inside the robust classifier, the dataset and metric snippets work."""

import re
import sys
import types
from pathlib import Path

import torch

from hf_csr import CSRTrainingArguments
from hf_csr.fairness import FAIRNESS_REGISTRY

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def test_the_extending_examples_run_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 4  # fairness method, dataset, backbone, metric
    module = types.ModuleType("extending_doc")  # timm's register_model looks the module up in sys.modules
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102  (the documentation's own code)
        args = CSRTrainingArguments(output_dir=str(tmp_path), fairness_method="logit_penalty",
                                    logit_penalty_weight=0.5, use_cpu=True)
        assert args.fairness_config.weight == 0.5
        assert namespace["model"](torch.rand(2, 3, 32, 32)).logits.shape == (2, 10)
        assert len(namespace["train"]) == 100 and namespace["train"].class_names[3] == "class 3"
    finally:
        FAIRNESS_REGISTRY.pop("logit_penalty", None)
        sys.modules.pop(module.__name__, None)
