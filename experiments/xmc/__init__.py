"""Extreme multi-label classification: the main job's trainer and its evaluator (the model, the
train step and the checkpoints are ``sparsejax.xmc``'s)."""
