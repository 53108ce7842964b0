"""The paper's analyses as functions (each has a recipe ``recipes/analysis_*.py`` writing a JSON and a plot).

* :func:`sharpness_sigma2` -- Table 8: the largest ``sigma^2`` in a grid ({0.01, 0.02, ..., 1}) such that
  every one of 50 Gaussian weight perturbations ``u ~ N(0, sigma^2 I)`` keeps the training-accuracy drop
  within 5 points (Jiang et al. 2020's sharpness-based sampling).
* :func:`nu_ratio` / :func:`nu_study` -- ``nu = ||C||_1 / ||C||_2`` (Sec. 3: the constant linking the
  worst-class error to the confusion matrix's spectral norm) over random confusion matrices and over a
  model's own (robust) confusion matrix.
* :func:`phi_prime` -- the model-dependent term of Prop. 3.1,
  ``Phi'(f_w) = (B + eps)^2 n^2 h ln(nh) prod_l ||W_l||_2^2 sum_l ||W_l||_F^2 / ||W_l||_2^2``, with its
  two factors reported separately (the product of squared spectral norms and the sum of ratios).
* :func:`difficulty_groups` / :func:`group_accuracy` -- Table 7: classes split into easy / medium / hard
  thirds by a reference model's per-class accuracy, accuracy per group.
* :func:`long_tail_indices` / :func:`shot_groups` -- Table 9: a long-tailed version of a dataset by
  exponential subsampling (``n_c = n_max * ratio^(-c/(K-1))``, ratio 100) and many / medium / few-shot
  groups (thirds of the classes by training count; ImageNet-LT's >100 / 20-100 / <20 thresholds are
  available with ``thresholds=(100, 20)``).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from hf_csr.data.sampling import long_tail_counts, long_tail_indices  # noqa: F401  (re-exported)
from hf_csr.utils import as_logits, inputs_prevalidated

__all__ = [
    "shot_groups", "group_accuracy", "difficulty_groups",
    "nu_ratio", "random_confusion_matrices", "nu_study", "layer_matrices", "phi_prime",
    "sharpness_sigma2", "accuracy", "SIGMA2_GRID",
]

logger = logging.getLogger(__name__)

SIGMA2_GRID = tuple(round(0.01 * i, 2) for i in range(1, 101))


def shot_groups(train_counts: Sequence[int], thresholds: Optional[Tuple[int, int]] = None) -> Dict[str, List[int]]:
    """Classes split into ``many`` / ``medium`` / ``few``-shot: by ``thresholds`` (many > t0 >= medium >= t1 > few)
    or, by default, thirds of the classes sorted by training count (ties by index)."""
    counts = np.asarray(train_counts)
    if thresholds is not None:
        high, low = thresholds
        return {"many": np.flatnonzero(counts > high).tolist(),
                "medium": np.flatnonzero((counts <= high) & (counts >= low)).tolist(),
                "few": np.flatnonzero(counts < low).tolist()}
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    return dict(zip(("many", "medium", "few"), (sorted(int(i) for i in part) for part in np.array_split(order, 3))))


def group_accuracy(per_class_accuracy: Sequence[float], groups: Dict[str, Sequence[int]]) -> Dict[str, float]:
    """Mean of the per-class accuracies in each group (classes weighted equally, as Tables 7 and 9)."""
    acc = np.asarray(per_class_accuracy, dtype=float)
    return {name: float(acc[list(members)].mean()) if len(members) else float("nan") for name, members in groups.items()}


def difficulty_groups(per_class_accuracy: Sequence[float]) -> Dict[str, List[int]]:
    """Table 7 (after Cui et al. 2024): thirds of the classes by a reference model's accuracy -- easy
    (highest), medium, hard (lowest)."""
    acc = np.asarray(per_class_accuracy, dtype=float)
    order = sorted(range(len(acc)), key=lambda c: (-acc[c], c))
    return dict(zip(("easy", "medium", "hard"), (sorted(int(i) for i in part) for part in np.array_split(order, 3))))


# --------------------------------------------------------------------------- nu = ||C||_1 / ||C||_2
def nu_ratio(matrix) -> float:
    """``||C||_1 / ||C||_2``: largest column sum (the worst-class error for a confusion matrix whose
    column ``j`` holds the error rates of true class ``j``) over the largest singular value. 0/0 -> nan."""
    c = torch.as_tensor(np.asarray(matrix), dtype=torch.float64)
    if c.dim() != 2:
        raise ValueError(f"matrix must be 2-dimensional; got shape {tuple(c.shape)}.")
    l1 = float(c.abs().sum(dim=0).max())
    spectral = float(torch.linalg.matrix_norm(c, ord=2))
    return l1 / spectral if spectral > 0 else float("nan")


NU_SCHEMES = ("uniform", "dirichlet")


def random_confusion_matrices(count: int, num_classes: int = 10, seed: int = 0, scheme: str = "uniform") -> torch.Tensor:
    """``count`` random confusion matrices (float64, (count, K, K)) with a zero diagonal.

    The paper does not say how its 10^6 matrices were drawn (it reports max 1.16, mean 1.06 for K = 10);
    two schemes are offered, and neither reproduces those figures (see README).
    ``uniform``: i.i.d. U(0, 1) off-diagonal entries;
    ``dirichlet``: normalised matrices -- for each true class ``j`` an error rate ``e_j ~ U(0, 1)`` spread
    over the other classes by a flat Dirichlet draw (columns sum to at most 1)."""
    if scheme not in NU_SCHEMES:
        raise ValueError(f"scheme must be one of {list(NU_SCHEMES)}; got {scheme!r}.")
    g = torch.Generator().manual_seed(seed)
    k = num_classes
    if scheme == "uniform":
        off = torch.rand(count, k - 1, k, generator=g, dtype=torch.float64)
    else:
        spread = -torch.log(torch.rand(count, k - 1, k, generator=g, dtype=torch.float64))  # Dirichlet(1) via exponentials
        off = spread / spread.sum(dim=1, keepdim=True) * torch.rand(count, 1, k, generator=g, dtype=torch.float64)
    out = torch.zeros(count, k, k, dtype=torch.float64)
    rows = torch.arange(k)
    for j in range(k):  # column j's K-1 entries go off the diagonal (a loop over classes, not examples)
        out[:, rows[rows != j], j] = off[:, :, j]
    return out


def nu_study(count: int = 100_000, num_classes: int = 10, seed: int = 0, model_matrices: Optional[Dict[str, Sequence]] = None,
             batch: int = 10_000, scheme: str = "uniform") -> Dict[str, object]:
    """nu over ``count`` random confusion matrices (batched SVDs) and, optionally, named model matrices."""
    values = []
    for start in range(0, count, batch):
        c = random_confusion_matrices(min(batch, count - start), num_classes, seed + start, scheme)
        l1 = c.sum(dim=1).amax(dim=1)
        spectral = torch.linalg.matrix_norm(c, ord=2)
        values.append(l1 / spectral)
    nu = torch.cat(values) if values else torch.empty(0, dtype=torch.float64)
    out: Dict[str, object] = {
        "num_classes": num_classes, "count": int(nu.numel()), "seed": seed, "scheme": scheme,
        "bound_sqrt_k": math.sqrt(num_classes),
        "random": {"max": float(nu.max()), "mean": float(nu.mean()), "min": float(nu.min()),
                   "quantiles": {str(q): float(torch.quantile(nu, q)) for q in (0.01, 0.5, 0.99)}} if nu.numel() else {},
        "random_values": nu,
    }
    if model_matrices:
        out["models"] = {name: nu_ratio(m) for name, m in model_matrices.items()}
    return out


# --------------------------------------------------------------------------- Phi'(f_w), Prop. 3.1
def layer_matrices(model: nn.Module, include_bias: bool = True) -> List[Tuple[str, torch.Tensor]]:
    """The weight matrices W_l of ``model`` in module order: ``Linear`` weights as they are, ``Conv`` kernels
    reshaped to (out, in * kh * kw) (the usual proxy; Prop. 3.1 is stated for fully connected nets);
    with ``include_bias`` the bias is appended as a column (the paper folds biases into W_l).
    BatchNorm and other layers are left out."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = module.weight.detach().double().reshape(module.weight.shape[0], -1)
            if include_bias and module.bias is not None:
                w = torch.cat([w, module.bias.detach().double()[:, None]], dim=1)
            out.append((name, w))
    if not out:
        raise ValueError("the model has no Linear or Conv layers: Phi' is defined on weight matrices.")
    return out


