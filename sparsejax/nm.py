"""N:M structured sparsity: at most ``n`` non-zeros in every group of ``m``.

Groups are ``m`` consecutive entries along one axis (the contraction axis of
the GEMM that consumes the tensor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax import _checks

__all__ = ["nm_mask", "is_nm_sparse", "keep_largest", "to_groups", "from_groups"]


def _check_nm(shape, n: int, m: int, axis: int) -> int:
  """Validates ``n``, ``m`` and the axis; returns the axis as a non-negative int."""
  if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
    raise ValueError(f"N:M sparsity needs integers 1 <= n <= m, got n={n!r}, m={m!r}")
  ndim = len(shape)
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of range for an array of shape {tuple(shape)}")
  axis %= ndim
  if shape[axis] % m:
    raise ValueError(
        f"N:M sparsity with m={m} needs the length of axis {axis} to be divisible by {m}, "
        f"got shape {tuple(shape)}")
  return axis


def to_groups(x: jax.Array, m: int, axis: int) -> jax.Array:
  """``x`` with ``axis`` moved last and split into groups: shape ``(..., L // m, m)``."""
  moved = jnp.moveaxis(x, axis, -1)
  return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def from_groups(groups: jax.Array, axis: int) -> jax.Array:
  """Inverse of ``to_groups``."""
  flat = groups.reshape(*groups.shape[:-2], -1)
  return jnp.moveaxis(flat, -1, axis)


def nm_mask(x: jax.Array, n: int, m: int, axis: int = -1) -> jax.Array:
  """Greedy N:M mask: keeps the ``n`` largest ``|x|`` of every group of ``m``.

  Arguments:
    x: float array; ``x.shape[axis]`` must be divisible by ``m``.
    n, m: keep ``n`` of every ``m`` (``1 <= n <= m``).
    axis: the axis along which groups of ``m`` consecutive entries are formed.

  Returns:
    Bool array of ``x.shape`` with exactly ``n`` True per group (ties keep the
    lower index). NaN in a concrete ``x`` raises ``ValueError``.
  """
  _checks.check_float(x, "x")
  axis = _check_nm(jnp.shape(x), n, m, axis)
  _checks.check_finite(x, "x")
  return from_groups(keep_largest(to_groups(jnp.abs(x), m, axis), n), axis)


def keep_largest(groups: jax.Array, n: int) -> jax.Array:
  """``(..., m)`` bool: the ``n`` largest entries of every group of ``m`` (ties: lower index)."""
  _, kept = lax.top_k(groups, n)  # (..., n)
  return jnp.any(kept[..., :, None] == jnp.arange(groups.shape[-1]), axis=-2)


def is_nm_sparse(x: jax.Array, n: int, m: int, axis: int = -1) -> jax.Array:
  """True when every group of ``m`` along ``axis`` has at most ``n`` non-zeros.

  Returns:
    A scalar bool array (usable under ``jit``).
  """
  axis = _check_nm(jnp.shape(x), n, m, axis)
  nonzeros = jnp.sum(to_groups(x != 0, m, axis), axis=-1)
  return jnp.all(nonzeros <= n)
