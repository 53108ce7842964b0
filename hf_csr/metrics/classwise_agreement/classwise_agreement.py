"""Agreement between two class-wise accuracy profiles: Kendall's tau and covariance (CSR paper, Fig. 2)."""

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
How well the class-wise accuracies on one set predict those on another: Kendall's rank correlation
(tau-b, which accounts for ties) and the covariance of the two per-class accuracy vectors. Fig. 2 of
the CSR paper compares the class-wise robust (AutoAttack) accuracy on the training set with that on
the test set: a low tau means that the class that is worst on the training set need not be the worst
one on the test set, which limits methods that reweight classes by their training robustness.
Classes whose accuracy is NaN in either vector (no examples) are left out.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): per-class accuracies on one set (e.g. the test set).
    references (`list` of `float`): per-class accuracies on the other set (e.g. the training set),
        in the same class order.

Returns:
    kendall_tau (`float`): Kendall's tau-b in [-1, 1] (NaN when either vector is constant).
    covariance (`float`): the sample covariance (denominator K - 1) of the two vectors.
    num_classes (`int`): the number of classes compared.

Examples:
    `evaluate.load` takes this script's path or its folder (`hf_csr.metrics.metric_path("classwise_agreement")`):

    >>> import evaluate
    >>> metric = evaluate.load(__file__)
    >>> results = metric.compute(predictions=[0.9, 0.5, 0.7, 0.6], references=[0.8, 0.4, 0.5, 0.6])
    >>> round(results["kendall_tau"], 4), round(results["covariance"], 6), results["num_classes"]
    (0.6667, 0.025833, 4)
"""


def classwise_agreement(train_accuracy, test_accuracy):
    """Kendall's tau-b and the covariance of two per-class accuracy vectors (symmetric in its arguments)."""
    x, y = (np.asarray(values, dtype=np.float64) for values in (train_accuracy, test_accuracy))
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"the per-class accuracy vectors must be 1-D and of equal length; got {x.shape}, {y.shape}.")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size < 2:
        raise ValueError(f"at least 2 classes with an accuracy in both vectors are needed; got {x.size}.")
    upper = np.triu_indices(x.size, k=1)
    dx = np.sign(x[:, None] - x[None, :])[upper]
    dy = np.sign(y[:, None] - y[None, :])[upper]
    untied = np.sqrt(float(np.count_nonzero(dx)) * float(np.count_nonzero(dy)))
    tau = float((dx * dy).sum() / untied) if untied > 0 else float("nan")
    return {"kendall_tau": tau, "covariance": float(np.cov(x, y)[0, 1]), "num_classes": int(x.size)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClasswiseAgreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://github.com/Alexkael/CONFUSIONAL-SPECTRAL-REGULARIZATION"],
        )

    def _compute(self, predictions, references):
        return classwise_agreement(references, predictions)
