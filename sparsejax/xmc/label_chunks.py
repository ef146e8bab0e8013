"""Losses and top-k over all L labels without the (batch, L) logits.

An XMC classifier scores every one of L labels (millions), so its (batch, L)
logits, and their gradient, would be the largest arrays of a training step.
Here the labels are processed in chunks: the classifier is a pytree whose every
leaf has the label axis first, and ``lax.scan`` over the chunks slices each
leaf (``dynamic_slice``, no copy of the classifier) and computes that chunk's
logits.

The loss is a ``jax.custom_vjp`` whose forward pass is already the gradient
pass: per chunk it computes the logits once, then the chunk's loss and, by
``jax.vjp``, its gradients w.r.t. the chunk's float leaves (added in place into
a classifier-shaped gradient) and w.r.t. ``h`` (summed over the chunks). The
backward pass only scales the two by the loss's cotangent. So no logits are
recomputed (a fixed fan-in tile built for a chunk's forward matmul serves its
backward matmuls too), and working memory is O(batch * chunk) besides the
gradient itself, never O(batch * L). Undifferentiated, only the loss runs.
Reverse mode only: ``jax.jvp`` of the loss is not defined.

Both classifiers share this code path through a ``logits_fn(params_chunk, h)
-> (B, chunk)``: ``fixed_fanin_logits`` or ``dense_logits`` of the label-major
classifier pytrees that ``sparsejax.xmc.classifier`` defines.

For RigL on a fixed fan-in classifier, ``chunked_loss_and_candidates`` also
keeps, per label, the best columns to regrow: each chunk's dense gradient
``h^T g`` (in, chunk) exists for one chunk only, never the (in, L) one.

When L is not a multiple of the chunk, the last chunk is moved back to end at
label L and overlaps the one before; the labels they share count once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from sparsejax import _checks
from sparsejax.kernels.vma import varying_like
from sparsejax.fanin_matmul import fixed_fanin_matmul
from sparsejax.fixed_fanin import FixedFanIn
from sparsejax.topology import RegrowthCandidates
from sparsejax.xmc.classifier import _fixed_fanin_parts

__all__ = ["LOSSES", "check_label_ids", "chunked_loss", "chunked_loss_and_candidates",
           "chunked_topk"]

LOSSES = ("squared_hinge", "bce")


def chunked_loss(logits_fn: Callable, classifier, h: jax.Array, label_ids: jax.Array,
                 label_mask: jax.Array, *, loss: str = "squared_hinge",
                 chunk_size: int) -> jax.Array:
  """A multi-label loss summed over all L labels, averaged over the batch.

  Per label, with target ``y = 1`` for the point's labels and 0 otherwise:

  - ``"squared_hinge"``: ``max(0, 1 - s z)^2`` with ``s = 2 y - 1``;
  - ``"bce"``: sigmoid cross-entropy ``softplus(z) - y z`` (stable for any z).

  Equal to the same loss on the full ``(B, L)`` logits, but computed one chunk
  of labels at a time: no pass holds more than one chunk's logits. Under
  reverse-mode differentiation (``jax.grad``, ``jax.vjp``) each chunk's logits
  are computed once, together with the chunk's gradients (see the module
  docstring). Differentiable with respect to the float leaves of
  ``classifier`` and to ``h``. Integer leaves (the indices) pass through:
  differentiate a function of the float leaves only (e.g. ``lambda p:
  chunked_loss(fn, {**p, "indices": idx}, ...)``) or use ``jax.grad(...,
  allow_int=True)``.

  Arguments:
    logits_fn: ``(params_chunk, h) -> (B, chunk)``, e.g. ``fixed_fanin_logits``
      or ``dense_logits``. Static: pass the same function object to avoid
      recompiling.
    classifier: a pytree whose leaves all have the label axis first, ``(L, ...)``.
    h: ``(B, d)`` float features.
    label_ids: ``(B, Lmax)`` integer label ids of each point, padded. Where
      ``label_mask`` holds, each must be in ``[0, L)``: checked on concrete
      arrays (``ValueError``), trusted when traced (``check_label_ids``).
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


