"""Pieces the experiments share: the byte-level language model, Config-to-flags."""
