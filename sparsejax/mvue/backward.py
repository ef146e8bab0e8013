"""N:M pruning of neural gradients in the backward pass.

``prune_grad(y, key=key, ...)`` is the identity in the forward pass and prunes the
cotangent of ``y`` in the backward pass, so every consumer of dY (the weight
gradient and the input gradient) sees the pruned tensor.

``prune_weight_grad(apply, x, params, key=key, ...)`` computes ``apply(x, params)``
and, in the backward pass, gives ``params`` the gradient of the pruned dY
(pruned along the token axis, the contraction axis of ``dW = dY^T X``) while
``x`` gets the gradient of the dense dY, as in the 2:4 training literature.
``pruned_linear(x, kernel, key=key, ...)`` is that rule for a dense matmul, where
the GPU kernel fuses the pruning into ``dW = X^T prune(dY)``.

Each takes ``impl`` (see ``sparsejax.resolve_impl``): the Pallas kernels
(``sparsejax.kernels.nm``) run the random methods on float32/bfloat16
gradients; greedy pruning and float64 always take the XLA path.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparsejax import _checks
from sparsejax.dispatch import resolve_impl
from sparsejax.kernels import nm as _kernels
from sparsejax.mvue.estimators import key_data, nm_prune

__all__ = ["prune_grad", "prune_weight_grad", "pruned_linear"]


def _uses_kernel(impl: str, method: str, dtype) -> bool:
  return impl != "xla" and method != "greedy" and dtype in (jnp.float32, jnp.bfloat16)


def _prune(g, key, n, m, method, axis, impl):
  """``nm_prune`` of a cotangent, by the kernel when ``impl`` asks for one and it applies."""
  if not _uses_kernel(impl, method, g.dtype):
    return nm_prune(g, key=key, n=n, m=m, method=method, axis=axis)
  return _kernels.nm_prune_kernel(g, key_data(key), m=m, method=method, axis=axis % g.ndim,
                                  interpret=impl == "interpret")


def _check_pruning(shape, dtype, key, n, m, method, axis) -> None:
  """Fails now, not in the backward pass: ``nm_prune``'s checks on a cotangent of this shape."""
  if key is not None:  # before eval_shape, which would trace a plain int into an array
    _checks.check_key(key)
  jax.eval_shape(lambda g, key: nm_prune(g, key=key, n=n, m=m, method=method, axis=axis),
                 jax.ShapeDtypeStruct(shape, dtype), key)


def prune_grad(y: jax.Array, *, key: jax.Array | None = None, n: int, m: int, method: str,
               axis: int = -1, impl: str | None = None) -> jax.Array:
  """Identity whose backward pass prunes the cotangent with ``nm_prune``.

  Arguments:
    y: a layer's output.
    key: PRNG key for the random methods (``None`` for greedy). Use a fresh key
      every step.
    n, m, method, axis: as in ``sparsejax.nm_prune``; ``axis`` indexes ``y``
      (and so its cotangent), e.g. ``0`` for the batch/token axis.
    impl: ``"xla"``, ``"pallas"``, ``"interpret"`` or ``"auto"``/``None``
      (``sparsejax.resolve_impl``). The kernel gives the same bits as ``nm_prune``.

  Returns:
    ``y``, unchanged.
  """
  _check_pruning(jnp.shape(y), jnp.result_type(y), key, n, m, method, axis)
  return _prune_grad(y, key, n, m, method, axis, resolve_impl(impl))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _prune_grad(y, key, n, m, method, axis, impl):
  del key, n, m, method, axis, impl
  return y


def _prune_grad_fwd(y, key, n, m, method, axis, impl):
  return y, key


def _prune_grad_bwd(n, m, method, axis, impl, key, g):
  return _prune(g, key, n, m, method, axis, impl), None


_prune_grad.defvjp(_prune_grad_fwd, _prune_grad_bwd)