def chunked_loss_and_candidates(classifier, h: jax.Array, label_ids: jax.Array,
                                label_mask: jax.Array, *, loss: str = "squared_hinge",
                                chunk_size: int,
                                num_candidates: int) -> tuple[jax.Array, RegrowthCandidates]:
  """``chunked_loss`` of a fixed fan-in classifier, and each row's RigL regrowth candidates.

  RigL regrows a row's pruned slots with the columns of largest ``|dense
  gradient|``, ``|h^T g|`` for ``g = d loss / d logits``, among those the row
  does not keep (``sparsejax.rigl_regrowth_columns``). Here each chunk of
  labels forms its own dense gradient ``G = h^T g`` of shape (in, chunk) in
  float32, takes ``dvalues = G[indices, row]`` from it and, per row, the
  ``num_candidates`` largest ``|G|`` among the columns not in the row's
  indices. Neither the ``(B, L)`` logits nor the ``(in, L)`` dense gradient
  ever exist.

  The loss and its gradients equal ``chunked_loss(fixed_fanin_logits, ...)``'s
  (to float rounding; the candidates take no cotangent). Merging each row's
  candidates with its pruned slots, scored by ``|dvalues|`` there, and giving
  the j-th pruned slot the j-th best of the union is exactly RigL's regrowth
  when ``num_candidates`` is at least the number of slots the row prunes.

  Arguments:
    classifier: a ``FixedFanIn``, or a mapping with ``"values"`` (L, K) float,
      ``"indices"`` (L, K) int and optionally ``"bias"`` (L,).
    h: ``(B, in)`` float features.
    label_ids, label_mask, loss: as in ``chunked_loss``.
    chunk_size: the most labels scored at once (see ``chunked_loss``).
    num_candidates: ``R``, candidates per row, ``1 <= R <= in``.

  Returns:
    ``(loss, candidates)``: ``chunked_loss``'s scalar and a
    ``sparsejax.RegrowthCandidates`` of ``(L, R)`` columns and scores. The
    scores are ``|d loss / d W|`` of the returned loss: a caller that weights
    the loss by ``c`` before differentiating compares them with its ``values``
    gradient only after scaling them by ``c`` too.
  """
  values, indices, bias, _ = _check_fixed_fanin_classifier(classifier, h, num_candidates)
  size = _chunk(values.shape[0], chunk_size)
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  _check_labels(label_ids, label_mask, jnp.shape(h)[0], values.shape[0])
  return _chunked_loss_and_candidates(values, indices, bias, h, label_ids, label_mask,
                                      loss=loss, chunk_size=size,
                                      num_candidates=int(num_candidates))


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


def _check_fixed_fanin_classifier(classifier, h, num_candidates):
  """``(values, indices, bias or None, parts)`` of a fixed fan-in classifier, checked.

  ``parts`` is the mapping ``{"values", "indices"[, "bias"]}``.
  """
  values, indices, bias = _fixed_fanin_parts(classifier)
  parts = {"values": values, "indices": indices} | ({} if bias is None else {"bias": bias})
  _check_classifier(parts)
  _checks.check_values_indices(values, indices)
  _check_features(h)
  in_features = jnp.shape(h)[1]
  if isinstance(classifier, FixedFanIn) and classifier.in_features != in_features:
    raise ValueError(f"h has {in_features} features, the layer reads {classifier.in_features}")
  if not isinstance(num_candidates, (int, np.integer)) or not 1 <= num_candidates <= in_features:
    raise ValueError(f"num_candidates must be an integer in [1, in={in_features}], got "
                     f"{num_candidates!r}")
  return values, indices, bias, parts


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
  # Under jit, as for indices, label ids are trusted (out-of-range ones are dropped).
  _checks.check_index_range(label_ids, num_labels, "label_ids", size_name="L", mask=label_mask)


def check_label_ids(label_ids: jax.Array, label_mask: jax.Array, num_labels: int) -> None:
  """Adds a ``checkify`` check that every label id where ``label_mask`` holds is in ``[0, L)``.

  The check the chunked losses run on concrete label ids, for traced ones:
  under ``jit`` an out-of-range id is silently dropped from the targets.
  Masked-out padding may hold any id. Wrap the function that calls this
  with ``jax.experimental.checkify.checkify`` and call ``err.throw()``::

    def loss(params, batch):
      check_label_ids(batch["label_ids"], batch["label_mask"], num_labels)
      return chunked_loss(...)

    err, value = checkify.checkify(jax.jit(loss))(params, batch)
    err.throw()  # raises JaxRuntimeError naming the first bad id

  Arguments:
    label_ids: ``(B, Lmax)`` integer label ids, padded.
    label_mask: ``(B, Lmax)`` bool, True where ``label_ids`` holds a label.
    num_labels: ``L``.
  """
  bad = jnp.asarray(label_mask) & ~_checks.in_range(jnp.asarray(label_ids), num_labels)
  row, col = jnp.unravel_index(jnp.argmax(bad), bad.shape)
  checkify.check(~jnp.any(bad),
                 f"label_ids[{{row}}, {{col}}] = {{label}} is out of range for L={num_labels}",
                 row=row, col=col, label=jnp.asarray(label_ids)[row, col])


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
  leaves, treedef = jax.tree.flatten(classifier)
  is_float = tuple(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves)
  spec = _Spec(loss, chunk_size, num_valid, logits_fn=logits_fn, treedef=treedef,
               is_float=is_float)
  floats = tuple(leaf for leaf, float_leaf in zip(leaves, is_float) if float_leaf)
  ints = tuple(leaf for leaf, float_leaf in zip(leaves, is_float) if not float_leaf)
  return _fused(spec, floats, ints, h, label_ids, label_mask, jnp.asarray(label_offset, jnp.int32))


