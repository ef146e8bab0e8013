"""Scoring an ``XMCModel``: the top labels of each point, and P@k, nDCG@k, PSP@k of a dataset.

``predict_dataset`` gives every point's top-k label ids and scores (what
``sparsejax.xmc.write_predictions`` writes), ``score`` the metrics of such ids,
and ``evaluate`` both at once.

Labels are scored in chunks with a streaming top-k (``chunked_topk``, or per
label shard ``sharded_chunked_topk`` on a mesh), so no ``(batch, L)`` array
exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.data.xmc import XMCDataset, pad_points
from sparsejax.xmc.label_chunks import chunked_topk
from sparsejax.xmc.layout import Layout, put, to_host
from sparsejax.xmc.metrics import RankingMetrics
from sparsejax.xmc.model import XMCModel
from sparsejax.xmc.sharded import sharded_chunked_topk

__all__ = ["METRIC_NAMES", "evaluate", "predict", "predict_dataset", "score"]

_KS = (1, 3, 5)
# The keys of ``evaluate``'s result, in order.
METRIC_NAMES = tuple(f"{m}@{k}" for m in ("P", "nDCG", "PSP") for k in _KS)
_FEATURES = ("feature_ids", "feature_values", "feature_mask")


@functools.partial(jax.jit, static_argnames=("model_def", "k", "label_chunk", "layout",
                                             "compute_dtype"))
def _predict(model_def, model_state, batch, *, k, label_chunk, layout=None,
             compute_dtype=jnp.dtype(jnp.float32)):
  """``((B, k) float32 scores, (B, k) int32 ids)`` of the best labels of each point, best first."""
  model = nnx.merge(model_def, model_state)
  model.eval()  # inference: PrunedGrad layers skip their (backward-only) pruning
  z = model.encode(batch["feature_ids"], batch["feature_values"], batch["feature_mask"])
  h = model.classifier_input(z).astype(compute_dtype)
  if layout is None:
    return chunked_topk(model.logits_fn, model.classifier_params(), h, k=k,
                        chunk_size=label_chunk)
  return sharded_chunked_topk(model.logits_fn, model.classifier_params(), h, mesh=layout.mesh,
                              num_labels=layout.num_labels, k=k, chunk_size=label_chunk)


def predict(model: XMCModel, features: dict, *, k: int, label_chunk: int,
            layout: Layout | None = None, compute_dtype=jnp.float32) -> jax.Array:
  """The ``k`` best labels of each point of a batch (jitted).

  Arguments:
    model: the model.
    features: ``{"feature_ids", "feature_values", "feature_mask"}``, each
      ``(B, F)``, as from ``sparsejax.data.xmc.pad_points``; with ``layout``,
      placed split over the data axis (``layout.batch``).
    k: how many labels.
    label_chunk: labels scored at once.
    layout: for a model placed on a mesh, its ``Layout``: each label shard
      streams its own top-k and the shards' are merged.
    compute_dtype: the dtype of the logits' inputs, as in training.

  Returns:
    ``(B, k)`` int32 label ids, best first.
  """
  model_def, model_state = nnx.split(model)
  return _predict(model_def, model_state, {name: features[name] for name in _FEATURES}, k=k,
                  label_chunk=label_chunk, layout=layout,
                  compute_dtype=jnp.dtype(compute_dtype))[1]


def predict_dataset(model: XMCModel, dataset: XMCDataset, *, k: int, batch_size: int,
                    label_chunk: int, layout: Layout | None = None,
                    compute_dtype=jnp.float32) -> tuple[np.ndarray, np.ndarray]:
  """The ``k`` best labels of every point of ``dataset``, with their scores (the logits).

  Points go through in order, ``batch_size`` at a time (the last batch is
  padded with copies, so one executable serves all); labels are scored in
  chunks with a streaming top-k, so no ``(batch, L)`` array exists.

  Arguments:
    model: the trained model.
    dataset: the points, with the model's number of labels.
    k: labels per point.
    batch_size: points per forward pass (with ``layout``, rounded up to a
      multiple of the data shards).
    label_chunk: labels scored at once.
    layout: for a model placed on a mesh (padded and placed as in training),
      its ``Layout``: each label shard streams its own top-k, the shards' are
      merged, and every process gets all of them.
    compute_dtype: the dtype of the logits' inputs, as in training
      (``resolve_compute_dtype``).

  Returns:
    ``(ids, scores)``: ``(N, k)`` int32 label ids and float32 logits, best
    first (equal scores: lower id first).
  """
  if dataset.num_labels != model.classifier.out_features:
    raise ValueError(f"the data has {dataset.num_labels} labels, the model "
                     f"{model.classifier.out_features}")
  model_def, model_state = nnx.split(model)
  size = min(batch_size, len(dataset))
  if layout is not None:
    size = -(-size // layout.mesh.shape["data"]) * layout.mesh.shape["data"]
  widths = dict(max_features=max(dataset.max_features_per_point(), 1),
                max_labels=max(dataset.max_labels_per_point(), 1))
  ids, scores = [], []
  for start in range(0, len(dataset), size):
    rows = np.arange(start, min(start + size, len(dataset)))
    batch = pad_points(dataset, np.pad(rows, (0, size - rows.size), mode="edge"), **widths)
    features = {name: batch[name] for name in _FEATURES}
    if layout is not None:
      features = put(features, {name: layout.batch for name in features})
    top_scores, top_ids = _predict(model_def, model_state, features, k=k,
                                   label_chunk=label_chunk, layout=layout,
                                   compute_dtype=jnp.dtype(compute_dtype))
    ids.append(to_host(top_ids)[:rows.size])
    scores.append(to_host(top_scores).astype(np.float32)[:rows.size])
  return np.concatenate(ids), np.concatenate(scores)


def score(topk_ids, dataset: XMCDataset, *, inv_propensity: np.ndarray) -> dict[str, float]:
  """P@k, nDCG@k and PSP@k (k = 1, 3, 5) of ranked label ids against ``dataset``'s labels.

  Arguments:
    topk_ids: ``(N, k)`` label ids per point of ``dataset``, best first, ``k >= 5``.
    dataset: the points' true labels.
    inv_propensity: ``(L,)`` inverse propensities from the training label counts.

  Returns:
    ``{"P@1": ..., "nDCG@1": ..., "PSP@1": ..., ...}`` as fractions (the keys
    of ``METRIC_NAMES``).
  """
  topk_ids = np.asarray(topk_ids)
  if topk_ids.ndim != 2 or topk_ids.shape[0] != len(dataset) or topk_ids.shape[1] < max(_KS):
    raise ValueError(f"topk_ids must be ({len(dataset)}, >= {max(_KS)}), got {topk_ids.shape}")
  metrics = RankingMetrics(ks=_KS, inv_propensity=inv_propensity)
  widths = dict(max_features=dataset.max_features_per_point(),
                max_labels=max(dataset.max_labels_per_point(), 1))
  for start in range(0, len(dataset), 4096):
    rows = np.arange(start, min(start + 4096, len(dataset)))
    batch = pad_points(dataset, rows, **widths)
    metrics.update(topk_ids[rows, :max(_KS)], batch["label_ids"], batch["label_mask"])
  return metrics.result()


def evaluate(model: XMCModel, dataset: XMCDataset, *, inv_propensity: np.ndarray,
             batch_size: int, label_chunk: int, layout: Layout | None = None,
             compute_dtype=jnp.float32) -> dict[str, float]:
  """P@k, nDCG@k and PSP@k (k = 1, 3, 5) of ``model`` on every point of ``dataset``.

  ``score`` of the top 5 of ``predict_dataset`` (see there for the arguments).

  Returns:
    ``{"P@1": ..., "nDCG@1": ..., "PSP@1": ..., ...}`` as fractions (the
    keys of ``METRIC_NAMES``).
  """
  ids, _ = predict_dataset(model, dataset, k=max(_KS), batch_size=batch_size,
                           label_chunk=label_chunk, layout=layout, compute_dtype=compute_dtype)
  return score(ids, dataset, inv_propensity=inv_propensity)
