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
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

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
  gradient from the dense dY. ``apply`` runs once forward and its VJP twice
  backward (dense dY, then pruned dY).

  Arguments:
    apply: ``(x, params) -> y``, e.g. ``lambda x, p: x @ p["kernel"] + p["bias"]``
      or ``lambda x, v: sparsejax.fixed_fanin_matmul(x, v, indices)``. Arrays it
      closes over get the gradient of the dense dY.
    x: input ``(..., in)``; the number of tokens ``prod(shape[:-1])`` of the
      output must be divisible by ``m``.
    params: pytree of the weights ``apply`` reads.
    key: PRNG key for the random methods (``None`` for greedy).
    n, m, method: as in ``sparsejax.nm_prune``.

  Returns:
    ``y = apply(x, params)``.
  """
  y_shape = jax.eval_shape(apply, x, params)
  tokens = math.prod(y_shape.shape[:-1])
  jax.eval_shape(functools.partial(nm_prune, n=n, m=m, method=method, axis=0),
                 jax.ShapeDtypeStruct((tokens, y_shape.shape[-1]), y_shape.dtype), key)
  # Closed-over arrays (tracers under jit) become explicit arguments of the rule.
  converted, consts = jax.closure_convert(apply, x, params)
  return _prune_weight_grad(converted, n, m, method, x, params, key, *consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _prune_weight_grad(apply, n, m, method, x, params, key, *consts):
  del n, m, method, key
  return apply(x, params, *consts)


def _prune_weight_grad_fwd(apply, n, m, method, x, params, key, *consts):
  y, vjp = jax.vjp(apply, x, params, *consts)
  return y, (vjp, key)


def _prune_weight_grad_bwd(apply, n, m, method, residuals, g):
  vjp, key = residuals
  dx, _, *dconsts = vjp(g)
  pruned = nm_prune(g.reshape(-1, g.shape[-1]), key, n=n, m=m, method=method, axis=0)
  _, dparams, *_ = vjp(pruned.reshape(g.shape))
  return (dx, dparams, None, *dconsts)


_prune_weight_grad.defvjp(_prune_weight_grad_fwd, _prune_weight_grad_bwd)
