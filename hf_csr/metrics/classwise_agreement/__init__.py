"""The ``classwise_agreement`` evaluate module (``classwise_agreement.py``) and its metric card."""
