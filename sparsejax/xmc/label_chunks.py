"""Losses and top-k over all L labels without the (batch, L) logits.

An XMC classifier scores every one of L labels (millions), so its (batch, L)
logits, and their gradient, would be the largest arrays of a training step.
Here the labels are processed in chunks: the classifier is a pytree whose every
leaf has the label axis first, and ``lax.scan`` over the chunks slices each
leaf (``dynamic_slice``, no copy of the classifier) and computes that chunk's
logits. The loss body is rematerialised (``jax.checkpoint``), so the backward
pass recomputes each chunk's logits instead of keeping all of them: working
memory is O(batch * chunk) besides the gradient itself, never O(batch * L),
and no classifier-sized temporary either.

Both classifiers share this code path through a ``logits_fn(params_chunk, h)
-> (B, chunk)``:

- fixed fan-in: ``{"values": (L, K), "indices": (L, K), "bias": (L,)}`` (bias
  optional) or a ``sparsejax.FixedFanIn``, scored by ``fixed_fanin_logits``;
- dense baseline: ``{"kernel_t": (L, d), "bias": (L,)}`` (bias optional; the
  transposed kernel, so that labels are the leading axis), scored by
  ``dense_logits``.

When L is not a multiple of the chunk, the last chunk is moved back to end at
label L and overlaps the one before; the labels they share count once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import _checks
from sparsejax._vma import varying_like
from sparsejax.fanin_matmul import fixed_fanin_matmul
from sparsejax.fixed_fanin import FixedFanIn

__all__ = ["LOSSES", "chunked_loss", "chunked_topk", "compiled_memory", "dense_logits",
           "fixed_fanin_logits"]

LOSSES = ("squared_hinge", "bce")


def fixed_fanin_logits(params, h: jax.Array) -> jax.Array:
  """Logits of a fixed fan-in classifier (or a chunk of its labels).

  Arguments:
    params: a ``FixedFanIn``, or a mapping with ``"values"`` (C, K) float,
      ``"indices"`` (C, K) int and optionally ``"bias"`` (C,).
    h: ``(B, d)`` features.

  Returns:
    ``(B, C)`` logits ``h @ W + bias`` (see ``sparsejax.fixed_fanin_matmul``).
  """
  if isinstance(params, FixedFanIn):
    values, indices, bias = params.values, params.indices, params.bias
  elif isinstance(params, Mapping) and {"values", "indices"} <= set(params):
    values, indices, bias = params["values"], params["indices"], params.get("bias")
  else:
    raise ValueError("a fixed fan-in classifier must be a FixedFanIn or a mapping with "
                     f"'values' and 'indices' (and optionally 'bias'), got {type(params)}")
  y = fixed_fanin_matmul(h, values, indices)
  return y if bias is None else y + bias.astype(y.dtype)


def dense_logits(params, h: jax.Array) -> jax.Array:
  """Logits of a dense classifier (or a chunk of its labels).

  Arguments:
    params: a mapping with ``"kernel_t"`` (C, d), the transposed kernel, and
      optionally ``"bias"`` (C,).
    h: ``(B, d)`` features.

  Returns:
    ``(B, C)`` logits ``h @ kernel_t.T + bias``.
  """
  if not (isinstance(params, Mapping) and "kernel_t" in params):
    raise ValueError("a dense classifier must be a mapping with 'kernel_t' (L, d) "
                     f"(and optionally 'bias'), got {type(params)}")
  kernel_t, bias = params["kernel_t"], params.get("bias")
  if jnp.ndim(kernel_t) != 2 or jnp.shape(h)[-1] != jnp.shape(kernel_t)[1]:
    raise ValueError(f"kernel_t must have shape (L, {jnp.shape(h)[-1]}) for h of shape "
                     f"{jnp.shape(h)}, got {jnp.shape(kernel_t)}")
  y = h @ kernel_t.T
  return y if bias is None else y + bias.astype(y.dtype)


def chunked_loss(logits_fn: Callable, classifier, h: jax.Array, label_ids: jax.Array,
                 label_mask: jax.Array, *, loss: str = "squared_hinge",
                 chunk_size: int) -> jax.Array:
  """A multi-label loss summed over all L labels, averaged over the batch.

  Per label, with target ``y = 1`` for the point's labels and 0 otherwise:

  - ``"squared_hinge"``: ``max(0, 1 - s z)^2`` with ``s = 2 y - 1``;
  - ``"bce"``: sigmoid cross-entropy ``softplus(z) - y z`` (stable for any z).

  Equal to the same loss on the full ``(B, L)`` logits, but computed one chunk
  of labels at a time under ``jax.checkpoint``: neither the forward nor the
  backward pass holds more than one chunk's logits. Differentiable with
  respect to the float leaves of ``classifier`` and to ``h``. Integer leaves
  (the indices) pass through: differentiate a function of the float leaves
  only (e.g. ``lambda p: chunked_loss(fn, {**p, "indices": idx}, ...)``) or
  use ``jax.grad(..., allow_int=True)``.

  Arguments:
    logits_fn: ``(params_chunk, h) -> (B, chunk)``, e.g. ``fixed_fanin_logits``
      or ``dense_logits``. Static: pass the same function object to avoid
      recompiling.
    classifier: a pytree whose leaves all have the label axis first, ``(L, ...)``.
    h: ``(B, d)`` float features.
    label_ids: ``(B, Lmax)`` integer label ids of each point, padded.
    label_mask: ``(B, Lmax)`` bool, True where ``label_ids`` holds a label.
      Repeated ids count once.
    loss: ``"squared_hinge"`` or ``"bce"``.
    chunk_size: the most labels scored at once, ``>= 1``. The chunk used is
      ``ceil(L / n)`` for ``n = ceil(L / chunk_size)`` chunks, so that the last
      two chunks overlap by fewer than ``n`` labels.

  Returns:
    A scalar, float32 (float64 for float64 logits).
  """
  num_labels = _check_classifier(classifier)
  size = _chunk(num_labels, chunk_size)
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  _check_features(h)
  _check_labels(label_ids, label_mask, jnp.shape(h)[0], num_labels)
  return _chunked_loss(logits_fn, classifier, h, label_ids, label_mask, loss=loss,
                       chunk_size=size)


def chunked_topk(logits_fn: Callable, classifier, h: jax.Array, *, k: int,
                 chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """The ``k`` best labels of each point, streamed over chunks of labels.

  Each chunk's logits go through ``lax.top_k`` and are merged into the running
  top ``k``, so only one chunk's logits exist at a time. The result is exactly
  ``lax.top_k`` of the ``(B, L)`` logits that ``logits_fn`` gives chunk by
  chunk: scores in descending order of the floating-point total order that
  ``lax.top_k`` uses (NaN above +inf, +0 above -0), equal scores by ascending
  label id. (A label's logit from a chunk can differ from the one-call logit
  in the last bit where the backend's matmul rounds differently by shape.)

  Arguments:
    logits_fn: ``(params_chunk, h) -> (B, chunk)`` (see ``chunked_loss``).
    classifier: a pytree whose leaves all have the label axis first, ``(L, ...)``.
    h: ``(B, d)`` float features.
    k: how many labels, ``1 <= k <= L``.
    chunk_size: the most labels scored at once, ``>= 1`` (see ``chunked_loss``).

  Returns:
    ``(scores, ids)``: ``(B, k)`` logits and ``(B, k)`` int32 label ids, best first.
  """
  num_labels = _check_classifier(classifier)
  size = _chunk(num_labels, chunk_size)
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_labels:
    raise ValueError(f"k must be an integer in [1, L={num_labels}], got {k!r}")
  _check_features(h)
  return _chunked_topk(logits_fn, classifier, h, k=int(k), chunk_size=size)


def compiled_memory(fn: Callable, *args) -> dict[str, int]:
  """Memory that XLA plans for ``jax.jit(fn)(*args)``, from compiling it only.

  Nothing runs: ``args`` may be arrays or ``jax.ShapeDtypeStruct``s. Static
  arguments go in through ``functools.partial``.

  Arguments:
    fn: the function to compile.
    *args: its arguments (arrays or shape/dtype structs).

  Returns:
    ``{"temp_bytes", "argument_bytes", "output_bytes", "alias_bytes",
    "total_bytes"}``, where ``temp_bytes`` is the scratch memory of the
    executable (intermediates) and ``total_bytes = argument + output + temp -
    alias`` (outputs that reuse argument buffers are counted once).
  """
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  if stats is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
  out = {"temp_bytes": int(stats.temp_size_in_bytes),
         "argument_bytes": int(stats.argument_size_in_bytes),
         "output_bytes": int(stats.output_size_in_bytes),
         "alias_bytes": int(stats.alias_size_in_bytes)}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out


def _check_classifier(classifier) -> int:
  """The number of labels L: the common leading axis of every leaf."""
  leaves = jax.tree.leaves(classifier)
  if not leaves:
    raise ValueError("classifier has no array leaves")
  shapes = [jnp.shape(leaf) for leaf in leaves]
  if any(len(shape) == 0 for shape in shapes) or len({shape[0] for shape in shapes}) != 1:
    raise ValueError("every leaf of classifier must have the same leading (label) axis, "
                     f"got shapes {shapes}")
  if shapes[0][0] < 1:
    raise ValueError("classifier has no labels (leading axis of size 0)")
  return shapes[0][0]


def _chunk(num_labels: int, chunk_size) -> int:
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
  n_chunks = -(-num_labels // int(chunk_size))
  return -(-num_labels // n_chunks)


def _check_features(h) -> None:
  _checks.check_float(h, "h")
  if jnp.ndim(h) != 2:
    raise ValueError(f"h must have shape (B, d), got {jnp.shape(h)}")


def _check_labels(label_ids, label_mask, batch: int, num_labels: int) -> None:
  _checks.check_int(label_ids, "label_ids")
  if jnp.ndim(label_ids) != 2 or jnp.shape(label_ids)[0] != batch:
    raise ValueError(f"label_ids must have shape ({batch}, Lmax) to match h, "
                     f"got {jnp.shape(label_ids)}")
  if _checks.dtype_of(label_mask) != jnp.bool_ or jnp.shape(label_mask) != jnp.shape(label_ids):
    raise ValueError(f"label_mask must be a bool array of shape {jnp.shape(label_ids)}, got "
                     f"{_checks.dtype_of(label_mask)} {jnp.shape(label_mask)}")
  if _checks.is_traced(label_ids) or _checks.is_traced(label_mask):
    return  # Under jit, as for indices, label ids are trusted (out-of-range ones are dropped).
  ids, mask = np.asarray(label_ids), np.asarray(label_mask)
  bad = mask & ((ids < 0) | (ids >= num_labels))
  if np.any(bad):
    row, col = np.argwhere(bad)[0]
    raise ValueError(f"label_ids[{row}, {col}] = {ids[row, col]} is out of range for "
                     f"L={num_labels} labels")


def _chunk_at(classifier, index, size: int, num_labels: int):
  """Chunk ``index`` of the labels: its leaves, its label ids, and which ids are new.

  Chunk ``i`` covers labels ``[i * size, (i + 1) * size)``. The last chunk is
  moved back to end at label L, so every slice is in bounds without padding
  (a copy of) the classifier; the labels it shares with the chunk before are
  marked stale, to be left out.
  """
  nominal = index * size
  start = jnp.minimum(nominal, num_labels - size)
  params = jax.tree.map(lambda leaf: lax.dynamic_slice_in_dim(leaf, start, size), classifier)
  ids = start + jnp.arange(size, dtype=jnp.int32)
  return params, start, ids, ids >= nominal


def _chunk_logits(logits_fn, params, h, size: int):
  z = logits_fn(params, h)
  if jnp.shape(z) != (h.shape[0], size):
    raise ValueError(f"logits_fn must return (B, chunk) = {(h.shape[0], size)} logits, "
                     f"got {jnp.shape(z)}")
  return z


def _chunk_targets(label_ids, label_mask, start, size: int) -> jax.Array:
  """``(B, size)`` bool multi-hot targets of labels ``[start, start + size)``."""
  local = label_ids.astype(jnp.int32) - start
  inside = label_mask & (local >= 0) & (local < size)
  rows = jnp.arange(label_ids.shape[0])[:, None]
  # Labels outside the chunk go to column ``size``, which the scatter drops.
  return jnp.zeros((label_ids.shape[0], size), bool).at[
      rows, jnp.where(inside, local, size)].set(True, mode="drop")


def _loss_terms(z, y, loss: str):
  if loss == "squared_hinge":
    return jnp.square(jnp.maximum(0, 1 - jnp.where(y, z, -z)))
  return jax.nn.softplus(z) - jnp.where(y, z, 0)


@functools.partial(jax.jit, static_argnames=("logits_fn", "loss", "chunk_size", "num_valid"))
def _chunked_loss(logits_fn, classifier, h, label_ids, label_mask, label_offset=0, *, loss,
                  chunk_size, num_valid=None):
  """``chunked_loss`` (not averaged over devices) of a slice of the labels.

  ``classifier`` holds labels ``label_offset + [0, L)`` (the offset may be
  traced: a shard's first row); with ``num_valid`` given, labels from
  ``num_valid`` on (padding) are left out.
  """
  num_labels = jax.tree.leaves(classifier)[0].shape[0]

  # Rematerialised: the backward pass recomputes this chunk's logits from its
  # inputs, so the scan saves no (B, chunk) residual per chunk. The gradient of
  # each slice lands in place in the classifier-sized gradient (XLA rewrites
  # the accumulated zero-padded slice into an in-place update).
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_loss(classifier, index, h, label_ids, label_mask, label_offset):
    params, start, ids, fresh = _chunk_at(classifier, index, chunk_size, num_labels)
    z = _chunk_logits(logits_fn, params, h, chunk_size)
    z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    y = _chunk_targets(label_ids, label_mask, label_offset + start, chunk_size)
    return jnp.sum(jnp.where(_counted(fresh, ids, label_offset, num_valid),
                             _loss_terms(z, y, loss), 0))

  def body(total, index):
    return total + chunk_loss(classifier, index, h, label_ids, label_mask, label_offset), None

  dtype = jnp.promote_types(jnp.result_type(h), jnp.float32)
  n_chunks = -(-num_labels // chunk_size)
  total = varying_like(jnp.zeros((), dtype), classifier, h, label_ids, label_mask, label_offset)
  total, _ = lax.scan(body, total, jnp.arange(n_chunks, dtype=jnp.int32))
  return total / h.shape[0]


def _counted(fresh, ids, label_offset, num_valid):
  """The chunk's labels that count: new ones, and below ``num_valid`` (if given)."""
  return fresh if num_valid is None else fresh & (label_offset + ids < num_valid)


def _total_order_key(x):
  """Integers ordered as the floats ``x`` in the IEEE total order (``lax.top_k``'s)."""
  int_dtype = jnp.dtype(f"int{8 * x.dtype.itemsize}")
  bits = lax.bitcast_convert_type(x, int_dtype)
  # Negative floats order backwards by their bits: flip all but the sign bit.
  return bits ^ ((bits >> (8 * x.dtype.itemsize - 1)) & jnp.iinfo(int_dtype).max)


def _merge_topk(scores, ids, k: int):
  """The best ``k`` of ``(B, n)`` candidates: by score (total order), then lower id."""
  _, neg_ids, scores = lax.sort((_total_order_key(scores), -ids, scores), dimension=1,
                                num_keys=2)
  return scores[:, ::-1][:, :k], -neg_ids[:, ::-1][:, :k]


@functools.partial(jax.jit, static_argnames=("logits_fn", "k", "chunk_size", "num_valid"))
def _chunked_topk(logits_fn, classifier, h, label_offset=0, *, k, chunk_size, num_valid=None):
  """``chunked_topk`` of a slice of the labels, with global ids (see ``_chunked_loss``).

  With fewer than ``k`` labels that count, the rest of the ``k`` are
  sentinels: the lowest score and id ``int32`` max, which lose every merge.
  """
  num_labels = jax.tree.leaves(classifier)[0].shape[0]
  first = jax.tree.map(lambda leaf: leaf[:chunk_size], classifier)
  dtype = jax.eval_shape(functools.partial(_chunk_logits, logits_fn, size=chunk_size),
                         first, h).dtype
  # The lowest value of the total order (a negative NaN), for stale labels and
  # the initial running top-k, whose ids (out of range) lose every tie.
  lowest = lax.bitcast_convert_type(jnp.array(-1, f"int{8 * jnp.dtype(dtype).itemsize}"), dtype)
  sentinel = jnp.iinfo(jnp.int32).max

  def body(best, index):
    params, _, ids, fresh = _chunk_at(classifier, index, chunk_size, num_labels)
    counted = _counted(fresh, ids, label_offset, num_valid)
    z = jnp.where(counted, _chunk_logits(logits_fn, params, h, chunk_size), lowest)
    scores, local = lax.top_k(z, min(k, chunk_size))
    candidates = (jnp.concatenate([best[0], scores], axis=1),
                  jnp.concatenate([best[1], jnp.where(counted, label_offset + ids,
                                                      sentinel)[local]], axis=1))
    return _merge_topk(*candidates, k), None

  batch, n_chunks = h.shape[0], -(-num_labels // chunk_size)
  init = varying_like((jnp.full((batch, k), lowest, dtype),
                       jnp.full((batch, k), sentinel, jnp.int32)), classifier, h, label_offset)
  (scores, ids), _ = lax.scan(body, init, jnp.arange(n_chunks, dtype=jnp.int32))
  return scores, ids
