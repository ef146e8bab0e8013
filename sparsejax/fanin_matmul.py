"""The fixed fan-in sparse matmul ``y = x @ W`` with ``W`` stored as (values, indices).

Row ``u`` of the layer reads ``K`` input columns ``indices[u]`` with weights
``values[u]``:

    y[b, u] = sum_k x[b, indices[u, k]] * values[u, k]

Memory and work scale with ``out * K``, never with ``out * in``. The pure-XLA
path here works on ``x^T`` (in, B) so that every gathered index reads one
contiguous batch vector, and loops over the ``K`` slots so that the largest
intermediate is one (out, B) slab, never (B, out, K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import _checks
from sparsejax._vma import varying_like
from sparsejax.dispatch import resolve_impl
from sparsejax.kernels import fanin as _kernels

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

  Gradients flow to ``x`` and ``values`` through a custom VJP: ``dvalues`` by a
  gather-multiply-reduce over the batch, ``dx`` by a scatter-add over the
  indices. Shapes are always checked. When ``indices`` is a concrete array its
  range is checked too; under ``jit`` indices are trusted, since an
  out-of-range gather is not detectable there (use
  ``sparsejax.check_fixed_fanin`` with ``jax.experimental.checkify``).

  ``impl`` chooses the implementation: ``"xla"`` (this module, any backend),
  ``"pallas"`` (the kernels of ``sparsejax.kernels.fanin``, GPU),
  ``"interpret"`` (the same kernels in Pallas interpret mode, any backend,
  slow: for tests), or ``"auto"``/``None`` (see ``resolve_impl``; the
  environment variable ``SPARSEJAX_KERNELS`` overrides the default).
  """
  _checks.check_fanin_operands(x, values, indices)
  # Checked before asarray, which inside jit would stage a concrete numpy constant.
  _checks.check_index_range(indices, jnp.shape(x)[-1], "indices")
  x, values, indices = jnp.asarray(x), jnp.asarray(values), jnp.asarray(indices)
  # Inside shard_map the custom VJPs return each gradient typed as its operand,
  # so all three enter varying over the same mesh axes (a no-op elsewhere).
  x, values, indices = (varying_like(a, x, values, indices) for a in (x, values, indices))
  impl = resolve_impl(impl)
  if impl == "xla":
    return _matmul(x, values, indices)
  y = _kernel_matmul(x.reshape(-1, x.shape[-1]), values, indices, impl == "interpret")
  return y.reshape(*x.shape[:-1], values.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_matmul(x, values, indices, interpret):
  return _kernels.fanin_forward(x, values, indices, interpret=interpret)


def _kernel_matmul_fwd(x, values, indices, interpret):
  return _kernel_matmul(x, values, indices, interpret), (x, values, indices)


def _kernel_matmul_bwd(interpret, residuals, g):
  x, values, indices = residuals
  dvalues = _kernels.fanin_dvalues(x, g, indices, values_dtype=values.dtype, interpret=interpret)
  dx = _kernels.fanin_dx(g, values, indices, in_features=x.shape[1], interpret=interpret)
  dindices = np.zeros(indices.shape, dtype=jax.dtypes.float0)
  return dx.astype(x.dtype), dvalues, dindices


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


# Output rows are processed in chunks of about this many (row, batch) elements, so
# the working set is O(chunk) whatever the number of outputs, and a chunk's slab of
# the output gradient stays in cache across the K slots. 1 MiB of float32 was the
# fastest of 2^12..2^22 tried on CPU; BENCHMARKS.md has the step time before and
# after the change from 2^22 (benchmarks/fanin_memory.py).
_CHUNK_ELEMENTS = 1 << 18


def _row_chunk(out: int, batch: int) -> int:
  return max(1, min(out, _CHUNK_ELEMENTS // max(batch, 1)))


def _over_row_chunks(body, out: int, chunk: int, carry):
  """Runs ``carry = body(start, size, carry)`` over rows [0, out) in chunks.

  Full chunks go through one ``fori_loop`` (compiled once); a ragged tail gets
  its own static-size call.
  """
  full, tail = divmod(out, chunk)
  carry = lax.fori_loop(0, full, lambda c, carry: body(c * chunk, chunk, carry), carry)
  return body(full * chunk, tail, carry) if tail else carry


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
  y = _over_row_chunks(chunk_forward, out, _row_chunk(out, batch), y)
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
  dxt, dvalues = _over_row_chunks(chunk_grads, out, _row_chunk(out, batch), carry)
  dx = dxt.T.astype(x.dtype).reshape(x.shape)
  dindices = np.zeros(indices.shape, dtype=jax.dtypes.float0)
  return dx, dvalues, dindices


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
