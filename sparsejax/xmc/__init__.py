"""Extreme multi-label classification: chunked losses and top-k, label clusters, metrics."""

from sparsejax.xmc.clusters import balanced_kmeans, cluster_targets, label_centroids
from sparsejax.xmc.label_chunks import (LOSSES, chunked_loss, chunked_loss_and_candidates,
                                        chunked_topk, dense_logits,
                                        fixed_fanin_logits)
from sparsejax.xmc.metrics import RankingMetrics, format_table, inverse_propensity, ranking_metrics
from sparsejax.xmc.sharded import (mesh_from_spec, pad_labels, padded_num_labels,
                                   sharded_chunked_loss, sharded_chunked_loss_and_candidates,
                                   sharded_chunked_topk)

__all__ = [
    "LOSSES",
    "RankingMetrics",
    "balanced_kmeans",
    "chunked_loss",
    "chunked_loss_and_candidates",
    "chunked_topk",
    "cluster_targets",
    "dense_logits",
    "fixed_fanin_logits",
    "format_table",
    "inverse_propensity",
    "label_centroids",
    "mesh_from_spec",
    "pad_labels",
    "padded_num_labels",
    "ranking_metrics",
    "sharded_chunked_loss",
    "sharded_chunked_loss_and_candidates",
    "sharded_chunked_topk",
]
