"""Pallas kernels, installed as ``sparsejax.kernels``.

``fanin``: the fixed fan-in forward, dvalues and dx kernels, used by
``sparsejax.fixed_fanin_matmul(..., impl="pallas" | "interpret")``.
``nm``: MVUE N:M gradient pruning with in-kernel hashed uniforms, and the fused
prune + ``dW = X^T prune(dY)`` kernel, used by ``sparsejax.prune_grad``,
``prune_weight_grad`` and ``pruned_linear``.
``fanin_tile``: the fused label-tile kernels (``impl="pallas_tile"``).
``counter_hash``, ``mvue_columns``: the elementwise random map and MVUE estimators that the
XLA path of ``sparsejax.mvue`` runs too; ``vma``: kernel output typing inside
``shard_map``. This package imports nothing of the core.
"""
