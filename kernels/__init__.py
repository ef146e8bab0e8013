"""Pallas kernels, installed as ``sparsejax.kernels``.

``fanin``: the fixed fan-in forward, dvalues and dx kernels, used by
``sparsejax.fixed_fanin_matmul(..., impl="pallas" | "interpret")``.
``nm``: MVUE N:M gradient pruning with in-kernel threefry uniforms, and the fused
prune + ``dW = X^T prune(dY)`` kernel, used by ``sparsejax.prune_grad``,
``prune_weight_grad`` and ``pruned_linear``.
"""
