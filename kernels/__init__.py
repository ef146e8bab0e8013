"""Pallas/Triton GPU kernels for sparsejax, installed as ``sparsejax.kernels``.

It holds no kernel yet: every op runs on the pure-XLA path in ``sparsejax``,
which is the reference the kernels will be checked against.
"""
