"""The ``robust_confusion`` evaluate module (``robust_confusion.py``) and its metric card."""
