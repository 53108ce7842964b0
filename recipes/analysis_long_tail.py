#!/usr/bin/env python
"""Table 9 on long-tailed Fashion-MNIST (exponential subsampling, ratio 100): clean training without and
with CSR (gamma 0), many / medium / few-shot accuracy (thirds of the classes by training count).

    python recipes/analysis_long_tail.py --epochs 5
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _class_groups import main as _main  # noqa: E402

GROUPS = ("many", "medium", "few")


def main(argv=None):
    return _main(argv, description=__doc__, name="long_tail", groups=GROUPS, long_tail_ratio=100.0)


if __name__ == "__main__":
    sys.exit(main())
