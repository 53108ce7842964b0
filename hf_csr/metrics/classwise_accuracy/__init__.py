"""The ``classwise_accuracy`` evaluate module (``classwise_accuracy.py``) and its metric card."""
