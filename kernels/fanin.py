"""Pallas kernels for the fixed fan-in matmul ``y = x @ W``, W stored as (values, indices).

Layout: the kernels read ``x^T`` (in, B), so the gather for slot ``k`` of a
block of output rows reads whole batch vectors ``x^T[indices[u, k], b-block]``
(contiguous), as the reference CUDA kernels do. Grids tile output rows (and
the batch); every slot loop accumulates in float32.

* ``fanin_forward``: ``y[b, u] = sum_k x[b, idx[u, k]] w[u, k]``.
* ``fanin_dvalues``: ``dW[u, k] = sum_b x[b, idx[u, k]] g[b, u]`` (gather,
  multiply, reduce over the batch).
* ``fanin_dx``: ``dx[b, i] = sum_{idx[u, k] = i} g[b, u] w[u, k]`` from a
  column-sorted copy of the topology (``sort_topology``): one program per input
  column sums its entries, with no atomics (faster than atomic scatter-adds
  when measured, see ``fanin_dx_sorted``).

Each takes ``interpret=True`` to run in Pallas interpret mode (any backend,
used by the CPU test suite). Compiled, they go through the Pallas Triton
lowering, built for jax 0.11 (see the README's GPU notes).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .vma import kernel_out_shape

__all__ = ["Tuning", "fanin_forward", "fanin_dvalues", "fanin_dx", "fanin_dx_sorted",
           "sort_topology", "FORWARD_TUNING", "DVALUES_TUNING", "DX_TUNING", "DX_CHUNK"]


class Tuning(NamedTuple):
  """Launch settings of a kernel (static; interpret mode uses only the block sizes).

  Attributes:
    block_rows: output rows per program (a power of 2).
    block_batch: batch columns per program or per inner step (a power of 2).
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
  """
  block_rows: int = 32
  block_batch: int = 64
  num_warps: int = 4
  num_stages: int = 2


# Default launch settings per kernel: the fastest of the sweep on an H100 at out 670k,
# K 64, batch 256 (``python benchmarks/kernels.py --sweep``, table in BENCHMARKS.md).
FORWARD_TUNING = Tuning(block_rows=16, block_batch=128, num_warps=4, num_stages=3)
DVALUES_TUNING = Tuning(block_rows=32, block_batch=64, num_warps=4, num_stages=2)
DX_TUNING = Tuning(block_batch=128, num_warps=8, num_stages=2)  # block_rows unused
DX_CHUNK = 128


def _compiler_params(tuning: Tuning):
  return plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages)


def _blocks(out: int, batch: int, block_rows: int, block_batch: int):
  """Power-of-2 block sizes (the Triton lowering needs them) no larger than needed."""
  return min(block_rows, pl.next_power_of_2(out)), min(block_batch, pl.next_power_of_2(batch))


def _pad_rows(a, multiple: int):
  """Zero-pads axis 0 to a multiple (a no-op, without a copy, when it already is one)."""
  extra = -a.shape[0] % multiple
  return a if not extra else jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))


def _slot_offsets(block_rows: int, out: int, fan_in: int):
  """Offsets of slot 0 of this program's rows in the flat (out * K,) topology arrays.

  Rows past ``out`` (the ragged last block) read row 0 instead; their results are
  never stored. The topology is passed flat because the Triton lowering needs
  power-of-2 shapes and K need not be one.
  """
  rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
  valid = rows < out
  return jnp.where(valid, rows, 0) * fan_in, valid


def _flat_spec(size: int, grid_rank: int):
  """The whole flat array as one block, for every program."""
  return pl.BlockSpec((size,), (lambda i: (0,)) if grid_rank == 1 else (lambda i, j: (0,)))


def _forward_kernel(xt_ref, values_ref, indices_ref, y_ref, *, out: int, fan_in: int):
  block_rows = y_ref.shape[1]
  base, valid = _slot_offsets(block_rows, out, fan_in)

  def add_slot(k, acc):
    idx = indices_ref[base + k].astype(jnp.int32)
    weight = values_ref[base + k].astype(jnp.float32)
    return acc + xt_ref[idx, :].astype(jnp.float32) * weight[:, None]

  acc = jnp.zeros((block_rows, xt_ref.shape[1]), jnp.float32)
  acc = jax.lax.fori_loop(0, fan_in, add_slot, acc)
  # Masked: the Triton lowering does not clip a ragged last block's store, and its
  # columns past ``out`` would land on the next batch row.
  plgpu.store(y_ref, acc.T.astype(y_ref.dtype),
              mask=jnp.broadcast_to(valid[None, :], (y_ref.shape[0], block_rows)))


@functools.partial(jax.jit, static_argnames=("interpret", "tuning"))
def fanin_forward(x, values, indices, *, interpret: bool = False,
                  tuning: Tuning = FORWARD_TUNING):
  """``(B, in) x (out, K) -> (B, out)`` in ``result_type(x, values)``, float32 accumulation."""
  batch, in_features = x.shape
  out, fan_in = values.shape
  rows, cols = _blocks(out, batch, tuning.block_rows, tuning.block_batch)
  x = _pad_rows(x, cols)
  kernel = functools.partial(_forward_kernel, out=out, fan_in=fan_in)
  out_shape, operands = kernel_out_shape((x.T, values.reshape(-1), indices.reshape(-1)),
                                         (x.shape[0], out), jnp.result_type(x, values))
  y = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(out, rows), x.shape[0] // cols),
      in_specs=[pl.BlockSpec((in_features, cols), lambda i, j: (0, j)),
                _flat_spec(out * fan_in, 2), _flat_spec(out * fan_in, 2)],
      out_specs=pl.BlockSpec((cols, rows), lambda i, j: (j, i)),
      out_shape=out_shape,
      compiler_params=_compiler_params(tuning),
      interpret=interpret,
  )(*operands)
  return y[:batch]


def _dvalues_kernel(xt_ref, g_ref, indices_ref, dvalues_ref, *, out: int, fan_in: int,
                    block_batch: int):
  block_rows = g_ref.shape[1]
  base, valid = _slot_offsets(block_rows, out, fan_in)
  # Rows past ``out`` write to a scratch tail past out * K (sliced off by the caller).
  store_base = jnp.where(valid, base, out * fan_in + jnp.arange(block_rows) * fan_in)

  # Batch blocks outside, slots inside: each g tile is read once, and the float32
  # partial sums of the slots accumulate in the output.
  def batch_block(j, carry):
    cols = pl.ds(pl.multiple_of(j * block_batch, block_batch), block_batch)
    gt = g_ref[cols, :].T.astype(jnp.float32)  # (rows, batch block)

    def slot(k, carry):
      idx = indices_ref[base + k].astype(jnp.int32)
      part = jnp.sum(xt_ref[idx, cols].astype(jnp.float32) * gt, axis=1)
      before = jnp.where(j == 0, 0.0, dvalues_ref[store_base + k])
      dvalues_ref[store_base + k] = before + part
      return carry

    return jax.lax.fori_loop(0, fan_in, slot, carry)

  jax.lax.fori_loop(0, xt_ref.shape[1] // block_batch, batch_block, 0)


@functools.partial(jax.jit, static_argnames=("values_dtype", "interpret", "tuning"))
def fanin_dvalues(x, g, indices, *, values_dtype, interpret: bool = False,
                  tuning: Tuning = DVALUES_TUNING):
  """``dW`` of shape ``indices.shape`` from ``x`` (B, in) and ``g`` (B, out).

  A program owns a block of rows; it loops over batch blocks and, inside, slots.
  """
  batch, in_features = x.shape
  out, fan_in = indices.shape
  rows, cols = _blocks(out, batch, tuning.block_rows, tuning.block_batch)
  x, g = _pad_rows(x, cols), _pad_rows(g, cols)  # zero rows of g add nothing
  kernel = functools.partial(_dvalues_kernel, out=out, fan_in=fan_in, block_batch=cols)
  size = (out + rows) * fan_in  # a scratch tail for the ragged block's spare rows
  out_shape, operands = kernel_out_shape((x.T, g, indices.reshape(-1)), (size,), jnp.float32)
  flat = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(out, rows),),
      in_specs=[pl.BlockSpec((in_features, x.shape[0]), lambda i: (0, 0)),
                pl.BlockSpec((x.shape[0], rows), lambda i: (0, i)),
                _flat_spec(out * fan_in, 1)],
      out_specs=_flat_spec(size, 1),
      out_shape=out_shape,
      compiler_params=_compiler_params(tuning),
      interpret=interpret,
  )(*operands)
  return flat[:out * fan_in].reshape(out, fan_in).astype(values_dtype)


def sort_topology(indices, in_features: int):
  """The column-sorted copy of a topology, for ``fanin_dx_sorted``.

  Rebuild it only when the topology changes (e.g. after a SET step).

  Returns:
    ``(order, col_ptr)``: ``order`` (out*K,) int32, the flat slots sorted by input
    column; ``col_ptr`` (in + 1,) int32, where each column's run starts in ``order``.
  """
  flat = indices.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  col_ptr = jnp.searchsorted(flat[order], jnp.arange(in_features + 1, dtype=jnp.int32))
  return order, col_ptr.astype(jnp.int32)


def _dx_sorted_kernel(gt_ref, values_ref, order_ref, col_ptr_ref, dxt_ref, *, fan_in: int,
                      chunk: int):
  column = pl.program_id(0)
  start, end = col_ptr_ref[column], col_ptr_ref[column + 1]

  # The column's entries, ``chunk`` at a time: rows of g^T times their weights.
  def add_chunk(c, acc):
    entry = start + c * chunk + jnp.arange(chunk)
    inside = entry < end
    slot = jnp.where(inside, order_ref[jnp.where(inside, entry, 0)], 0)
    weight = jnp.where(inside, values_ref[slot].astype(jnp.float32), 0.0)
    rows = gt_ref[slot // fan_in, :].astype(jnp.float32)
    return acc + jnp.sum(rows * weight[:, None], axis=0)

  acc = jnp.zeros((dxt_ref.shape[1],), jnp.float32)
  acc = jax.lax.fori_loop(0, (end - start + chunk - 1) // chunk, add_chunk, acc)
  dxt_ref[...] = acc[None, :]


@functools.partial(jax.jit, static_argnames=("in_features", "interpret", "tuning", "chunk"))
def fanin_dx(g, values, indices, *, in_features: int, interpret: bool = False,
             tuning: Tuning = DX_TUNING, chunk: int = DX_CHUNK):
  """``dx`` (B, in), float32: ``sort_topology`` then ``fanin_dx_sorted``."""
  order, col_ptr = sort_topology(indices, in_features)
  return fanin_dx_sorted(g, values, order, col_ptr, interpret=interpret, tuning=tuning,
                         chunk=chunk)


@functools.partial(jax.jit, static_argnames=("interpret", "tuning", "chunk"))
def fanin_dx_sorted(g, values, order, col_ptr, *, interpret: bool = False,
                    tuning: Tuning = DX_TUNING, chunk: int = DX_CHUNK):
  """``dx`` (B, in), float32, without atomics, from a column-sorted topology.

  One program per (input column, batch block) sums that column's entries,
  ``chunk`` at a time: ``dx^T[i, b] = sum_{idx[u, k] = i} g^T[u, b] w[u, k]``. It
  was 3-4x faster than atomic scatter-adds on an H100 (BENCHMARKS.md). Each call
  result is deterministic, since no two programs write the same element.
  """
  batch, out = g.shape
  fan_in = values.shape[1]
  in_features = col_ptr.shape[0] - 1
  _, cols = _blocks(out, batch, tuning.block_rows, tuning.block_batch)
  g = _pad_rows(g, cols)
  kernel = functools.partial(_dx_sorted_kernel, fan_in=fan_in, chunk=chunk)
  out_shape, operands = kernel_out_shape((g.T, values.reshape(-1), order, col_ptr),
                                         (in_features, g.shape[0]), jnp.float32)
  dxt = pl.pallas_call(
      kernel,
      grid=(in_features, g.shape[0] // cols),
      in_specs=[pl.BlockSpec((out, cols), lambda i, j: (0, j)),
                _flat_spec(out * fan_in, 2), _flat_spec(out * fan_in, 2),
                _flat_spec(in_features + 1, 2)],
      out_specs=pl.BlockSpec((1, cols), lambda i, j: (i, j)),
      out_shape=out_shape,
      compiler_params=_compiler_params(tuning),
      interpret=interpret,
  )(*operands)
  return dxt.T[:batch]
