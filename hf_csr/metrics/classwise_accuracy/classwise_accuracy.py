"""Class-wise accuracy: average, per-class and worst-class accuracy, their spread and best-worst gap."""

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
Accuracy class by class. Besides the average accuracy it returns the accuracy of every class, the
worst class (the lowest accuracy among the classes present in the references: the "worst-class
accuracy" of the robust-fairness literature), the standard deviation of the per-class accuracies
and the gap between the best and the worst class. Feed it adversarial predictions to get class-wise
robust accuracy. A class without references has accuracy NaN and is left out of the summaries.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices.
    references (`list` of `int`): true class indices.
    num_classes (`int`, optional): the number of classes K; defaults to the largest index seen + 1
        (or `len(class_names)`). Give it when some classes may be absent.
    class_names (`list` of `str`, optional): one name per class, for `worst_class_name`.

Returns:
    accuracy (`float`): the fraction of correct predictions.
    per_class_accuracy (`list` of `float`): accuracy of each class (NaN for classes without references).
    class_counts (`list` of `int`): the number of references of each class.
    worst_class (`int`): the class with the lowest accuracy (the first one on ties).
    worst_class_name (`str`): its name (its index as a string without `class_names`).
    worst_class_accuracy (`float`): its accuracy.
    std (`float`): the (population) standard deviation of the per-class accuracies.
    best_worst_gap (`float`): best minus worst per-class accuracy.

Examples:
    `evaluate.load` takes this script's path or its folder (`hf_csr.metrics.metric_path("classwise_accuracy")`):

    >>> import evaluate
    >>> metric = evaluate.load(__file__)
    >>> results = metric.compute(predictions=[0, 0, 1, 2, 2, 2], references=[0, 0, 1, 1, 2, 2],
    ...                          class_names=["cat", "dog", "bird"])
    >>> results["accuracy"], results["per_class_accuracy"], results["class_counts"]
    (0.8333333333333334, [1.0, 0.5, 1.0], [2, 2, 2])
    >>> results["worst_class"], results["worst_class_name"], results["worst_class_accuracy"]
    (1, 'dog', 0.5)
    >>> round(results["std"], 4), results["best_worst_gap"]
    (0.2357, 0.5)
"""


#: Largest class count accepted (per-class counts of that size is allocated).
MAX_CLASSES = 100_000


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


def classwise_accuracy(predictions, references, num_classes=None, class_names=None):
    """The metric as a plain function of two label sequences (see ``_KWARGS_DESCRIPTION``)."""
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes = {num_classes} but {len(class_names)} class_names were given.")
        num_classes = len(class_names)
    predictions, references, k = check_labels(predictions, references, num_classes)
    counts = np.bincount(references, minlength=k)
    correct = np.bincount(references[predictions == references], minlength=k)
    present = counts > 0
    per_class = np.full(k, np.nan)
    per_class[present] = correct[present] / counts[present]
    worst = int(np.nanargmin(per_class))
    return {
        "accuracy": float(correct.sum() / counts.sum()),
        "per_class_accuracy": per_class.tolist(),
        "class_counts": counts.tolist(),
        "worst_class": worst,
        "worst_class_name": class_names[worst] if class_names is not None else str(worst),
        "worst_class_accuracy": float(per_class[worst]),
        "std": float(np.std(per_class[present])),
        "best_worst_gap": float(np.nanmax(per_class) - per_class[worst]),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClasswiseAccuracy(evaluate.Metric):
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

    def _compute(self, predictions, references, num_classes=None, class_names=None):
        return classwise_accuracy(predictions, references, num_classes=num_classes, class_names=class_names)
