"""Experiment launchers (absl flags); run from the repository root with ``python -m``."""