def phi_prime(model: nn.Module, *, input_norm_bound: float, eps: float = 0.0, include_bias: bool = True,
              width: Optional[int] = None) -> Dict[str, object]:
    """``Phi'(f_w) = (B + eps)^2 n^2 h ln(nh) prod_l ||W_l||_2^2 sum_l ||W_l||_F^2 / ||W_l||_2^2`` (Prop. 3.1).

    ``B`` = ``input_norm_bound`` (the largest l2 norm of an input), ``eps`` the l2 attack radius,
    ``n`` the number of layers, ``h`` = ``width`` or the largest dimension of any W_l. Returned with its
    factors, and in log space as well (the product overflows for deep nets)."""
    layers = layer_matrices(model, include_bias)
    spectral = [float(torch.linalg.matrix_norm(w, ord=2)) for _, w in layers]
    frobenius = [float(torch.linalg.matrix_norm(w, ord="fro")) for _, w in layers]
    n = len(layers)
    h = int(width) if width is not None else max(max(w.shape) for _, w in layers)
    log_prod = sum(2 * math.log(s) for s in spectral) if all(s > 0 for s in spectral) else -math.inf
    ratio_sum = sum((f / s) ** 2 for f, s in zip(frobenius, spectral) if s > 0)
    prefactor = (input_norm_bound + eps) ** 2 * n ** 2 * h * math.log(n * h) if n * h > 1 else 0.0
    log_phi = math.log(prefactor) + log_prod + math.log(ratio_sum) if prefactor > 0 and ratio_sum > 0 else -math.inf
    return {
        "layers": [name for name, _ in layers], "spectral_norms": spectral, "frobenius_norms": frobenius,
        "n": n, "h": h, "B": input_norm_bound, "eps": eps,
        "prod_spectral_sq": math.exp(log_prod) if log_prod < 700 else math.inf, "log_prod_spectral_sq": log_prod,
        "sum_frobenius_over_spectral_sq": ratio_sum, "prefactor": prefactor,
        "phi_prime": math.exp(log_phi) if log_phi < 700 else math.inf, "log_phi_prime": log_phi,
    }


