"""A results.json with hostile class names and the model-index a card should carry for it (card tests)."""

HOSTILE_NAMES = [
    "T-shirt | top",
    "Trouser\n---\nlicense: mit\n---",
    "<script>alert('x')</script>",
    "- [link](http://evil.example)",
    "*bold* _it_ `code`",
    "# heading",
    "key: value # yaml",
    "Sandal",
    "Shirt",
    "!!python/object:os.system",
]


def _attack(accuracy, per_class, names):
    worst = min(range(len(per_class)), key=per_class.__getitem__)
    return {
        "accuracy": accuracy,
        "per_class_accuracy": per_class,
        "class_counts": [100] * len(names),
        "worst_class": {"index": worst, "name": names[worst], "accuracy": per_class[worst]},
        "std": 0.05,
        "best_worst_gap": max(per_class) - min(per_class),
        "confusion_matrix": [[0.0] * len(names) for _ in names],
        "spectral_norm": 0.61,
        "l1_norm": 0.7,
        "nu": 1.15,
    }


def results(names=HOSTILE_NAMES, attacks=("clean", "pgd20", "cw20", "autoattack", "worst_of_all")):
    base = {"clean": 0.91, "pgd20": 0.55, "cw20": 0.53, "autoattack": 0.5125, "worst_of_all": 0.5}
    table = {
        key: _attack(base[key], [round(base[key] - 0.03 * ((i * 7) % len(names)) / len(names), 4) for i in range(len(names))], names)
        for key in attacks
    }
    return {"num_examples": 100 * len(names), "class_names": list(names), "threat_model": {"norm": "Linf", "eps": 8 / 255},
            "seed": 0, "attacks": table, "flags": ["few examples | per class"]}


def model_index(card):
    return {(r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}


def expected_index(results):
    out = {}
    for key, metrics in results["attacks"].items():
        out[(key, "accuracy")] = metrics["accuracy"]
        out[(key, "worst_class_accuracy")] = metrics["worst_class"]["accuracy"]
    return out
