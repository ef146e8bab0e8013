"""Builders of real XMC datasets from public sources, each a script writing the Extreme
Classification Repository's BoW format and raw text (``python -m
experiments.xmc.datasets.<name> --out DIR``)."""
