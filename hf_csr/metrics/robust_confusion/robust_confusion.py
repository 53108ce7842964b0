"""The robust confusion matrix of eq. (1) of the CSR paper, with its spectral norm, l1 norm and nu."""

import datasets
import evaluate
import numpy as np

# --- shared copy: citation (identical in each metric script that has it; evaluate copies a script alone)
_CITATION = """\
@inproceedings{jin2025enhancing,
  title     = {Enhancing Robust Fairness via Confusional Spectral Regularization},
  author    = {Jin, Gaojie and Wu, Sihao and Liu, Jiaxu and Huang, Tianjin and Mu, Ronghui},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025}
}
"""
# --- end of shared copy: citation

_DESCRIPTION = """\
The normalised confusion matrix C of eq. (1) of "Enhancing Robust Fairness via Confusional Spectral
Regularization": C[i, j] is the fraction of the examples of true class j that are predicted as class
i != j (rows: predicted class, columns: true class; the diagonal is zero; the column of a class
without references is zero). Fed with adversarial predictions it is the robust confusion matrix.

Its l1 norm ||C||_1 (the largest column sum) is the worst-class error, 1 - worst-class accuracy; its
spectral norm ||C||_2 (the largest singular value) is what CSR regularises; nu = ||C||_1 / ||C||_2 is
the constant of the paper's bound ||C||_1 <= nu ||C||_2 (at most sqrt(K); NaN when C = 0).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices.
    references (`list` of `int`): true class indices.
    num_classes (`int`, optional): the number of classes K; defaults to the largest index seen + 1.

Returns:
    confusion_matrix (`list` of `list` of `float`): C, K x K, rows predicted class, columns true class.
    spectral_norm (`float`): ||C||_2, the largest singular value of C.
    l1_norm (`float`): ||C||_1, the largest column sum of C: the worst-class error.
    nu (`float`): ||C||_1 / ||C||_2 (NaN when C is all zeros).

Examples:
    `evaluate.load` takes this script's path or its folder (`hf_csr.metrics.metric_path("robust_confusion")`):

    >>> import evaluate
    >>> metric = evaluate.load(__file__)
    >>> results = metric.compute(predictions=[0, 0, 0, 1, 0, 2], references=[0, 0, 1, 1, 2, 2])
    >>> results["confusion_matrix"]
    [[0.0, 0.5, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    >>> round(results["spectral_norm"], 4), results["l1_norm"], round(results["nu"], 4)
    (0.7071, 0.5, 0.7071)
"""


#: Largest class count accepted (a K x K confusion matrix of that size is allocated).
MAX_CLASSES = 10_000


# --- shared copy: check_labels (identical in each metric script that has it; evaluate copies a script alone)
def check_labels(predictions, references, num_classes=None):
    """Two equal-length int64 arrays of class indices in [0, K), and K (default: largest index + 1)."""
    arrays = [np.asarray(values) for values in (predictions, references)]
    if any(a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer) or (a < 0).any() for a in arrays):
        raise ValueError("predictions and references must be non-empty 1-D sequences of class indices (int >= 0).")
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"predictions and references differ in length: {arrays[0].size} vs {arrays[1].size}.")
    largest = int(max(a.max() for a in arrays))
    k = largest + 1 if num_classes is None else int(num_classes)
    if k > MAX_CLASSES:  # checked before anything of size K is allocated
        raise ValueError(
            f"{'num_classes' if num_classes is not None else 'the largest class index + 1'} is {k}, above "
            f"{MAX_CLASSES} classes; a label that large is a corrupted input (pass num_classes to be explicit)."
        )
    if largest >= k:
        raise ValueError(f"class indices must lie in [0, num_classes) = [0, {k}); found {largest}.")
    return arrays[0].astype(np.int64), arrays[1].astype(np.int64), k
# --- end of shared copy: check_labels


def robust_confusion(predictions, references, num_classes=None):
    """The metric as a plain function of two label sequences (see ``_KWARGS_DESCRIPTION``)."""
    predictions, references, k = check_labels(predictions, references, num_classes)
    confused = predictions != references
    counts = np.bincount(predictions[confused] * k + references[confused], minlength=k * k).reshape(k, k)
    class_counts = np.bincount(references, minlength=k)
    matrix = counts / np.maximum(class_counts, 1)[None, :]
    spectral = float(np.linalg.norm(matrix, 2))
    l1 = float(matrix.sum(axis=0).max())
    nu = l1 / spectral if spectral > 0 else float("nan")
    return {"confusion_matrix": matrix.tolist(), "spectral_norm": spectral, "l1_norm": l1, "nu": nu}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RobustConfusion(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://github.com/Alexkael/CONFUSIONAL-SPECTRAL-REGULARIZATION"],
        )

    def _compute(self, predictions, references, num_classes=None):
        return robust_confusion(predictions, references, num_classes=num_classes)
