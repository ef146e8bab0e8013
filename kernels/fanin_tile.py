"""Pallas label-tile kernels for the fixed fan-in matmul ``y = x @ W``, W as (values, indices).

The tile design: output rows ("labels") in blocks of ``C``; a block's weights
are scattered into a dense ``(in, C)`` tile (rows' indices are distinct, so
nothing collides) that feeds ``plgpu.dot`` (tensor cores for bfloat16, float32
accumulation). FLOPs equal the dense layer's, parameters stay ``out * K``.

No tile goes through HBM as a whole array: every program owns a small slab of
global memory (small enough to stay in L2) that it fills by vector-indexed stores, reads
back in dot-sized pieces and then restores to zero by storing zeros at the
same positions, so the next block finds it clean without a full clear. Within
a program, ``plgpu.debug_barrier`` (a CTA barrier, which also orders global
memory) separates the stores from the loads of other threads. Triton's software
pipeliner ignores those barriers, so no loop it pipelines may store to the slab
it loads: see ``_compiler_params``.

* ``tile_forward``: ``y[b, u] = sum_k x[b, idx[u, k]] w[u, k]``. A persistent
  grid of programs, each looping over label blocks ``p, p + P, ...`` with a
  ``(in, C)`` slab: scatter, then ``x @ slab`` over input blocks per batch block.
* ``tile_dx``: ``dx = g @ W^T``, split-K over the labels. A program owns one
  (input block, batch block) of ``dx`` in registers and one of ``S`` label
  splits; per label block it scatters only the entries whose index falls in
  its input block into a ``(BD, C)`` slab and adds ``g_tile @ slab^T``. The
  ``S`` partial sums are added by XLA.
* ``tile_dvalues``: ``dW[u, k] = (x^T g)[idx[u, k], u]``. Persistent like the
  forward: per label block and input block, the ``(BD, C)`` block of
  ``x^T g_tile`` goes to a float32 slab, from which the entries whose index
  falls in the input block are gathered.
* ``tile_backward``: ``tile_dx`` and ``tile_dvalues``.

Unlike the gather kernels of ``kernels/fanin.py``, a non-finite ``x`` (or
``g``) element reaches every output of its batch row, as in a dense matmul:
it meets the tile's zeros.

Each function takes ``interpret=True`` to run in Pallas interpret mode (any
backend, used by the CPU test suite), where every operation runs whole and in
order, so the barriers are left out (they have no rule there). Compiled, they
go through the Pallas Triton lowering.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .vma import kernel_out_shape

__all__ = ["Tuning", "BackwardTuning", "tile_forward", "tile_dx", "tile_dvalues",
           "tile_backward", "FORWARD_TILE_TUNING", "DX_TILE_TUNING", "DVALUES_TILE_TUNING",
           "BACKWARD_TILE_TUNING"]

# Triton's dot needs every dimension of its operands to be at least 16.
_DOT_MIN = 16


class Tuning(NamedTuple):
  """Launch settings of a tile kernel (static; interpret mode uses only the block sizes).

  Block sizes must be powers of 2 (the Triton lowering needs them); each is
  clipped to the next power of 2 of its dimension, and dot dimensions to at
  least 16.

  Attributes:
    block_rows: label rows ``C`` per block (the tile's width).
    block_batch: batch rows per dot.
    block_in: input columns ``BD`` per dot.
    block_slots: slots of a row scattered or gathered per step.
    programs: number of programs of the persistent grid (a few per SM); for
      ``tile_dx``, the total over all label splits.
    slab_mib: ``tile_forward`` only: at most this many MiB of ``(in, C)`` slabs
      over all programs (fewer programs for a large ``in``), so they stay in L2.
    tf32: float32 dots in TF32 on tensor cores (about 1e-3 relative error);
      otherwise they are exact float32 FMA dots. bfloat16 dots ignore it.
    num_warps, num_stages: Triton's warps per program and software-pipelining depth
      (``tile_dx`` always runs one stage, and ``tile_forward`` with one input and one
      batch block: see ``_compiler_params``).
  """
  block_rows: int = 64
  block_batch: int = 64
  block_in: int = 64
  block_slots: int = 64
  programs: int = 264
  slab_mib: int = 32
  tf32: bool = False
  num_warps: int = 4
  num_stages: int = 2


class BackwardTuning(NamedTuple):
  """``tile_backward``'s settings: one ``Tuning`` per kernel."""
  dx: Tuning
  dvalues: Tuning


# The fastest of a 4-setting sweep on an H200 (batch 256, in 768, out 670,091, K 128,
# bf16; BENCHMARKS.md): the whole batch of 256 in one block, so each label block's
# slab is scattered and read once per batch. 264 programs = 2 per SM (132 SMs).
FORWARD_TILE_TUNING = Tuning(block_rows=64, block_batch=256, block_in=64, num_warps=8,
                             num_stages=2)
DX_TILE_TUNING = Tuning(block_rows=64, block_batch=256, block_in=128, num_warps=8,
                        num_stages=2)
DVALUES_TILE_TUNING = Tuning(block_rows=64, block_batch=128, block_in=128, num_warps=8,
                             num_stages=2)
BACKWARD_TILE_TUNING = BackwardTuning(dx=DX_TILE_TUNING, dvalues=DVALUES_TILE_TUNING)


class _Blocks(NamedTuple):
  """Block sizes for one call: label rows, batch rows, input columns, slots."""
  rows: int
  batch: int
  inputs: int
  slots: int


def _blocks(tuning: Tuning, out: int, batch: int, in_features: int, fan_in: int) -> _Blocks:
  """The power-of-2 block sizes of ``tuning`` clipped to the problem.

  Arguments:
    tuning: the launch settings.
    out, batch, in_features, fan_in: the problem's dimensions.

  Returns:
    ``_Blocks``; the three dot dimensions are at least ``_DOT_MIN``.
  """
  sizes = (tuning.block_rows, tuning.block_batch, tuning.block_in, tuning.block_slots)
  if any(s < 1 or s & (s - 1) for s in sizes):
    raise ValueError(f"block sizes must be powers of 2, got {tuning}")

  def clip(size, dim):
    return max(_DOT_MIN, min(size, pl.next_power_of_2(dim)))

  return _Blocks(clip(tuning.block_rows, out), clip(tuning.block_batch, batch),
                 clip(tuning.block_in, in_features),
                 min(tuning.block_slots, pl.next_power_of_2(fan_in)))


def _compiler_params(tuning: Tuning, *, pipelined: bool = True):
  """Triton's settings; ``pipelined=False`` turns software pipelining off (one stage).

  Triton's software pipeliner takes every innermost ``scf.for`` whose ``tt.dot``
  is fed by ``tt.load`` and issues those loads a stage ahead, into the previous
  iteration. It does not see that the same loop stores to the loaded memory
  and orders it with ``gpu.barrier``: the slab tile of label block ``t + 1``
  is then loaded before that block's scatter (and around block ``t``'s zero
  restore) and reads zeros. A label-block loop is innermost whenever its
  inner loops have one trip each (a single slot chunk, ``K <= block_slots``;
  one input and one batch block), which Triton's canonicalizer inlines; such
  kernels get ``pipelined=False``.
  """
  return plgpu.CompilerParams(num_warps=tuning.num_warps,
                              num_stages=tuning.num_stages if pipelined else 1)


def _barrier(interpret: bool):
  """Orders a program's global-memory stores before other threads' loads (GPU only).

  Interpret mode runs every operation whole and in order, so it needs none.
  """
  if not interpret:
    plgpu.debug_barrier()


def _masked_tile(ref, row0, col0, shape, limits, other=0):
  """The ``shape`` tile of a 2-d ``ref`` at ``(row0, col0)``; ``other`` past ``limits``.

  Arguments:
    ref: a 2-d ref; ``row0``, ``col0``: the tile's first row and column (traced).
    shape: ``(rows, cols)``, powers of 2; ``limits``: the ref's true ``(rows, cols)``.
    other: the value of elements outside the ref.

  Returns:
    ``(tile, mask)``, both of ``shape``; ``mask`` is true inside the ref.
  """
  rows = row0 + jnp.arange(shape[0])
  cols = col0 + jnp.arange(shape[1])
  mask = (rows < limits[0])[:, None] & (cols < limits[1])[None, :]
  tile = plgpu.load(ref.at[pl.ds(row0, shape[0]), pl.ds(col0, shape[1])], mask=mask,
                    other=other)
  return tile, mask


def _scatter_block(slab_ref, values_ref, indices_ref, label0, base, lo, hi, *,
                   blocks: _Blocks, restore: bool):
  """Writes a label block's weights whose index lies in ``[lo, hi)`` into a slab.

  Entry ``(u, k)`` of the block (``u`` counted from ``label0``) with ``lo <=
  idx < hi`` goes to ``slab[base + idx - lo, u]``: its value, or zero when
  ``restore``. The store is masked to those entries (row indices are distinct
  within a label row, so no two stored lanes share an element); every other
  lane (ragged rows, slots past ``K``, indices outside the range) stores
  nothing. Their addresses still point at the slab's last row, a dump row
  never read: compiled, a masked-off lane touches no memory, but interpret
  mode writes every lane of a masked store back (masked-off ones with the old
  value), which must not land on an element a real lane writes.

  Arguments:
    slab_ref: ``(rows, C)`` slab in the dot dtype.
    values_ref, indices_ref: ``(out, K)`` topology refs.
    label0: the block's first row; ``base``: the program's first slab row.
    lo, hi: the input columns this slab holds.
    blocks: the call's block sizes; ``restore``: store zeros instead of values.
  """
  out, fan_in = indices_ref.shape
  c, kb = blocks.rows, blocks.slots
  dump = slab_ref.shape[0] - 1
  cols = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[:, None], (c, kb))

  def chunk(q, carry):
    k0 = q * kb
    idx, valid = _masked_tile(indices_ref, label0, k0, (c, kb), (out, fan_in))
    idx = idx.astype(jnp.int32)
    inside = valid & (idx >= lo) & (idx < hi)
    rows = jnp.where(inside, base + idx - lo, dump)
    if restore:
      weights = jnp.zeros((c, kb), slab_ref.dtype)
    else:
      weights, _ = _masked_tile(values_ref, label0, k0, (c, kb), (out, fan_in))
      weights = weights.astype(slab_ref.dtype)
    plgpu.store(slab_ref.at[rows, cols], weights, mask=inside)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(fan_in, kb), chunk, 0)


