"""The fixed fan-in sparse matmul ``y = x @ W`` with ``W`` stored as (values, indices).

Row ``u`` of the layer reads ``K`` input columns ``indices[u]`` with weights
``values[u]``:

    y[b, u] = sum_k x[b, indices[u, k]] * values[u, k]

Parameters and their gradient scale with ``out * K``, never with ``out * in``.
Two algorithms, each with an XLA version here and Pallas kernels in
``sparsejax.kernels``:

- **gather** (``impl="xla"``): works on ``x^T`` (in, B) so that every gathered
  index reads one contiguous batch vector, and loops over the ``K`` slots so
  that the largest intermediate is one (out, B) slab, never (B, out, K). Work
  ``B * out * K``, but gathers, which neither CPUs nor GPUs run near their
  arithmetic rate.
- **label tile** (``impl="xla_tile"``): the rows in tiles of ``C``; each tile's
  values are scattered into a zero dense ``(in, C)`` tile in the activation
  dtype, and the tile goes through matmuls (tensor cores on a GPU, BLAS on a
  CPU) with float32 accumulation: ``y_tile = x @ W_tile``, ``dx += g_tile @
  W_tile^T`` and ``dvalues = (x^T g_tile)[indices, row]``. FLOPs equal the
  dense layer's; only one tile of tens of MB exists at a time, never an
  ``(in, out)`` array. With a single tile (``out <= C``, e.g. one label chunk
  of ``sparsejax.xmc.chunked_loss``) the forward's tile is kept for the
  backward, so it is built once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import _checks
from sparsejax._rows import over_row_chunks
from sparsejax.kernels.vma import varying_like
from sparsejax.dispatch import resolve_fanin_impl
from sparsejax.kernels import fanin as _kernels
from sparsejax.kernels import fanin_tile as _tile_kernels

__all__ = ["fixed_fanin_matmul"]

def fixed_fanin_matmul(x: jax.Array, values: jax.Array, indices: jax.Array, *,
                       impl: str | None = None) -> jax.Array:
  """Multiplies ``x`` by a fixed fan-in sparse matrix.

  Arguments:
    x: input of shape ``(..., in)``, float32 or bfloat16.
    values: weights of shape ``(out, K)``.
    indices: integer array of shape ``(out, K)``; row ``u`` lists the ``K``
      input columns that output ``u`` reads. Any integer dtype (uint16/int16
      halve index traffic when ``in <= 65536``).

  Returns:
    ``(..., out)`` in ``jnp.result_type(x, values)``, accumulated in float32
    (float64 for float64 operands).

  Gradients flow to ``x`` and ``values`` through a custom VJP. Shapes and
  dtypes are always checked. Concrete ``indices`` and ``values`` also get the
  checks of ``FixedFanIn(...)``: an index out of range or a column repeated
  within a row, and a NaN or inf in ``values``, raise ``ValueError`` naming
  the row. Under ``jit`` traced operands are trusted, since JAX cannot raise
  on data there (use ``sparsejax.check_fixed_fanin`` with
  ``jax.experimental.checkify``): an out-of-range gather returns garbage, and
  a column repeated within a row counts twice on every path (its weights add).

  ``impl`` chooses the implementation (``sparsejax.dispatch``): the gather
  algorithm as ``"xla"`` (any backend), ``"pallas"`` (the kernels of
  ``sparsejax.kernels.fanin``, GPU) or ``"interpret"`` (those kernels in
  Pallas interpret mode, any backend, slow: for tests); the label-tile
  algorithm as ``"xla_tile"``, ``"pallas_tile"`` (``sparsejax.kernels.
  fanin_tile``, GPU) or ``"interpret_tile"``; or ``"auto"``/``None``, the
  fastest measured path for this backend and shape
  (``sparsejax.dispatch.fanin_choice``; the environment variable
  ``SPARSEJAX_KERNELS`` overrides it). On the tile paths the matmuls run in
  ``x``'s dtype: bfloat16 ``x`` means bfloat16 tensor-core inputs (values
  rounded to bfloat16), float32 accumulation.
  """
  _checks.check_fanin_operands(x, values, indices)
  (out, fan_in), in_features = jnp.shape(values), jnp.shape(x)[-1]
  impl = resolve_fanin_impl(impl, batch=int(np.prod(jnp.shape(x)[:-1])),
                            in_features=in_features, out=out, fan_in=fan_in)
  # Checked before asarray, which inside jit would stage a concrete numpy constant.
  _checks.check_topology(values, indices, in_features)
  x, values, indices = jnp.asarray(x), jnp.asarray(values), jnp.asarray(indices)
  # Inside shard_map the custom VJPs return each gradient typed as its operand,
  # so all three enter varying over the same mesh axes (a no-op elsewhere).
  x, values, indices = (varying_like(a, x, values, indices) for a in (x, values, indices))
  if impl == "xla":
    return _matmul(x, values, indices)
  x2 = x.reshape(-1, x.shape[-1])
  if impl == "xla_tile":
    y = _tile_matmul(x2, values, indices)
  else:
    y = _kernel_matmul(x2, values, indices, impl.endswith("_tile"),
                       impl.startswith("interpret"))
  return y.reshape(*x.shape[:-1], out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kernel_matmul(x, values, indices, tile, interpret):
  """The Pallas kernels: the fused tile ones (``tile``) or the gather ones."""
  if tile:
    return _tile_kernels.tile_forward(x, values, indices, interpret=interpret)
  return _kernels.fanin_forward(x, values, indices, interpret=interpret)


def _kernel_matmul_fwd(x, values, indices, tile, interpret):
  return _kernel_matmul(x, values, indices, tile, interpret), (x, values, indices)


def _kernel_matmul_bwd(tile, interpret, residuals, g):
  x, values, indices = residuals
  if tile:
    # The tile kernels' dots run in x's dtype: bf16 x means a bf16 g too (bf16 compute).
    dx, dvalues = _tile_kernels.tile_backward(x, g.astype(x.dtype), values, indices,
                                              interpret=interpret)
  else:
    dvalues = _kernels.fanin_dvalues(x, g, indices, values_dtype=values.dtype,
                                     interpret=interpret)
    dx = _kernels.fanin_dx(g, values, indices, in_features=x.shape[1], interpret=interpret)
  dindices = np.zeros(indices.shape, dtype=jax.dtypes.float0)
  return dx.astype(x.dtype), dvalues.astype(values.dtype), dindices


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


# Output rows are processed in chunks of about this many (row, batch) elements, so
# the working set is O(chunk) whatever the number of outputs, and a chunk's slab of
# the output gradient stays in cache across the K slots. 1 MiB of float32 was the
# fastest of 2^12..2^22 tried on CPU; BENCHMARKS.md has the step time before and
# after the change from 2^22 (benchmarks/fanin_memory.py).
_CHUNK_ELEMENTS = 1 << 18


def _row_chunk(out: int, batch: int) -> int:
  return max(1, min(out, _CHUNK_ELEMENTS // max(batch, 1)))


def _slot(array, k):
  """Column ``k`` of an (rows, K) array."""
  return lax.dynamic_index_in_dim(array, k, axis=1, keepdims=False)


def _rows(table, idx, dtype):
  """``table[idx]`` for trusted in-range ``idx`` (checked by the callers)."""
  return table.at[idx].get(mode="promise_in_bounds").astype(dtype)


def _acc_dtype(x, values):
  """float32 accumulation for bf16/f16/f32 operands, float64 for float64."""
  return jnp.promote_types(jnp.result_type(x, values), jnp.float32)


@jax.custom_vjp
def _matmul(x, values, indices):
  out, fan_in = values.shape
  xt = x.reshape(-1, x.shape[-1]).T  # (in, B): each gathered index reads a batch vector.
  batch, acc = xt.shape[1], _acc_dtype(x, values)

  def chunk_forward(start, size, y):
    idx = lax.dynamic_slice_in_dim(indices, start, size)
    w = lax.dynamic_slice_in_dim(values, start, size).astype(acc)

    def add_slot(k, total):
      return total + _rows(xt, _slot(idx, k), acc) * _slot(w, k)[:, None]

    total = varying_like(jnp.zeros((size, batch), acc), idx, w, xt)
    total = lax.fori_loop(0, fan_in, add_slot, total)
    return lax.dynamic_update_slice_in_dim(y, total.T.astype(y.dtype), start, axis=1)

  y = varying_like(jnp.zeros((batch, out), jnp.result_type(x, values)), x, values, indices)
  y = over_row_chunks(chunk_forward, out, _row_chunk(out, batch), y)
  return y.reshape(*x.shape[:-1], out)


def _matmul_fwd(x, values, indices):
  return _matmul(x, values, indices), (x, values, indices)


def _matmul_bwd(residuals, g):
  x, values, indices = residuals
  out, fan_in = values.shape
  xt = x.reshape(-1, x.shape[-1]).T
  g2 = g.reshape(-1, out)
  batch, acc = xt.shape[1], _acc_dtype(x, values)

  def chunk_grads(start, size, carry):
    dxt, dvalues = carry
    idx = lax.dynamic_slice_in_dim(indices, start, size)
    w = lax.dynamic_slice_in_dim(values, start, size).astype(acc)
    gt = lax.dynamic_slice_in_dim(g2, start, size, axis=1).T.astype(acc)

    def slot_grads(k, carry):
      dxt, dw = carry
      idx_k = _slot(idx, k)
      dw_k = jnp.sum(_rows(xt, idx_k, acc) * gt, axis=1)
      dw = lax.dynamic_update_index_in_dim(dw, dw_k, k, axis=1)
      dxt = dxt.at[idx_k].add(gt * _slot(w, k)[:, None], mode="promise_in_bounds")
      return dxt, dw

    dw = varying_like(jnp.zeros((size, fan_in), acc), dxt, idx, w, gt, xt)
    dxt, dw = lax.fori_loop(0, fan_in, slot_grads, (dxt, dw))
    dvalues = lax.dynamic_update_slice_in_dim(dvalues, dw.astype(dvalues.dtype), start, axis=0)
    return dxt, dvalues

  carry = varying_like((jnp.zeros(xt.shape, acc), jnp.zeros(values.shape, values.dtype)),
                       x, values, indices, g)
  dxt, dvalues = over_row_chunks(chunk_grads, out, _row_chunk(out, batch), carry)
  dx = dxt.T.astype(x.dtype).reshape(x.shape)
  dindices = np.zeros(indices.shape, dtype=jax.dtypes.float0)
  return dx, dvalues, dindices


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# -- the label-tile path ---------------------------------------------------------------

# A tile holds at most this many (in, C) elements: 128 MiB in bfloat16, so that one
# label chunk of 65,536 rows at in = 768 (the GPU default of the XMC trainer) is one
# tile, built once. On an H200, 2^26 was faster than 2^24 at every size measured
# (benchmarks/tile_variants.py, BENCHMARKS.md).
_TILE_ELEMENTS = 1 << 26
# Rows per tile are a multiple of this when there are several tiles: XLA pads a matmul
# dimension that is not a multiple of the GPU's tile shapes, a copy of each operand
# per tile (seen in the H200 profile at C = 21,845).
_TILE_ROW_MULTIPLE = 256


def tile_rows(in_features: int, out: int) -> int:
  """Rows ``C`` per tile of the tile path: all ``out`` if they fit, else a multiple of 256."""
  rows = _TILE_ELEMENTS // max(in_features, 1)
  if rows >= out:
    return out
  return max(1, rows // _TILE_ROW_MULTIPLE * _TILE_ROW_MULTIPLE or rows)


def build_tile(values: jax.Array, indices: jax.Array, in_features: int, dtype) -> jax.Array:
  """The dense ``(in, C)`` tile of ``C`` rows: ``tile[indices[u, k], u] += values[u, k]``.

  A scatter-add, so a column repeated within a row sums its weights, as the
  gather path does.
  """
  rows = lax.broadcasted_iota(jnp.int32, indices.shape, 0)
  tile = varying_like(jnp.zeros((in_features, values.shape[0]), dtype), values, indices)
  return tile.at[indices.astype(jnp.int32), rows].add(values.astype(dtype),
                                                      mode="promise_in_bounds")


def _gather_tile(dense, indices):
  """``dense[indices[u, k], u]``: the ``(C, K)`` entries of a dense ``(in, C)`` gradient."""
  rows = lax.broadcasted_iota(jnp.int32, indices.shape, 0)
  return dense.at[indices.astype(jnp.int32), rows].get(mode="promise_in_bounds")


def _tile_dtypes(x, values):
  """(matmul input dtype, accumulation dtype, output dtype) of the tile path."""
  acc = _acc_dtype(x, values)
  return x.dtype, acc, jnp.result_type(x, values)


def _tile_forward(x, values, indices):
  """``(y, tile)``: ``tile`` is the built tile when there is one tile, else None."""
  in_features, (out, _) = x.shape[1], values.shape
  compute, acc, result = _tile_dtypes(x, values)
  rows = tile_rows(in_features, out)

  def tile_logits(idx, w):
    tile = build_tile(w, idx, in_features, compute)
    return jnp.dot(x, tile, preferred_element_type=acc).astype(result), tile

  if rows == out:
    return tile_logits(indices, values)

  def body(start, size, y):
    idx = lax.dynamic_slice_in_dim(indices, start, size)
    w = lax.dynamic_slice_in_dim(values, start, size)
    return lax.dynamic_update_slice_in_dim(y, tile_logits(idx, w)[0], start, axis=1)

  y = varying_like(jnp.zeros((x.shape[0], out), result), x, values, indices)
  return over_row_chunks(body, out, rows, y), None


@jax.custom_vjp
def _tile_matmul(x, values, indices):
  return _tile_forward(x, values, indices)[0]


def _tile_matmul_fwd(x, values, indices):
  y, tile = _tile_forward(x, values, indices)
  return y, (x, values, indices, tile)


def _tile_grads(x, g, tile, idx, values_dtype, acc):
  """``(dx, dvalues)`` of one tile from its output gradient ``g`` (B, C)."""
  g = g.astype(tile.dtype)  # the matmuls' input dtype (bf16 compute keeps bf16 here)
  dx = jnp.dot(g, tile.T, preferred_element_type=acc)
  dense = jnp.dot(x.T, g, preferred_element_type=acc)  # (in, C): the tile's dense gradient
  return dx, _gather_tile(dense, idx).astype(values_dtype)


def _tile_matmul_bwd(residuals, g):
  x, values, indices, tile = residuals
  in_features, (out, fan_in) = x.shape[1], values.shape
  compute, acc, _ = _tile_dtypes(x, values)
  dindices = np.zeros(indices.shape, dtype=jax.dtypes.float0)
  if tile is not None:  # one tile, kept from the forward
    dx, dvalues = _tile_grads(x, g, tile, indices, values.dtype, acc)
    return dx.astype(x.dtype), dvalues, dindices

  def body(start, size, carry):
    dx, dvalues = carry
    idx = lax.dynamic_slice_in_dim(indices, start, size)
    w = lax.dynamic_slice_in_dim(values, start, size)
    g_tile = lax.dynamic_slice_in_dim(g, start, size, axis=1)
    dx_tile, dw = _tile_grads(x, g_tile, build_tile(w, idx, in_features, compute), idx,
                              values.dtype, acc)
    return dx + dx_tile, lax.dynamic_update_slice_in_dim(dvalues, dw, start, axis=0)

  carry = varying_like((jnp.zeros(x.shape, acc), jnp.zeros((out, fan_in), values.dtype)),
                       x, values, indices, g)
  dx, dvalues = over_row_chunks(body, out, tile_rows(in_features, out), carry)
  return dx.astype(x.dtype), dvalues, dindices


_tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)
