"""N:M pruning of neural gradients in the backward pass.

``prune_grad(y, key, ...)`` is the identity in the forward pass and prunes the
cotangent of ``y`` in the backward pass, so every consumer of dY (the weight
gradient and the input gradient) sees the pruned tensor.

``prune_weight_grad(apply, x, params, key, ...)`` computes ``apply(x, params)``
and, in the backward pass, gives ``params`` the gradient of the pruned dY
(pruned along the token axis, the contraction axis of ``dW = dY^T X``) while
``x`` gets the gradient of the dense dY, as in the 2:4 training literature.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.mvue import nm_prune

__all__ = ["prune_grad", "prune_weight_grad"]


def prune_grad(y: jax.Array, key: jax.Array | None, *, n: int, m: int, method: str,
               axis: int = -1) -> jax.Array:
  """Identity whose backward pass prunes the cotangent with ``nm_prune``.

  Arguments:
    y: a layer's output.
    key: PRNG key for the random methods (``None`` for greedy). Use a fresh key
      every step.
    n, m, method, axis: as in ``sparsejax.nm_prune``; ``axis`` indexes ``y``
      (and so its cotangent), e.g. ``0`` for the batch/token axis.

  Returns:
    ``y``, unchanged.
  """
  # Fail now, not in the backward pass: validate on a zero cotangent of y's shape.
  jax.eval_shape(functools.partial(nm_prune, n=n, m=m, method=method, axis=axis),
                 jax.ShapeDtypeStruct(jnp.shape(y), jnp.result_type(y)), key)
  return _prune_grad(y, key, n, m, method, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _prune_grad(y, key, n, m, method, axis):
  del key, n, m, method, axis
  return y


def _prune_grad_fwd(y, key, n, m, method, axis):
  return y, key


def _prune_grad_bwd(n, m, method, axis, key, g):
  return nm_prune(g, key, n=n, m=m, method=method, axis=axis), None


_prune_grad.defvjp(_prune_grad_fwd, _prune_grad_bwd)


def prune_weight_grad(apply: Callable[[jax.Array, Any], jax.Array], x: jax.Array, params: Any,
                      key: jax.Array | None, *, n: int, m: int, method: str) -> jax.Array:
  """``apply(x, params)`` whose parameter gradient uses an N:M-pruned dY.

  In the backward pass dY, of shape ``(..., out)``, is flattened to
  ``(tokens, out)`` and pruned along the token axis, the contraction axis of
  ``dW = dY^T X``; only ``params`` see the pruned dY. ``x`` gets the exact
  gradient from the dense dY.

  Arguments:
    apply: ``(x, params) -> y``, e.g. ``lambda x, p: x @ p["kernel"] + p["bias"]``
      or ``lambda x, v: sparsejax.fixed_fanin_matmul(x, v, indices)``. It may
      close over other arrays (they get no gradient through this path).
    x: input ``(..., in)``; the number of tokens ``prod(shape[:-1])`` of the
      output must be divisible by ``m``.
    params: pytree of the weights ``apply`` reads.
    key: PRNG key for the random methods (``None`` for greedy).
    n, m, method: as in ``sparsejax.nm_prune``.

  Returns:
    ``y = apply(x, params)``.
  """
  # Two paths with the same forward value: x's gradient through the first sees
  # the dense dY; params' through the second, whose value is exactly 0, the pruned one.
  y = apply(x, lax.stop_gradient(params))
  y_params = apply(lax.stop_gradient(x), params)
  zero = y_params - lax.stop_gradient(y_params)
  tokens = zero.reshape(-1, zero.shape[-1])
  return y + prune_grad(tokens, key, n=n, m=m, method=method, axis=0).reshape(y.shape)