def _clear(slab_ref, base, n_rows: int, block: int):
  """Zeros slab rows ``[base, base + n_rows)``, ``block`` rows a store."""
  def clear(d, carry):
    slab_ref[pl.ds(base + d * block, block), :] = jnp.zeros((block, slab_ref.shape[1]),
                                                            slab_ref.dtype)
    return carry

  jax.lax.fori_loop(0, n_rows // block, clear, 0)


def _my_label_blocks(n_labels: int, programs: int):
  """This program's index ``p`` and the number of label blocks ``p, p + P, ...`` it owns."""
  p = pl.program_id(0)
  return p, (n_labels - 1 - p) // programs + 1


def _forward_kernel(x_ref, values_ref, indices_ref, y_ref, slab_ref, *, blocks: _Blocks,
                    programs: int, tf32: bool, interpret: bool):
  """One program of ``tile_forward``'s persistent grid.

  Arguments:
    x_ref: ``(B, in)``; values_ref, indices_ref: ``(out, K)``.
    y_ref: ``(B, out)`` output.
    slab_ref: ``(P * in_pad + 1, C)`` scratch output in ``x``'s dtype: program
      ``p``'s ``(in_pad, C)`` tile at rows ``p * in_pad``, then the dump row.
    blocks, programs (``P``), tf32, interpret: static settings.
  """
  batch, in_features = x_ref.shape
  out = y_ref.shape[1]
  c, bb, bd = blocks.rows, blocks.batch, blocks.inputs
  n_in = pl.cdiv(in_features, bd)
  p, n_mine = _my_label_blocks(pl.cdiv(out, c), programs)
  base = p * (n_in * bd)  # this program's (n_in * BD, C) slab
  scatter = functools.partial(_scatter_block, slab_ref, values_ref, indices_ref, lo=0,
                              hi=in_features, blocks=blocks)

  # A fresh output: NaN-poisoned in interpret mode, whatever was there on the GPU.
  _clear(slab_ref, base, n_in * bd, bd)
  _barrier(interpret)

  def label_block(t, carry):
    label0 = (p + t * programs) * c
    scatter(label0, base, restore=False)
    _barrier(interpret)

    def batch_block(j, carry):
      def input_block(d, acc):
        # Masked to zero past ``in``: the slab's pad rows are zero, and 0 * garbage may be NaN.
        xt, _ = _masked_tile(x_ref, j * bb, d * bd, (bb, bd), (batch, in_features))
        w = slab_ref[pl.ds(base + d * bd, bd), :]
        return acc + plgpu.dot(xt, w, allow_tf32=tf32)

      acc = jax.lax.fori_loop(0, n_in, input_block, jnp.zeros((bb, c), jnp.float32))
      rows = j * bb + jnp.arange(bb)
      cols = label0 + jnp.arange(c)
      plgpu.store(y_ref.at[pl.ds(j * bb, bb), pl.ds(label0, c)], acc.astype(y_ref.dtype),
                  mask=(rows < batch)[:, None] & (cols < out)[None, :])
      return carry

    jax.lax.fori_loop(0, pl.cdiv(batch, bb), batch_block, 0)
    _barrier(interpret)  # every thread's slab loads are done before the zeros go in
    scatter(label0, base, restore=True)
    _barrier(interpret)  # the zeros land before the next block's values
    return carry

  jax.lax.fori_loop(0, n_mine, label_block, 0)


@functools.partial(jax.jit, static_argnames=("interpret", "tuning"))
def tile_forward(x, values, indices, *, interpret: bool = False,
                 tuning: Tuning = FORWARD_TILE_TUNING):
  """The fixed fan-in forward through in-kernel label tiles.

  Arguments:
    x: ``(B, in)`` float32 or bfloat16; the dots run in its dtype.
    values: ``(out, K)`` weights (cast to ``x``'s dtype in the kernel).
    indices: ``(out, K)``, any integer dtype, distinct within a row, in ``[0, in)``.
    interpret: run in Pallas interpret mode.
    tuning: launch settings.

  Returns:
    ``y`` ``(B, out)`` in ``result_type(x, values)``, float32 accumulation.
  """
  batch, in_features = x.shape
  out, fan_in = values.shape
  blocks = _blocks(tuning, out, batch, in_features, fan_in)
  n_labels = pl.cdiv(out, blocks.rows)
  slab_rows = pl.cdiv(in_features, blocks.inputs) * blocks.inputs
  slab_bytes = slab_rows * blocks.rows * x.dtype.itemsize
  programs = max(1, min(tuning.programs, n_labels, tuning.slab_mib * 2**20 // slab_bytes))
  y_shape, operands = kernel_out_shape((x, values, indices), (batch, out),
                                       jnp.result_type(x, values))
  # One slab per program, plus the dump row.
  slab_shape, _ = kernel_out_shape(operands, (programs * slab_rows + 1, blocks.rows), x.dtype)
  kernel = functools.partial(_forward_kernel, blocks=blocks, programs=programs,
                             tf32=tuning.tf32, interpret=interpret)
  y, _ = pl.pallas_call(
      kernel,
      grid=(programs,),
      out_shape=(y_shape, slab_shape),
      # The label-block loop (slab stores, then dots on slab loads) is innermost when it
      # holds one input block and one batch block: no pipelining then (``_compiler_params``).
      compiler_params=_compiler_params(
          tuning, pipelined=slab_rows > blocks.inputs or batch > blocks.batch),
      interpret=interpret,
  )(*operands)
  return y


def _dx_kernel(g_ref, values_ref, indices_ref, dx_ref, slab_ref, *, blocks: _Blocks,
               tf32: bool, interpret: bool):
  """Program ``(input block d, batch block j, label split s)`` of ``tile_dx``.

  Arguments:
    g_ref: ``(B, out)``; values_ref, indices_ref: ``(out, K)``.
    dx_ref: ``(S, B_pad, in_pad)`` float32 output, one partial sum per split.
    slab_ref: ``(programs * BD + 1, C)`` scratch output in ``g``'s dtype: one
      ``(BD, C)`` tile per program, then the dump row.
    blocks, tf32, interpret: static settings.
  """
  batch, out = g_ref.shape
  c, bb, bd = blocks.rows, blocks.batch, blocks.inputs
  d, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  n_in, n_batch, splits = pl.num_programs(0), pl.num_programs(1), pl.num_programs(2)
  n_labels = pl.cdiv(out, c)
  base = ((s * n_batch + j) * n_in + d) * bd  # this program's (BD, C) slab
  scatter = functools.partial(_scatter_block, slab_ref, values_ref, indices_ref, lo=d * bd,
                              hi=d * bd + bd, blocks=blocks)

  _clear(slab_ref, base, bd, bd)
  _barrier(interpret)

  def label_block(t, acc):
    label0 = (s + t * splits) * c
    scatter(label0, base, restore=False)
    _barrier(interpret)
    gt, _ = _masked_tile(g_ref, j * bb, label0, (bb, c), (batch, out))
    w = slab_ref[pl.ds(base, bd), :]
    acc = acc + plgpu.dot(gt, w, trans_b=True, allow_tf32=tf32)
    _barrier(interpret)  # every thread's slab loads are done before the zeros go in
    scatter(label0, base, restore=True)
    _barrier(interpret)  # the zeros land before the next block's values
    return acc

  acc = jnp.zeros((bb, bd), jnp.float32)
  acc = jax.lax.fori_loop(0, (n_labels - 1 - s) // splits + 1, label_block, acc)
  # Padded (power-of-2) partials: every element is written, the pad is sliced off.
  dx_ref[s, pl.ds(j * bb, bb), pl.ds(d * bd, bd)] = acc


@functools.partial(jax.jit, static_argnames=("in_features", "interpret", "tuning"))
def tile_dx(g, values, indices, *, in_features: int, interpret: bool = False,
            tuning: Tuning = DX_TILE_TUNING):
  """``dx = g @ W^T`` through in-kernel label tiles, split-K over the labels.

  A grid of ``(in blocks, batch blocks, S)`` programs with ``S`` about
  ``tuning.programs`` over the other two; every program reads each label
  block's topology of its split (from L2 after the first), and XLA adds the
  ``S`` partial ``(B, in)`` sums.

  Arguments:
    g: ``(B, out)`` output gradient; the dots run in its dtype.
    values: ``(out, K)`` weights (cast to ``g``'s dtype in the kernel).
    indices: ``(out, K)``, any integer dtype.
    in_features: ``in``.
    interpret, tuning: as for ``tile_forward``.

  Returns:
    ``dx`` ``(B, in)`` float32.
  """
  batch, out = g.shape
  fan_in = values.shape[1]
  blocks = _blocks(tuning, out, batch, in_features, fan_in)
  n_labels = pl.cdiv(out, blocks.rows)
  n_in, n_batch = pl.cdiv(in_features, blocks.inputs), pl.cdiv(batch, blocks.batch)
  splits = max(1, min(n_labels, tuning.programs // (n_in * n_batch)))
  partial_shape, operands = kernel_out_shape(
      (g, values, indices), (splits, n_batch * blocks.batch, n_in * blocks.inputs), jnp.float32)
  slab_shape, _ = kernel_out_shape(
      operands, (splits * n_batch * n_in * blocks.inputs + 1, blocks.rows), g.dtype)
  kernel = functools.partial(_dx_kernel, blocks=blocks, tf32=tuning.tf32, interpret=interpret)
  partial, _ = pl.pallas_call(
      kernel,
      grid=(n_in, n_batch, splits),  # input blocks vary fastest: they share a label block
      out_shape=(partial_shape, slab_shape),
      # The label-block loop holds the dot on the slab it stores to, and no other loop
      # once the slot-chunk loop has one trip: never pipelined (``_compiler_params``).
      compiler_params=_compiler_params(tuning, pipelined=False),
      interpret=interpret,
  )(*operands)
  return jnp.sum(partial, axis=0)[:batch, :in_features]


def _dvalues_kernel(x_ref, g_ref, indices_ref, dvalues_ref, slab_ref, *, blocks: _Blocks,
                    programs: int, tf32: bool, interpret: bool):
  """One program of ``tile_dvalues``' persistent grid.

  Arguments:
    x_ref: ``(B, in)``; g_ref: ``(B, out)``; indices_ref: ``(out, K)``.
    dvalues_ref: ``(out, K)`` float32 output.
    slab_ref: ``(P * BD, C)`` float32 scratch output, a ``(BD, C)`` block per program.
    blocks, programs (``P``), tf32, interpret: static settings.
  """
  batch, in_features = x_ref.shape
  out, fan_in = indices_ref.shape
  c, bb, bd, kb = blocks
  n_in = pl.cdiv(in_features, bd)
  p, n_mine = _my_label_blocks(pl.cdiv(out, c), programs)
  base = p * bd  # this program's (BD, C) float32 slab
  cols = jnp.broadcast_to(jnp.arange(c)[:, None], (c, kb))
  dot_dtype = jnp.promote_types(x_ref.dtype, g_ref.dtype)

  def label_block(t, carry):
    label0 = (p + t * programs) * c

    def input_block(d, carry):
      def batch_block(j, acc):
        xt, _ = _masked_tile(x_ref, j * bb, d * bd, (bb, bd), (batch, in_features))
        gt, _ = _masked_tile(g_ref, j * bb, label0, (bb, c), (batch, out))
        return acc + plgpu.dot(xt.astype(dot_dtype), gt.astype(dot_dtype), trans_a=True,
                               allow_tf32=tf32)

      part = jax.lax.fori_loop(0, pl.cdiv(batch, bb), batch_block,
                               jnp.zeros((bd, c), jnp.float32))
      slab_ref[pl.ds(base, bd), :] = part
      _barrier(interpret)

      def chunk(q, carry):
        k0 = q * kb
        idx, valid = _masked_tile(indices_ref, label0, k0, (c, kb), (out, fan_in))
        idx = idx.astype(jnp.int32) - d * bd
        inside = valid & (idx >= 0) & (idx < bd)
        grads = slab_ref[base + jnp.where(inside, idx, 0), cols]
        # Each entry is written once, by the input block that holds its index.
        plgpu.store(dvalues_ref.at[pl.ds(label0, c), pl.ds(k0, kb)], grads, mask=inside)
        return carry

      jax.lax.fori_loop(0, pl.cdiv(fan_in, kb), chunk, 0)
      _barrier(interpret)  # every thread's gathers are done before the next block
      return carry

    return jax.lax.fori_loop(0, n_in, input_block, carry)

  jax.lax.fori_loop(0, n_mine, label_block, 0)


@functools.partial(jax.jit, static_argnames=("interpret", "tuning"))
def tile_dvalues(x, g, indices, *, interpret: bool = False,
                 tuning: Tuning = DVALUES_TILE_TUNING):
  """``dW[u, k] = sum_b x[b, idx[u, k]] g[b, u]`` through blocks of ``x^T g``.

  Arguments:
    x: ``(B, in)``; g: ``(B, out)``. The dots run in their common dtype
      (float32 when they differ).
    indices: ``(out, K)``, any integer dtype.
    interpret, tuning: as for ``tile_forward``.

  Returns:
    ``dvalues`` ``(out, K)`` float32.
  """
  batch, in_features = x.shape
  out, fan_in = indices.shape
  blocks = _blocks(tuning, out, batch, in_features, fan_in)
  programs = max(1, min(tuning.programs, pl.cdiv(out, blocks.rows)))
  dvalues_shape, operands = kernel_out_shape((x, g, indices), (out, fan_in), jnp.float32)
  slab_shape, _ = kernel_out_shape(operands, (programs * blocks.inputs, blocks.rows),
                                   jnp.float32)
  kernel = functools.partial(_dvalues_kernel, blocks=blocks, programs=programs,
                             tf32=tuning.tf32, interpret=interpret)
  dvalues, _ = pl.pallas_call(
      kernel,
      grid=(programs,),
      out_shape=(dvalues_shape, slab_shape),
      compiler_params=_compiler_params(tuning),
      interpret=interpret,
  )(*operands)
  return dvalues


@functools.partial(jax.jit, static_argnames=("interpret", "tuning"))
def tile_backward(x, g, values, indices, *, interpret: bool = False,
                  tuning: BackwardTuning = BACKWARD_TILE_TUNING):
  """Both gradients of ``tile_forward``: ``tile_dx`` and ``tile_dvalues``.

  Arguments:
    x: ``(B, in)``; g: ``(B, out)``; values, indices: ``(out, K)``.
    interpret: run in Pallas interpret mode.
    tuning: one ``Tuning`` per kernel.

  Returns:
    ``(dx, dvalues)``: ``(B, in)`` and ``(out, K)``, float32.
  """
  dx = tile_dx(g, values, indices, in_features=x.shape[1], interpret=interpret,
               tuning=tuning.dx)
  dvalues = tile_dvalues(x, g, indices, interpret=interpret, tuning=tuning.dvalues)
  return dx, dvalues