@functools.partial(jax.jit, static_argnames=("loss", "chunk_size", "num_candidates",
                                             "num_valid", "data_axis"))
def _chunked_loss_and_candidates(values, indices, bias, h, label_ids, label_mask, label_offset=0,
                                 *, loss, chunk_size, num_candidates, num_valid=None,
                                 data_axis=None):
  """``chunked_loss_and_candidates`` of a slice of the labels (see ``_chunked_loss``).

  With ``data_axis`` (inside ``shard_map``, the batch split over it), each
  chunk's dense gradient is summed over ``data_axis`` before the candidates
  are picked, so that they are the whole batch's.
  """
  spec = _Spec(loss, chunk_size, num_valid, num_candidates=num_candidates, data_axis=data_axis)
  floats = (values,) if bias is None else (values, bias)
  return _fused(spec, floats, (indices,), h, label_ids, label_mask,
                jnp.asarray(label_offset, jnp.int32))


class _Spec(NamedTuple):
  """The static part of a fused chunk scan (hashable: ``_fused``'s nondiff argument)."""
  loss: str
  chunk_size: int
  num_valid: int | None
  # chunked_loss: the logits of a chunk of the classifier, flattened to ``treedef``
  # whose leaves are split into float ones (``is_float``) and integer ones.
  logits_fn: Callable | None = None
  treedef: Any = None
  is_float: tuple[bool, ...] = ()
  # chunked_loss_and_candidates: floats ``(values[, bias])``, ints ``(indices,)``.
  num_candidates: int | None = None
  data_axis: str | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(spec, floats, ints, h, label_ids, label_mask, label_offset):
  """The mean loss over the chunks, or ``(loss, RegrowthCandidates)``.

  Differentiable w.r.t. ``floats`` (the classifier's float leaves, each
  ``(L, ...)``) and ``h``; the rest get no cotangent.
  """
  return _scan_chunks(spec, floats, ints, h, label_ids, label_mask, label_offset,
                      grads=False)[0]


def _fused_fwd(spec, floats, ints, h, label_ids, label_mask, label_offset):
  return _scan_chunks(spec, floats, ints, h, label_ids, label_mask, label_offset, grads=True)