# --------------------------------------------------------------------------- sharpness (Table 8)
@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512,
             per_class: bool = False, num_classes: Optional[int] = None):
    """Clean accuracy of ``model`` (eval mode) on ``images`` in [0, 1]; with ``per_class`` also the (K,) per-class accuracies."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions = []
    with inputs_prevalidated():
        for start in range(0, len(labels), batch_size):
            predictions.append(as_logits(model(images[start : start + batch_size].to(device))).argmax(1).cpu())
    model.train(was_training)
    correct = (torch.cat(predictions) == labels.cpu()).double()
    total = float(correct.mean())
    if not per_class:
        return total
    k = num_classes or int(labels.max()) + 1
    counts = torch.bincount(labels.cpu(), minlength=k).double()
    hits = torch.zeros(k, dtype=torch.float64).index_add_(0, labels.cpu(), correct)
    return total, (hits / counts.clamp_min(1)).tolist()


@torch.no_grad()
def sharpness_sigma2(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, grid: Iterable[float] = SIGMA2_GRID,
                     num_samples: int = 50, max_drop: float = 0.05, seed: int = 0, scale: str = "absolute",
                     batch_size: int = 512) -> Dict[str, object]:
    """Table 8's sharpness estimate: the largest ``sigma^2`` of ``grid`` (scanned in increasing order, stopping
    at the first failure) for which all ``num_samples`` perturbations ``w + u``, ``u ~ N(0, sigma^2 I)`` on every
    parameter, keep the accuracy on (``images``, ``labels``) -- the training data -- within ``max_drop`` of the
    unperturbed accuracy. ``scale="magnitude"`` multiplies the noise by ``|w|`` element-wise (a relative variant,
    set here). Returns ``sigma2`` (0.0 when even the smallest value fails) and the per-sigma^2 worst drops."""
    if scale not in ("absolute", "magnitude"):
        raise ValueError(f"scale must be 'absolute' or 'magnitude'; got {scale!r}.")
    grid = sorted(float(v) for v in grid)
    if not grid or grid[0] <= 0:
        raise ValueError(f"grid must hold positive variances; got {grid}.")
    params = [p for p in model.parameters() if p.requires_grad]
    original = [p.detach().clone() for p in params]
    base = accuracy(model, images, labels, batch_size)
    generator = torch.Generator().manual_seed(seed)
    drops: Dict[str, float] = {}
    best = 0.0
    try:
        for sigma2 in grid:
            worst = 0.0
            for _ in range(num_samples):
                for p, w in zip(params, original):
                    noise = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
                    noise = noise * math.sqrt(sigma2)
                    if scale == "magnitude":
                        noise = noise * w.abs()
                    p.copy_(w + noise)
                worst = max(worst, base - accuracy(model, images, labels, batch_size))
                if worst > max_drop:
                    break
            drops[f"{sigma2:g}"] = worst
            if worst > max_drop:
                break
            best = sigma2
    finally:
        for p, w in zip(params, original):
            p.copy_(w)
    return {"sigma2": best, "base_accuracy": base, "worst_drop": drops, "num_samples": num_samples,
            "max_drop": max_drop, "scale": scale, "seed": seed}


# --------------------------------------------------------------------------- small models for the recipes
def clean_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 5, batch_size: int = 128,
                learning_rate: float = 0.05, weight_decay: float = 5e-4, csr_alpha: float = 0.0, csr_gamma: float = 0.0,
                seed: int = 0) -> nn.Module:
    """Clean (non-adversarial) SGD training, optionally with the CSR penalty on the *clean* logits
    (Table 7: CSR in clean training; reference variant, EMA confusion estimate). Returns ``model``."""
    from hf_csr.regularizer import ConfusionEstimator, csr_penalty

    num_classes = int(labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(steps * 0.5), int(steps * 0.75)], 0.1)
    estimator = ConfusionEstimator(num_classes, variant="reference", gamma=csr_gamma, source="ema", momentum=0.99)
    device = next(model.parameters()).device
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            x, y = images[index].to(device), labels[index].to(device)
            with inputs_prevalidated():
                logits = as_logits(model(x))
            ce = torch.nn.functional.cross_entropy(logits, y)
            loss = ce
            if csr_alpha > 0:
                stats = estimator.update(logits, y)
                psi = csr_penalty(logits, y, estimator.weights(), variant="reference", gamma=csr_gamma,
                                  class_counts=stats.class_counts, num_examples=stats.num_examples)
                loss = (1 - csr_alpha) * ce + csr_alpha * psi
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    return model


def small_fashion_mnist_model(width: int = 8, seed: int = 0) -> nn.Module:
    """The registered small PreAct-ResNet (``preact_resnet_tiny``) for 1 x 28 x 28 Fashion-MNIST images."""
    from hf_csr.data import FASHION_MNIST_CLASSES
    from hf_csr.models import create_robust_classifier

    torch.manual_seed(seed)
    return create_robust_classifier("preact_resnet_tiny", class_names=FASHION_MNIST_CLASSES, width=width)


def save_json_and_plot(output_dir, name: str, data: Dict[str, object], plot) -> Tuple[str, str]:
    """Write ``<name>.json`` and ``<name>.png`` (``plot(ax)`` draws on a matplotlib axis) into ``output_dir``."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_csr.utils import atomic_write_json

    os.makedirs(output_dir, exist_ok=True)
    json_path, png_path = os.path.join(output_dir, f"{name}.json"), os.path.join(output_dir, f"{name}.png")
    atomic_write_json(json_path, data)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot(ax)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


