"""Loop carries that type-check inside ``jax.shard_map``.

With ``check_vma`` (the default), every value inside ``shard_map`` records the
manual mesh axes it varies over, and a loop's carry must keep its type. A
fresh ``jnp.zeros`` is invariant, but a body that mixes in sharded operands
makes the carry varying; so the loops of this library start from carries
typed as varying as their operands. Outside ``shard_map`` nothing varies and
nothing changes.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_like(init, *operands):
  """``init`` cast to vary over every manual mesh axis that some operand varies over.

  Arguments:
    init: a pytree of arrays, a loop's initial carry.
    *operands: pytrees of arrays (or scalars) that the loop body combines
      into the carry.

  Returns:
    ``init`` with each leaf ``lax.pcast(leaf, axes, to="varying")`` over the
    axes it lacks (the leaf itself where it lacks none).
  """
  axes = frozenset().union(*(_varying(x) for x in jax.tree.leaves(operands)))

  def cast(leaf):
    missing = tuple(sorted(axes - _varying(leaf), key=str))
    return lax.pcast(leaf, missing, to="varying") if missing else leaf

  return jax.tree.map(cast, init)


def kernel_out_shape(operands, shape, dtype):
  """A ``pallas_call`` output's ``ShapeDtypeStruct``, and its operands, typed for ``shard_map``.

  Inside ``shard_map`` (``check_vma``) a ``pallas_call`` must be told over which
  manual axes its outputs vary: here, over every axis some operand varies over,
  with the operands cast to match. Outside, nothing changes.

  Arguments:
    operands: a tuple of the kernel's array operands.
    shape, dtype: the output's.

  Returns:
    ``(out_shape, operands)``.
  """
  operands = varying_like(tuple(operands), *operands)
  mat = getattr(jax.typeof(operands[0]), "mat", None)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat), operands


def _varying(x) -> frozenset:
  """The manual mesh axes ``x`` varies over (none outside ``shard_map``)."""
  manual = getattr(jax.typeof(x), "mat", None)
  return frozenset() if manual is None else manual.varying
