"""Extreme multi-label classification: the model, its chunked losses and top-k, training,
evaluation, label sharding and checkpoints (``docs/methods.md``, "The XMC recipe").

- ``classifier``: the label-major classifier contract (``LabelMajorLinear``,
  ``dense_logits``, ``fixed_fanin_logits``); ``model``: ``XMCModel``.
- ``label_chunks``, ``sharded``: losses and top-k over all labels in chunks, on
  one device or with the labels split over a mesh.
- ``clusters``: the auxiliary objective's label clusters; ``metrics``: P@k,
  nDCG@k, PSP@k.
- ``training``: the optimizer and the jitted train step; ``evaluation``:
  ``predict``, ``predict_dataset``, ``score`` and ``evaluate``; ``predictions``:
  top-k files for external metric tools; ``layout``: shardings on a ``("data",
  "labels")`` mesh; ``checkpoint``: save, and restore onto any mesh.
"""

from sparsejax.xmc.checkpoint import (CheckpointError, checkpoint_manager, checksums,
                                      read_checkpoint, restore, save, saved_config)
from sparsejax.xmc.classifier import LabelMajorLinear, dense_logits, fixed_fanin_logits
from sparsejax.xmc.clusters import (balanced_kmeans, cluster_targets, label_centroids,
                                    label_clusters)
from sparsejax.xmc.evaluation import METRIC_NAMES, evaluate, predict, predict_dataset, score
from sparsejax.xmc.label_chunks import (LOSSES, check_label_ids, chunked_loss,
                                        chunked_loss_and_candidates, chunked_topk)
from sparsejax.xmc.layout import Layout, put, to_host
from sparsejax.xmc.predictions import read_predictions, write_predictions
from sparsejax.xmc.metrics import RankingMetrics, format_table, inverse_propensity, ranking_metrics
from sparsejax.xmc.model import CLASSIFIER, XMCModel, in_classifier, supar_classifier
from sparsejax.xmc.sharded import (mesh_from_spec, pad_labels, padded_num_labels,
                                   sharded_chunked_loss, sharded_chunked_loss_and_candidates,
                                   sharded_chunked_topk)
from sparsejax.xmc.training import (aux_weight_at, initial_classifier_bias, make_optimizer,
                                    make_train_step, make_train_steps, resolve_compute_dtype,
                                    resolve_label_chunk, rigl_num_candidates)

__all__ = [
    "CLASSIFIER",
    "CheckpointError",
    "LOSSES",
    "METRIC_NAMES",
    "LabelMajorLinear",
    "Layout",
    "RankingMetrics",
    "XMCModel",
    "aux_weight_at",
    "balanced_kmeans",
    "check_label_ids",
    "checkpoint_manager",
    "chunked_loss",
    "chunked_loss_and_candidates",
    "checksums",
    "chunked_topk",
    "cluster_targets",
    "dense_logits",
    "evaluate",
    "fixed_fanin_logits",
    "format_table",
    "in_classifier",
    "initial_classifier_bias",
    "inverse_propensity",
    "label_centroids",
    "label_clusters",
    "make_optimizer",
    "make_train_step",
    "make_train_steps",
    "mesh_from_spec",
    "pad_labels",
    "padded_num_labels",
    "predict",
    "predict_dataset",
    "put",
    "ranking_metrics",
    "read_predictions",
    "read_checkpoint",
    "resolve_compute_dtype",
    "resolve_label_chunk",
    "restore",
    "rigl_num_candidates",
    "save",
    "saved_config",
    "score",
    "sharded_chunked_loss",
    "sharded_chunked_loss_and_candidates",
    "sharded_chunked_topk",
    "supar_classifier",
    "to_host",
    "write_predictions",
]