# --------------------------------------------------------------------------- the recipes' runs
def _fashion_mnist_tensors(train_examples: int, test_examples: int, long_tail_ratio: Optional[float] = None):
    from hf_csr.data import load_fashion_mnist

    train = load_fashion_mnist("train", limit=train_examples, seed=0)
    if long_tail_ratio:
        train = train.subset(long_tail_indices(train.labels.numpy(), ratio=long_tail_ratio, seed=0))
    test = load_fashion_mnist("test", limit=test_examples, seed=0)
    return train.tensors(), test.tensors()


def run_clean_fairness(output_dir, *, train_examples: int = 6000, test_examples: int = 2000, epochs: int = 5,
                       width: int = 8, csr_alpha: float = 0.3, csr_gamma: float = 0.0, seed: int = 0,
                       long_tail_ratio: Optional[float] = None) -> Dict[str, object]:
    """Tables 7 (balanced) and 9 (``long_tail_ratio``): clean training without / with CSR on Fashion-MNIST;
    accuracy by easy / medium / hard classes (thirds by the baseline's per-class test accuracy) or by
    many / medium / few-shot classes (thirds by training count)."""
    (x, y), (xt, yt) = _fashion_mnist_tensors(train_examples, test_examples, long_tail_ratio)
    k = int(y.max()) + 1
    results: Dict[str, object] = {"train_class_counts": torch.bincount(y, minlength=k).tolist(), "seed": seed,
                                  "epochs": epochs, "csr_alpha": csr_alpha, "csr_gamma": csr_gamma,
                                  "long_tail_ratio": long_tail_ratio, "methods": {}}
    for name, alpha in (("baseline", 0.0), (f"CSR gamma={csr_gamma:g}", csr_alpha)):
        model = clean_train(small_fashion_mnist_model(width, seed), x, y, epochs=epochs, csr_alpha=alpha,
                            csr_gamma=csr_gamma, seed=seed)
        total, per_class = accuracy(model, xt, yt, per_class=True, num_classes=k)
        results["methods"][name] = {"accuracy": total, "per_class_accuracy": per_class}
    baseline = results["methods"]["baseline"]["per_class_accuracy"]
    groups = shot_groups(results["train_class_counts"]) if long_tail_ratio else difficulty_groups(baseline)
    results["groups"] = groups
    for entry in results["methods"].values():
        entry["groups"] = group_accuracy(entry["per_class_accuracy"], groups)
    return results


