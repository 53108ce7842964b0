"""Robust evaluation: metric modules, evaluate_robustness, dataset sources, plots and the command."""
