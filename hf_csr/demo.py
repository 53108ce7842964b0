"""A one-minute tour of the CSR penalty on real Fashion-MNIST images (``hf-csr demo``).

Trains a small PreAct-ResNet for a few clean steps, attacks a batch with PGD, and shows the robust
confusion matrix ``C``, its spectral weights ``W`` and the penalty ``Psi`` for both variants.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .attacks import pgd_attack
from .data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, RobustImageCollator, load_fashion_mnist
from .models import create_robust_classifier
from .regularizer import confusion_counts, csr_penalty, normalize_confusion, spectral_weights, top_singular_pair

logger = logging.getLogger(__name__)


def run_demo(*, steps: int = 60, batch_size: int = 128, seed: int = 0, eps: float = 0.1) -> dict:
    torch.manual_seed(seed)
    train = load_fashion_mnist("train", limit=steps * batch_size, seed=seed)
    test = load_fashion_mnist("test", limit=512, seed=seed)
    model = create_robust_classifier(
        "preact_resnet18", class_names=FASHION_MNIST_CLASSES, num_channels=1, image_size=28,
        mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, width=8, num_blocks=(1, 1, 1, 1),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    collate = RobustImageCollator(augment=True, crop_padding=2)
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate)
    model.train()
    for step, batch in enumerate(loader):
        loss = F.cross_entropy(model(batch["pixel_values"]).logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            logger.info("clean training step %d: loss %.3f", step, loss.item())
    model.eval()
    x, y = test.tensors()
    x_adv = pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=10)
    with torch.no_grad():
        clean = model(x).logits
        adv = model(x_adv).logits
    report = {
        "clean_accuracy": float((clean.argmax(1) == y).float().mean()),
        "pgd10_accuracy": float((adv.argmax(1) == y).float().mean()),
    }
    for variant, gamma in (("paper", 0.0), ("reference", 0.1)):
        counts, m = confusion_counts(adv, y, variant=variant, gamma=gamma)
        c = normalize_confusion(counts, m, variant)
        w, _ = spectral_weights(c, variant)
        sigma = float(top_singular_pair(c)[0])
        psi = float(csr_penalty(adv, y, w, variant=variant, gamma=gamma))
        i, j = divmod(int(w.argmax()), w.shape[1])
        report[variant] = {
            "spectral_norm": sigma,
            "l1_norm": float(c.sum(0).max()),
            "psi": psi,
            "heaviest_cell": f"true {FASHION_MNIST_CLASSES[j]} -> predicted {FASHION_MNIST_CLASSES[i]}",
        }
    return report


def format_report(report: dict) -> str:
    lines = [
        f"clean accuracy {report['clean_accuracy']:.3f}   PGD-10 accuracy {report['pgd10_accuracy']:.3f}",
    ]
    for variant in ("paper", "reference"):
        r = report[variant]
        lines.append(
            f"{variant:>9}: ||C||_2 = {r['spectral_norm']:.3f}  ||C||_1 = {r['l1_norm']:.3f}  "
            f"Psi = {r['psi']:.4f}  largest weight on {r['heaviest_cell']}"
        )
    return "\n".join(lines)