def run_sharpness(output_dir, *, methods: Sequence[str] = ("PGD-AT", "TRADES", "CSR reference/epoch"),
                  settings=None, seed: int = 0, examples: int = 500, num_samples: int = 50,
                  scales: Sequence[str] = ("absolute", "magnitude")) -> Dict[str, object]:
    """Table 8 on Fashion-MNIST: per method, the train - test PGD-20 accuracy gap, the worst test class
    under PGD-20 and the sharpness estimate (on ``examples`` training images). The models are trained by the
    runner through :func:`hf_csr_paper.reproduction.train_method` (run folders under ``<output_dir>/runs``,
    reused when finished)."""
    from hf_csr.data import load_fashion_mnist
    from hf_csr.evaluation import evaluate_robustness
    from hf_csr_paper.reproduction import QUICK, run_dir_for, train_method

    settings = settings or QUICK
    out: Dict[str, object] = {"settings": settings.name, "seed": seed, "examples": examples, "methods": {}}
    train = load_fashion_mnist("train", limit=examples, seed=0)
    test = load_fashion_mnist("test", limit=settings.eval_examples, seed=0)
    for method in methods:
        model = train_method("fashion_mnist", method, seed, settings,
                             run_dir_for(os.path.join(output_dir, "runs"), "fashion_mnist", method, seed))
        kw = dict(attacks="pgd20", norm="Linf", eps=settings.attack_eps, seed=seed, progress=False, device="cpu")
        tr = evaluate_robustness(model, train, **kw).to_dict()["attacks"]["pgd20"]
        te = evaluate_robustness(model, test, **kw).to_dict()["attacks"]["pgd20"]
        x, y = train.tensors()
        entry = {"train_pgd20": tr["accuracy"], "test_pgd20": te["accuracy"],
                 "gap": tr["accuracy"] - te["accuracy"], "test_worst_class_pgd20": te["worst_class"]["accuracy"]}
        for scale in scales:
            entry[f"sharpness_{scale}"] = sharpness_sigma2(model, x, y, num_samples=num_samples, seed=seed, scale=scale)
        out["methods"][method] = entry
    return out


def run_phi(output_dir, *, methods: Sequence[str] = ("PGD-AT", "CSR reference/epoch"), settings=None, seed: int = 0):
    """Phi'(f_w) of Prop. 3.1 for adversarially trained Fashion-MNIST models (B = 28, the largest l2 norm of
    a 28 x 28 image in [0, 1]; eps = the l2 radius of the Linf ball, eps_inf * 28); trained by the runner
    (:func:`hf_csr_paper.reproduction.train_method`)."""
    from hf_csr_paper.reproduction import QUICK, run_dir_for, train_method

    settings = settings or QUICK
    out: Dict[str, object] = {"settings": settings.name, "seed": seed, "methods": {}}
    for method in methods:
        model = train_method("fashion_mnist", method, seed, settings,
                             run_dir_for(os.path.join(output_dir, "runs"), "fashion_mnist", method, seed))
        out["methods"][method] = phi_prime(model, input_norm_bound=28.0, eps=settings.attack_eps * 28.0)
    return out
