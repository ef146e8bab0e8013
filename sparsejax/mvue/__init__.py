"""Unbiased (MVUE) N:M pruning of neural gradients (Chmiel et al., ICLR 2023): one package.

Pruning dY, the gradient w.r.t. a layer's output, to N:M lets the backward GEMM
that consumes it run on sparse tensor cores. Keeping the N largest entries is
biased; the minimum-variance unbiased estimators keep N of every M at random
and rescale them by their inclusion probability, so that ``E[pruned] = dY``
(``docs/methods.md``, "MVUE N:M gradient pruning").

- ``estimators``: ``nm_prune`` (MVUE 1:2 and 2:4, approximate 2:4, greedy) and
  ``prune_groups``, on the counter-based random map ``group_uniforms``.
- ``backward``: where the pruning happens in training: ``prune_grad`` (dY
  pruned for every consumer), ``prune_weight_grad`` and ``pruned_linear`` (only
  ``dW = X^T dY`` sees the pruned dY).
- ``modules``: ``PrunedGrad``, the Flax NNX wrapper (also ``sparsejax.nn.PrunedGrad``).

The elementwise pieces that the Pallas kernels (``sparsejax.kernels.nm``) run
too, so that both paths give the same bits, are on the kernels side:
``sparsejax.kernels.counter_hash`` (the random map) and
``sparsejax.kernels.mvue_columns`` (the estimators on one group's entries).
Weight-side N:M masks (greedy, static) are ``sparsejax.nm``.
"""

from sparsejax.mvue.backward import prune_grad, prune_weight_grad, pruned_linear
from sparsejax.mvue.estimators import (DRAWS, METHODS, group_uniforms, key_data, nm_prune,
                                       prune_groups)
from sparsejax.mvue.modules import PrunedGrad

__all__ = ["DRAWS", "METHODS", "PrunedGrad", "group_uniforms", "key_data", "nm_prune",
           "prune_grad", "prune_groups", "prune_weight_grad", "pruned_linear"]
