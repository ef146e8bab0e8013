"""Extreme multi-label classification: model, trainer (main job) and evaluator."""
