"""Pallas kernels, installed as ``sparsejax.kernels``.

``fanin``: the fixed fan-in forward, dvalues and dx kernels, used by
``sparsejax.fixed_fanin_matmul(..., impl="pallas" | "interpret")``.
"""
