"""SμPar experiments on the byte-level GPT (``python -m experiments.supar.sweep``)."""
