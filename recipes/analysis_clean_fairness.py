#!/usr/bin/env python
"""Table 7 on Fashion-MNIST: clean training without and with CSR (gamma 0), test accuracy of the easy /
medium / hard classes (thirds by the baseline's per-class accuracy; paper: after Cui et al. 2024).

    python recipes/analysis_clean_fairness.py --epochs 5
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _class_groups import main as _main  # noqa: E402

GROUPS = ("easy", "medium", "hard")


def main(argv=None):
    return _main(argv, description=__doc__, name="clean_fairness", groups=GROUPS, long_tail_ratio=None)


if __name__ == "__main__":
    sys.exit(main())
