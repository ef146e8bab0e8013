"""Label-sharded XMC: the chunked loss and top-k with the labels split over devices.

With millions of labels the classifier outgrows one device. Here the devices
form a ``("data", "labels")`` mesh: the classifier's rows (labels) are split
over ``labels`` and the batch over ``data``. Inside ``jax.shard_map`` each
device runs the chunked loss or top-k of ``label_chunks`` on its own rows,
with global label ids (its first row is ``axis_index("labels") * rows``); the
loss is then summed over ``labels`` and averaged over ``data``, and each
device's top-k candidates are gathered over ``labels`` and merged. Nothing
classifier-sized moves between devices: only ``(batch, k)`` candidates and
scalars. With ``sharded_chunked_loss_and_candidates``, RigL's regrowth
candidates come back split over ``labels`` like the classifier's rows.

The label count rarely divides the shard count, so the classifier is padded
(``pad_labels``) to ``padded_num_labels(L, shards)`` rows; padded rows never
count: no loss, zero gradient, never in the top-k.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sparsejax.kernels.vma import varying_like
from sparsejax.topology import RegrowthCandidates
from sparsejax.xmc.label_chunks import (LOSSES, _check_classifier, _check_features,
                                        _check_fixed_fanin_classifier, _check_labels, _chunk,
                                        _chunked_loss, _chunked_loss_and_candidates,
                                        _chunked_topk, _merge_topk)

__all__ = ["mesh_from_spec", "pad_labels", "padded_num_labels", "sharded_chunked_loss",
           "sharded_chunked_loss_and_candidates", "sharded_chunked_topk"]

_AXES = ("data", "labels")


def mesh_from_spec(spec: str, devices=None) -> Mesh:
  """A ``("data", "labels")`` mesh from a spec such as ``"data:2,labels:4"``.

  Arguments:
    spec: comma-separated ``name:size`` items, names from ``"data"`` and
      ``"labels"``, each at most once; an omitted axis has size 1.
    devices: the devices to lay out, in order (default ``jax.devices()``, all
      devices of all processes); their number must be the product of the sizes.

  Returns:
    A ``jax.sharding.Mesh`` of shape ``(data, labels)`` with axis names
    ``("data", "labels")``.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"mesh spec must be a non-empty string like 'data:2,labels:4', got {spec!r}")
  sizes = {}
  for item in spec.split(","):
    name, colon, size = (part.strip() for part in item.partition(":"))
    try:
      size = int(size) if colon and name else None
    except ValueError:
      size = None
    if size is None:
      raise ValueError(f"malformed mesh spec {spec!r}: item {item.strip()!r} is not 'name:size' "
                       "(e.g. 'data:2,labels:4')")
    if name not in _AXES:
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}, expected names from {_AXES}")
    if name in sizes:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
    if size < 1:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} must have a positive size, got {size}")
    sizes[name] = size
  devices = jax.devices() if devices is None else list(devices)
  shape = tuple(sizes.get(name, 1) for name in _AXES)
  if shape[0] * shape[1] != len(devices):
    raise ValueError(f"mesh spec {spec!r} asks for {shape[0]} x {shape[1]} = "
                     f"{shape[0] * shape[1]} devices, but {len(devices)} are given")
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), _AXES)