def prune_weight_grad(apply: Callable[[jax.Array, Any], jax.Array], x: jax.Array, params: Any,
                      *, key: jax.Array | None = None, n: int, m: int, method: str,
                      impl: str | None = None) -> jax.Array:
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
    impl: as in ``prune_grad``; selects the pruning kernel (``apply``'s own
      VJP is whatever ``apply`` uses).

  Returns:
    ``y = apply(x, params)``.
  """
  y_shape = jax.eval_shape(apply, x, params)
  tokens = math.prod(y_shape.shape[:-1])
  _check_pruning((tokens, y_shape.shape[-1]), y_shape.dtype, key, n, m, method, 0)
  # Closed-over arrays (tracers under jit) become explicit arguments of the rule.
  converted, consts = jax.closure_convert(apply, x, params)
  return _prune_weight_grad(converted, n, m, method, resolve_impl(impl), x, params, key, *consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _prune_weight_grad(apply, n, m, method, impl, x, params, key, *consts):
  del n, m, method, impl, key
  return apply(x, params, *consts)


def _prune_weight_grad_fwd(apply, n, m, method, impl, x, params, key, *consts):
  y, vjp = jax.vjp(apply, x, params, *consts)
  return y, (vjp, key)


def _prune_weight_grad_bwd(apply, n, m, method, impl, residuals, g):
  vjp, key = residuals
  dx, _, *dconsts = vjp(g)
  pruned = _prune(g.reshape(-1, g.shape[-1]), key, n, m, method, 0, impl)
  _, dparams, *_ = vjp(pruned.reshape(g.shape))
  return (dx, dparams, None, *dconsts)


_prune_weight_grad.defvjp(_prune_weight_grad_fwd, _prune_weight_grad_bwd)


def pruned_linear(x: jax.Array, kernel: jax.Array, *, key: jax.Array | None = None, n: int,
                  m: int, method: str, impl: str | None = None) -> jax.Array:
  """``x @ kernel`` whose kernel gradient is ``X^T nm_prune(dY)`` along the tokens.

  The dense-layer case of ``prune_weight_grad``: ``x`` gets the dense
  gradient ``dY kernel^T``. With the Pallas kernels (random methods,
  float32/bfloat16), each dY tile is pruned in registers and fed straight to
  the dot, so the pruned dY is never written to memory; the pruned values are
  the same bits as ``nm_prune``'s.

  Arguments:
    x: ``(..., in)``; the number of tokens ``prod(shape[:-1])`` must be divisible by ``m``.
    kernel: ``(in, out)``.
    key: PRNG key for the random methods (``None`` for greedy).
    n, m, method: as in ``sparsejax.nm_prune``.
    impl: as in ``prune_grad``.

  Returns:
    ``(..., out)``, ``x @ kernel``. Add a bias outside (it then gets the dense gradient).
  """
  if jnp.ndim(kernel) != 2 or jnp.shape(x)[-1] != jnp.shape(kernel)[0]:
    raise ValueError(f"pruned_linear needs x (..., in) and kernel (in, out), got shapes "
                     f"{jnp.shape(x)} and {jnp.shape(kernel)}")
  tokens = math.prod(jnp.shape(x)[:-1])
  _check_pruning((tokens, jnp.shape(kernel)[1]), jnp.result_type(x, kernel), key, n, m, method,
                 0)
  return _pruned_linear(n, m, method, resolve_impl(impl), x, kernel, key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _pruned_linear(n, m, method, impl, x, kernel, key):
  del n, m, method, impl, key
  return x @ kernel


def _pruned_linear_fwd(n, m, method, impl, x, kernel, key):
  return x @ kernel, (x, kernel, key)


def _pruned_linear_bwd(n, m, method, impl, residuals, g):
  x, kernel, key = residuals
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  if _uses_kernel(impl, method, g.dtype):
    dkernel = _kernels.pruned_weight_grad(x2, g2, key_data(key), m=m, method=method,
                                          interpret=impl == "interpret")
  else:
    dkernel = x2.T @ nm_prune(g2, key=key, n=n, m=m, method=method, axis=0)
  return (g @ kernel.T).astype(x.dtype), dkernel.astype(kernel.dtype), None


_pruned_linear.defvjp(_pruned_linear_fwd, _pruned_linear_bwd)