def _fused_bwd(spec, grads, cotangent):
  dfloats, dh = grads
  if spec.num_candidates is not None:
    cotangent = cotangent[0]  # the candidates are not differentiable
  # The saved gradients are the summed loss's: the mean is the sum over B.
  scale = cotangent / dh.shape[0]
  return (tuple((scale * d).astype(d.dtype) for d in dfloats), None,
          (scale * dh).astype(dh.dtype), None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _scan_chunks(spec, floats, ints, h, label_ids, label_mask, label_offset, *, grads: bool):
  """One scan over the chunks: ``(output, gradients)``.

  ``output`` is the mean loss (with ``spec.num_candidates``, ``(loss,
  RegrowthCandidates)``). ``gradients`` is None without ``grads``, else
  ``(dfloats, dh)``: the summed loss's gradients w.r.t. ``floats`` (each
  classifier-shaped, written chunk by chunk) and ``h`` (``(B, d)``, in
  ``h``'s dtype), each chunk's taken right after its logits.
  """
  size, num_labels = spec.chunk_size, (floats + ints)[0].shape[0]
  step = _loss_step if spec.num_candidates is None else _candidates_step
  operands = (floats, ints, h, label_ids, label_mask, label_offset)

  def body(carry, index):
    (floats_c, ints_c), start, ids, fresh = _chunk_at((floats, ints), index, size, num_labels)
    counted = _counted(fresh, ids, label_offset, spec.num_valid)
    y = _chunk_targets(label_ids, label_mask, label_offset + start, size)
    value, dfloats_c, dh_c, found = step(spec, floats_c, ints_c, h, y, counted, grads=grads)
    total, dfloats, dh, best = carry
    if grads:
      # Added, not written: the last chunk's stale labels (zero gradient here) hold
      # the chunk before's gradient. XLA updates the slice in place.
      dfloats = tuple(lax.dynamic_update_slice_in_dim(
          d, lax.dynamic_slice_in_dim(d, start, size) + d_c, start, 0)
                      for d, d_c in zip(dfloats, dfloats_c))
      dh = dh + dh_c.astype(dh.dtype)
    if found is not None:  # the stale labels' candidates were found by the chunk before
      best = tuple(lax.dynamic_update_slice_in_dim(
          b, jnp.where(counted[:, None], f, lax.dynamic_slice_in_dim(b, start, size)), start, 0)
                   for b, f in zip(best, found))
    return (total + value, dfloats, dh, best), None

  acc = jnp.promote_types(jnp.result_type(h), jnp.float32)
  total = varying_like(jnp.zeros((), acc), *operands)
  dfloats = dh = best = None
  if grads:
    dfloats = varying_like(tuple(jnp.zeros_like(leaf) for leaf in floats), *operands)
    dh = varying_like(jnp.zeros(h.shape, acc), *operands)
  if spec.num_candidates is not None:
    shape = (num_labels, spec.num_candidates)
    best = (jnp.zeros(shape, jnp.int32), jnp.full(shape, -jnp.inf, acc))
    # Summed over the data axis, the scores vary like the rows, not like the batch.
    best = (varying_like(best, ints, label_offset) if spec.data_axis is not None
            else varying_like(best, *operands))
  n_chunks = -(-num_labels // size)
  (total, dfloats, dh, best), _ = lax.scan(body, (total, dfloats, dh, best),
                                           jnp.arange(n_chunks, dtype=jnp.int32))
  loss = total / h.shape[0]
  output = loss if best is None else (loss, RegrowthCandidates(*best))
  return output, ((dfloats, dh.astype(h.dtype)) if grads else None)


def _loss_step(spec, floats, ints, h, y, counted, *, grads: bool):
  """A chunk's summed loss, and with ``grads`` its gradients w.r.t. ``floats`` and ``h``.

  Returns ``(loss, dfloats or None, dh or None, None)``.
  """
  def chunk_loss(floats, h):
    float_leaves, int_leaves = iter(floats), iter(ints)
    leaves = [next(float_leaves) if float_leaf else next(int_leaves)
              for float_leaf in spec.is_float]
    z = _chunk_logits(spec.logits_fn, jax.tree.unflatten(spec.treedef, leaves), h,
                      spec.chunk_size)
    return _counted_loss(z, y, counted, spec.loss)

  if not grads:
    return chunk_loss(floats, h), None, None, None
  value, (dfloats, dh) = jax.value_and_grad(chunk_loss, argnums=(0, 1))(floats, h)
  return value, dfloats, dh, None


def _candidates_step(spec, floats, ints, h, y, counted, *, grads: bool):
  """A fixed fan-in chunk's summed loss, gradients and regrowth candidates.

  One dense gradient ``G^T = g^T h`` (chunk, in) gives both ``dvalues`` and
  the candidates. Returns ``(loss, (dvalues[, dbias]) or None, dh or None,
  (columns, scores))``, the last two ``(chunk, R)``.
  """
  values, *bias = floats
  (indices,) = ints
  matmul = lambda h: fixed_fanin_matmul(h, values, indices)
  if grads:
    z, pullback = jax.vjp(matmul, h)
  else:
    z = matmul(h)
  if bias:
    z = z + bias[0].astype(z.dtype)
  value, g = jax.value_and_grad(lambda z: _counted_loss(z, y, counted, spec.loss))(z)
  acc = jnp.promote_types(jnp.result_type(h, g), jnp.float32)
  dense_t = jnp.dot(g.T, h, preferred_element_type=acc)  # (chunk, in): row u's dense gradient
  rows = lax.broadcasted_iota(jnp.int32, indices.shape, 0)
  idx = indices.astype(jnp.int32)
  # The whole batch's dense gradient (the data shards' parts summed), scaled to the mean
  # loss's below.
  whole = dense_t if spec.data_axis is None else lax.psum(dense_t, spec.data_axis)
  batch = h.shape[0] * (1 if spec.data_axis is None else lax.axis_size(spec.data_axis))
  scores, columns = lax.top_k(jnp.abs(whole).at[rows, idx].set(-jnp.inf), spec.num_candidates)
  found = (columns.astype(jnp.int32), scores / batch)
  if not grads:
    return value, None, None, found
  dvalues = dense_t.at[rows, idx].get(mode="promise_in_bounds").astype(values.dtype)
  dbias = tuple(jnp.sum(g, axis=0).astype(b.dtype) for b in bias)
  (dh,) = pullback(g)
  return value, (dvalues, *dbias), dh, found


def _counted_loss(z, y, counted, loss: str):
  """The loss of a chunk's ``(B, chunk)`` logits, summed over the labels that count."""
  z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
  return jnp.sum(jnp.where(counted, _loss_terms(z, y, loss), 0))


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