def padded_num_labels(num_labels: int, shards: int) -> int:
  """``num_labels`` rounded up to a multiple of ``shards`` (both positive integers)."""
  for name, value in (("num_labels", num_labels), ("shards", shards)):
    if not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return -(-int(num_labels) // int(shards)) * int(shards)


def pad_labels(classifier, num_padded: int):
  """Pads every leaf of a label-major classifier with zero rows up to ``num_padded``.

  A padded fixed fan-in row holds column 0 in every slot (not distinct):
  harmless, since padded labels never count (give the sharded functions the
  true ``num_labels``), and SET rewiring may redraw them.

  Arguments:
    classifier: a pytree whose leaves all have the label axis first, ``(L, ...)``.
    num_padded: the padded label count, ``>= L`` (see ``padded_num_labels``).

  Returns:
    The classifier with every leaf of shape ``(num_padded, ...)``, rows
    ``[L, num_padded)`` zero.
  """
  num_labels = _check_classifier(classifier)
  if not isinstance(num_padded, numbers.Integral) or num_padded < num_labels:
    raise ValueError(f"num_padded must be an integer >= L={num_labels}, got {num_padded!r}")
  extra = int(num_padded) - num_labels
  return jax.tree.map(
      lambda leaf: jnp.pad(leaf, [(0, extra)] + [(0, 0)] * (jnp.ndim(leaf) - 1)), classifier)


def sharded_chunked_loss(logits_fn: Callable, classifier, h: jax.Array, label_ids: jax.Array,
                         label_mask: jax.Array, *, mesh: Mesh, num_labels: int,
                         loss: str = "squared_hinge", chunk_size: int,
                         label_axis: str = "labels", data_axis: str = "data") -> jax.Array:
  """``chunked_loss`` with the labels sharded over ``label_axis``, the batch over ``data_axis``.

  Each device computes the loss of its batch slice over its rows of the
  classifier (chunked, as ``chunked_loss``), with rows ``>= num_labels`` left
  out; the parts are summed over ``label_axis`` and averaged over
  ``data_axis``. Equal to ``chunked_loss`` on the unpadded classifier, and so
  are the gradients: w.r.t. each row of the float leaves (padded rows get 0),
  and w.r.t. ``h``, whose per-shard contributions ``shard_map``'s transpose
  sums over ``label_axis``. Works under ``jit`` and ``jax.grad`` (integer
  leaves pass through as in ``chunked_loss``: ``allow_int=True``).

  Arguments:
    logits_fn: ``(params_chunk, h) -> (B, chunk)`` (see ``chunked_loss``).
    classifier: a pytree whose leaves all have the label axis first,
      ``(L_pad, ...)``, laid out (or resharded to) ``PartitionSpec(label_axis)``.
    h: ``(B, d)`` float features, ``PartitionSpec(data_axis)``.
    label_ids: ``(B, Lmax)`` integer label ids in ``[0, num_labels)``, padded,
      ``PartitionSpec(data_axis)``.
    label_mask: ``(B, Lmax)`` bool, True where ``label_ids`` holds a label.
    mesh: a ``jax.sharding.Mesh`` with axes ``label_axis`` and ``data_axis``.
    num_labels: the true label count L, ``<= L_pad``; later rows are padding.
    loss: ``"squared_hinge"`` or ``"bce"``.
    chunk_size: the most labels a device scores at once (its
      ``L_pad / shards`` rows are chunked as in ``chunked_loss``).
    label_axis, data_axis: the mesh axes of the labels and of the batch.

  Returns:
    A replicated scalar, float32 (float64 for float64 logits).
  """
  rows = _check_sharded(mesh, classifier, h, num_labels, label_axis, data_axis)
  size = _chunk(rows, chunk_size)
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  _check_labels(label_ids, label_mask, jnp.shape(h)[0], num_labels)
  return _sharded_loss(logits_fn, classifier, h, label_ids, label_mask, mesh=mesh,
                       num_labels=int(num_labels), loss=loss, chunk_size=size,
                       label_axis=label_axis, data_axis=data_axis)


def sharded_chunked_loss_and_candidates(
    classifier, h: jax.Array, label_ids: jax.Array, label_mask: jax.Array, *, mesh: Mesh,
    num_labels: int, loss: str = "squared_hinge", chunk_size: int, num_candidates: int,
    label_axis: str = "labels",
    data_axis: str = "data") -> tuple[jax.Array, RegrowthCandidates]:
  """``chunked_loss_and_candidates`` with the labels sharded over ``label_axis``.

  The loss and its gradients are ``sharded_chunked_loss``'s. Each device picks
  the candidates of its own rows; each chunk's dense gradient ``g^T h`` (chunk,
  in) is summed over ``data_axis`` first (one all-reduce of that size per
  chunk where the batch is split), so the candidates are the whole batch's and
  equal ``chunked_loss_and_candidates``'s on the unpadded classifier. Padded
  rows get scores ``-inf``.

  Arguments:
    classifier: a ``FixedFanIn`` or a ``{"values", "indices"[, "bias"]}``
      mapping with ``L_pad`` rows, ``PartitionSpec(label_axis)``.
    h: ``(B, in)`` float features, ``PartitionSpec(data_axis)``.
    label_ids, label_mask, mesh, num_labels, loss, chunk_size, label_axis,
      data_axis: as in ``sharded_chunked_loss``.
    num_candidates: ``R``, candidates per row, ``1 <= R <= in``.

  Returns:
    ``(loss, candidates)``: a replicated scalar and a
    ``sparsejax.RegrowthCandidates`` of ``(L_pad, R)`` columns and scores,
    ``PartitionSpec(label_axis)``.
  """
  values, indices, bias, parts = _check_fixed_fanin_classifier(classifier, h, num_candidates)
  rows = _check_sharded(mesh, parts, h, num_labels, label_axis, data_axis)
  size = _chunk(rows, chunk_size)
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  _check_labels(label_ids, label_mask, jnp.shape(h)[0], num_labels)
  return _sharded_loss_and_candidates(values, indices, bias, h, label_ids, label_mask,
                                      mesh=mesh, num_labels=int(num_labels), loss=loss,
                                      chunk_size=size, num_candidates=int(num_candidates),
                                      label_axis=label_axis, data_axis=data_axis)


def sharded_chunked_topk(logits_fn: Callable, classifier, h: jax.Array, *, mesh: Mesh,
                         num_labels: int, k: int, chunk_size: int, label_axis: str = "labels",
                         data_axis: str = "data") -> tuple[jax.Array, jax.Array]:
  """``chunked_topk`` with the labels sharded over ``label_axis``, the batch over ``data_axis``.

  Each device streams the top ``k`` of its rows (global ids, rows
  ``>= num_labels`` left out), the candidates are gathered over
  ``label_axis`` (``(B, shards * k)``, never the logits) and merged. Exactly
  ``chunked_topk`` on the unpadded classifier, ties included (equal scores
  by ascending label id), wherever the logits of a label come out the same
  bits on both.

  Arguments:
    logits_fn: ``(params_chunk, h) -> (B, chunk)`` (see ``chunked_loss``).
    classifier: a pytree whose leaves all have the label axis first,
      ``(L_pad, ...)``, ``PartitionSpec(label_axis)``.
    h: ``(B, d)`` float features, ``PartitionSpec(data_axis)``.
    mesh: a ``jax.sharding.Mesh`` with axes ``label_axis`` and ``data_axis``.
    num_labels: the true label count L, ``<= L_pad``; later rows are padding.
    k: how many labels, ``1 <= k <= num_labels``.
    chunk_size: the most labels a device scores at once.
    label_axis, data_axis: the mesh axes of the labels and of the batch.

  Returns:
    ``(scores, ids)``: ``(B, k)`` logits and ``(B, k)`` int32 label ids, best
    first, sharded ``PartitionSpec(data_axis)``.
  """
  rows = _check_sharded(mesh, classifier, h, num_labels, label_axis, data_axis)
  size = _chunk(rows, chunk_size)
  if not isinstance(k, numbers.Integral) or not 1 <= k <= num_labels:
    raise ValueError(f"k must be an integer in [1, num_labels={num_labels}], got {k!r}")
  return _sharded_topk(logits_fn, classifier, h, mesh=mesh, num_labels=int(num_labels),
                       k=int(k), chunk_size=size, label_axis=label_axis, data_axis=data_axis)


def _check_sharded(mesh, classifier, h, num_labels, label_axis, data_axis) -> int:
  """Validates the layout; returns the rows each ``label_axis`` device holds."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh)}")
  for role, axis in (("label_axis", label_axis), ("data_axis", data_axis)):
    if axis not in mesh.axis_names:
      raise ValueError(f"mesh has no axis {axis!r} ({role}); its axes are {mesh.axis_names}")
  if label_axis == data_axis:
    raise ValueError(f"label_axis and data_axis must differ, both are {label_axis!r}")
  padded = _check_classifier(classifier)
  shards, replicas = mesh.shape[label_axis], mesh.shape[data_axis]
  if padded % shards:
    raise ValueError(f"the classifier's {padded} rows do not split over the {shards} devices of "
                     f"mesh axis {label_axis!r}; pad them to padded_num_labels(L, {shards})")
  if not isinstance(num_labels, numbers.Integral) or not 1 <= num_labels <= padded:
    raise ValueError(f"num_labels must be an integer in [1, {padded}] (the classifier's rows), "
                     f"got {num_labels!r}")
  _check_features(h)
  if jnp.shape(h)[0] % replicas:
    raise ValueError(f"the batch of {jnp.shape(h)[0]} does not split over the {replicas} "
                     f"devices of mesh axis {data_axis!r}")
  return padded // shards


@functools.partial(jax.jit, static_argnames=("logits_fn", "mesh", "num_labels", "loss",
                                             "chunk_size", "label_axis", "data_axis"))
def _sharded_loss(logits_fn, classifier, h, label_ids, label_mask, *, mesh, num_labels, loss,
                  chunk_size, label_axis, data_axis):
  def local(classifier, h, label_ids, label_mask):
    classifier, h = _vary_over_both(classifier, h)
    first = lax.axis_index(label_axis) * jax.tree.leaves(classifier)[0].shape[0]
    part = _chunked_loss(logits_fn, classifier, h, label_ids, label_mask, first, loss=loss,
                         chunk_size=chunk_size, num_valid=num_labels)
    # Each part is a sum over this device's labels, over its batch slice's size.
    return lax.pmean(lax.psum(part, label_axis), data_axis)

  return jax.shard_map(local, mesh=mesh, out_specs=P(),
                       in_specs=(P(label_axis), P(data_axis), P(data_axis), P(data_axis)))(
                           classifier, h, label_ids, label_mask)


@functools.partial(jax.jit, static_argnames=("mesh", "num_labels", "loss", "chunk_size",
                                             "num_candidates", "label_axis", "data_axis"))
def _sharded_loss_and_candidates(values, indices, bias, h, label_ids, label_mask, *, mesh,
                                 num_labels, loss, chunk_size, num_candidates, label_axis,
                                 data_axis):
  def local(values, indices, bias, h, label_ids, label_mask):
    (values, bias), h = _vary_over_both((values, bias), h)
    first = lax.axis_index(label_axis) * values.shape[0]
    part, candidates = _chunked_loss_and_candidates(
        values, indices, bias, h, label_ids, label_mask, first, loss=loss,
        chunk_size=chunk_size, num_candidates=num_candidates, num_valid=num_labels,
        data_axis=data_axis)
    return lax.pmean(lax.psum(part, label_axis), data_axis), candidates

  rows, batch = P(label_axis), P(data_axis)
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, batch, batch, batch),
                       out_specs=(P(), rows))(values, indices, bias, h, label_ids, label_mask)


def _vary_over_both(classifier, h):
  """The shard's classifier (float leaves) and features, typed as varying over both mesh axes.

  Each device's loss mixes its rows with its batch slice. Casting them up
  front (rather than letting every chunk's logits do it) places the casts'
  transposes, the sums of ``dh`` over the label shards and of the classifier
  gradient over the data shards, once after the backward scan instead of
  once per chunk. Integer leaves (indices) keep varying over the labels only:
  they have no gradient, and the regrowth candidates that they mask must
  come out the same on every data shard.
  """
  classifier = jax.tree.map(
      lambda leaf: varying_like(leaf, h) if jnp.issubdtype(leaf.dtype, jnp.inexact) else leaf,
      classifier)
  return classifier, varying_like(h, classifier)


@functools.partial(jax.jit, static_argnames=("logits_fn", "mesh", "num_labels", "k",
                                             "chunk_size", "label_axis", "data_axis"))
def _sharded_topk(logits_fn, classifier, h, *, mesh, num_labels, k, chunk_size, label_axis,
                  data_axis):
  def local(classifier, h):
    first = lax.axis_index(label_axis) * jax.tree.leaves(classifier)[0].shape[0]
    scores, ids = _chunked_topk(logits_fn, classifier, h, first, k=k, chunk_size=chunk_size,
                                num_valid=num_labels)
    # Every label shard gets all the candidates, so the merged top-k is invariant.
    gather = functools.partial(lax.all_gather, axis_name=label_axis, axis=1, tiled=True,
                               to="invarying")
    return _merge_topk(gather(scores), gather(ids), k)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(label_axis), P(data_axis)),
                       out_specs=(P(data_axis), P(data_axis)))(classifier, h)
