"""Pallas kernels for unbiased (MVUE) N:M pruning of neural gradients.

Both kernels draw their uniforms in-kernel with the map of ``sparsejax.mvue``
(group ``g`` numbered in memory order takes ``hash_word(key, g)``), so the bits
depend on the key and the group, never on the block sizes; and they run the
library's own elementwise pieces (``group_words``, ``prune_columns``), so they
agree with ``nm_prune`` bit for bit.

Layout: an array pruned along ``axis`` is viewed, without a copy, as
``(R, m, Q)``: ``Q`` is the product of the dims after ``axis``, and view row
``r`` holds the groups ``r Q .. r Q + Q - 1``. A tile of groups is then ``m``
loads ``ref[:, j, :]``, one per entry of the group, and a group's number is one
multiply-add of its row and column.

* ``nm_prune_kernel``: reads dY, writes the pruned dY.
* ``pruned_weight_grad``: ``dW = X^T prune(dY)`` pruned along the token axis,
  each dY tile pruned in registers and fed straight to the dot, so the pruned
  tensor never goes through memory.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .vma import kernel_out_shape
from .mvue_columns import DRAWS, prune_columns

from .counter_hash import group_words, uniform_from_word

__all__ = ["MaskTuning", "DwTuning", "MASK_TUNING", "DW_TUNING", "nm_prune_kernel",
           "pruned_weight_grad"]


class MaskTuning(NamedTuple):
  """Launch settings of ``nm_prune_kernel``: groups per program (``block_cols`` of them
  side by side along the contiguous axis) and Triton settings."""
  groups_per_program: int = 2048
  block_cols: int = 256
  num_warps: int = 4
  num_stages: int = 1


class DwTuning(NamedTuple):
  """Launch settings of ``pruned_weight_grad``: a (block_in, block_out) tile of dW per
  program, ``block_groups`` token groups per inner step (``m * block_groups`` tokens),
  and the tokens split into ``splits`` ranges whose partial dW are summed afterwards
  (more programs than SMs when in x out alone gives too few tiles)."""
  block_in: int = 64
  block_out: int = 64
  block_groups: int = 16
  num_warps: int = 4
  num_stages: int = 2
  splits: int = 1


# Per group size m, the fastest of ``python benchmarks/mvue_cost.py --sweep`` on an H100
# (2026-12-06, docs/mvue_grad/h100-2026-12-06/mvue_cost.txt).
MASK_TUNING = {2: MaskTuning(groups_per_program=1024, block_cols=256, num_warps=4, num_stages=1),
               4: MaskTuning(groups_per_program=1024, block_cols=512, num_warps=4, num_stages=1)}
# The fastest of the fused-kernel sweep of issue 9 on an H100 (BENCHMARKS.md).
DW_TUNING = DwTuning(block_in=256, block_out=64, block_groups=16, num_warps=4, num_stages=2,
                     splits=8)


def _view(shape, axis: int, m: int):
  """The ``(R, m, Q)`` view of an array pruned along ``axis``."""
  return math.prod(shape[:axis]) * (shape[axis] // m), m, math.prod(shape[axis + 1:])


def _uniforms(key_ref, group, draws: int):
  return [uniform_from_word(w) for w in group_words((key_ref[0], key_ref[1]), group, draws)]


def _mask_kernel(key_ref, x_ref, out_ref, *, method: str, rows: int, cols: int):
  block_rows, m, block_cols = x_ref.shape
  r = pl.program_id(0) * block_rows + jnp.arange(block_rows)[:, None]
  q = pl.program_id(1) * block_cols + jnp.arange(block_cols)[None, :]
  # The Triton lowering neither clips nor masks ragged blocks; aligned ones need no mask.
  ragged = rows % block_rows or cols % block_cols
  valid = ((r < rows) & (q < cols)) if ragged else None
  group = r.astype(jnp.uint32) * np.uint32(cols) + q.astype(jnp.uint32)
  u = _uniforms(key_ref, group, DRAWS[method, m // 2, m])
  entries = [plgpu.load(x_ref.at[:, np.int32(j), :], mask=valid, other=0 if ragged else None)
             .astype(jnp.float32) for j in range(m)]
  for j, pruned in enumerate(prune_columns(entries, u, method=method)):
    plgpu.store(out_ref.at[:, np.int32(j), :], pruned.astype(out_ref.dtype), mask=valid)


@functools.partial(jax.jit, static_argnames=("m", "method", "axis", "interpret", "tuning"))
def nm_prune_kernel(x, key_data, *, m: int, method: str, axis: int, interpret: bool = False,
                    tuning: MaskTuning | None = None):
  """MVUE N:M pruning of ``x`` along ``axis``, bit-equal to ``sparsejax.nm_prune``.

  Arguments:
    x: float32/bfloat16 array, ``x.shape[axis] % m == 0`` (checked by the caller).
    key_data: uint32 ``(2,)``, the key's words.
    m: 2 (1:2) or 4 (2:4); ``method``: ``"mvue"`` or ``"mvue_approx"`` (2:4).
    axis: non-negative axis of the groups.
    tuning: launch settings (default ``MASK_TUNING[m]``).

  Returns:
    The pruned array, shape and dtype of ``x``; the arithmetic runs in float32.
  """
  tuning = tuning or MASK_TUNING[m]
  view = _view(x.shape, axis, m)
  rows, _, cols = view
  block_cols = min(pl.next_power_of_2(cols), tuning.block_cols)
  block_rows = min(pl.next_power_of_2(rows), max(1, tuning.groups_per_program // block_cols))
  kernel = functools.partial(_mask_kernel, method=method, rows=rows, cols=cols)
  block = pl.BlockSpec((block_rows, m, block_cols), lambda i, j: (i, 0, j))
  out_shape, operands = kernel_out_shape((key_data, x.reshape(view)), view, x.dtype)
  out = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(rows, block_rows), pl.cdiv(cols, block_cols)),
      in_specs=[pl.BlockSpec((2,), lambda i, j: (0,)), block],
      out_specs=block,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps,
                                           num_stages=tuning.num_stages),
      interpret=interpret,
  )(*operands)
  return out.reshape(x.shape)


def _dw_kernel(key_ref, x_ref, g_ref, dw_ref, *, method: str, groups: int, ins: int,
               outs: int, block_groups: int, steps_per_split: int):
  block_in, block_out = dw_ref.shape
  m = g_ref.shape[1]
  # program_id outside the loop: interpret mode cannot evaluate it inside one.
  in_start, out_start = pl.program_id(0) * block_in, pl.program_id(1) * block_out
  first_step = pl.program_id(2) * steps_per_split
  cols_in, cols_out = in_start + jnp.arange(block_in), out_start + jnp.arange(block_out)
  in_ok, out_ok = cols_in < ins, cols_out < outs
  draws = DRAWS[method, m // 2, m]

  def step(s, acc):
    start = s * block_groups
    rows = start + jnp.arange(block_groups)[:, None]  # token group numbers along axis 0
    row_ok = rows < groups
    # Pruned along tokens (axis 0 of (T, out)): group (a', q) is number a' * out + q.
    u = _uniforms(key_ref, rows.astype(jnp.uint32) * np.uint32(outs)
                  + cols_out[None, :].astype(jnp.uint32), draws)
    tile = pl.ds(start, block_groups)
    g = [plgpu.load(g_ref.at[tile, np.int32(j), pl.ds(out_start, block_out)],
                    mask=row_ok & out_ok[None, :], other=0).astype(jnp.float32)
         for j in range(m)]
    for j, pruned in enumerate(prune_columns(g, u, method=method)):
      x = plgpu.load(x_ref.at[tile, np.int32(j), pl.ds(in_start, block_in)],
                     mask=row_ok & in_ok[None, :], other=0)
      # Rounded to dY's dtype first, as the unfused prune-then-matmul path does.
      acc += plgpu.dot(x, pruned.astype(g_ref.dtype).astype(x.dtype), trans_a=True,
                       allow_tf32=False)
    return acc

  last_step = jnp.minimum(first_step + steps_per_split, pl.cdiv(groups, block_groups))
  acc = jax.lax.fori_loop(first_step, last_step, step,
                          jnp.zeros((block_in, block_out), jnp.float32))
  plgpu.store(dw_ref, acc.astype(dw_ref.dtype), mask=in_ok[:, None] & out_ok[None, :])


@functools.partial(jax.jit, static_argnames=("m", "method", "interpret", "tuning"))
def pruned_weight_grad(x, g, key_data, *, m: int, method: str, interpret: bool = False,
                       tuning: DwTuning = DW_TUNING):
  """``dW = x^T nm_prune(g, axis=0)`` without writing the pruned ``g`` to memory.

  Arguments:
    x: ``(T, in)`` layer input (float32/bfloat16); ``g``: ``(T, out)`` output
      gradient; ``T % m == 0`` (checked by the caller).
    key_data: uint32 ``(2,)``; ``m``, ``method``: as in ``nm_prune_kernel``.

  Returns:
    float32 ``(in, out)``. The pruned ``g`` equals ``nm_prune(g, key=key, axis=0)``
    bit for bit; the dot accumulates in float32 (no TF32).
  """
  tokens, ins = x.shape
  outs = g.shape[1]
  groups = tokens // m
  block_in = min(tuning.block_in, max(16, pl.next_power_of_2(ins)))
  block_out = min(tuning.block_out, max(16, pl.next_power_of_2(outs)))
  steps = pl.cdiv(groups, tuning.block_groups)
  splits = max(1, min(tuning.splits, steps))
  steps_per_split = pl.cdiv(steps, splits)
  kernel = functools.partial(_dw_kernel, method=method, groups=groups, ins=ins, outs=outs,
                             block_groups=tuning.block_groups, steps_per_split=steps_per_split)
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j, p: (0,) * len(shape))
  out_shape, operands = kernel_out_shape(
      (key_data, x.reshape(groups, m, ins), g.reshape(groups, m, outs)),
      (pl.cdiv(steps, steps_per_split), ins, outs), jnp.float32)
  partial = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(ins, block_in), pl.cdiv(outs, block_out), pl.cdiv(steps, steps_per_split)),
      in_specs=[whole((2,)), whole((groups, m, ins)), whole((groups, m, outs))],
      out_specs=pl.BlockSpec((None, block_in, block_out), lambda i, j, p: (p, i, j)),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps,
                                           num_stages=tuning.num_stages),
      interpret=interpret,
  )(*operands)
  return partial[0] if partial.shape[0] == 1 else partial.sum(axis=0)
