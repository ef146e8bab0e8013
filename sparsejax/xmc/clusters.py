"""Label clusters for the auxiliary objective of the XMC recipe.

A small dense head predicts which clusters of labels a point belongs to
(``docs/methods.md``, "The XMC recipe"). The clusters come from balanced
hierarchical spherical 2-means on label centroids (as in PECOS and
XR-Transformer):

1. ``label_centroids``: each label is the normalised sum of the L2-normalised
   feature vectors of its training points, in a ``dim``-dimensional random
   projection, so memory is O((N + L + D) * dim), never O(L * D).
2. ``balanced_kmeans``: every node of the tree is split in two by spherical
   2-means whose assignment step ranks the node's points by the score
   difference ``<x, c_left> - <x, c_right>`` and cuts at the planned size, so
   cluster sizes differ by at most 1. All nodes of a tree level are split
   together in a few vectorised passes over the L points.
3. ``cluster_targets``: the multi-hot cluster targets of a batch (jittable).

The first two run on the host (numpy and scipy.sparse, which jax depends on);
``label_clusters`` runs them on a training set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from sparsejax import _checks

__all__ = ["balanced_kmeans", "cluster_targets", "label_centroids", "label_clusters"]


def _check_csr(indptr, ids, num_columns: int, name: str, values=None):
  """Validates a CSR matrix given as (indptr, ids[, values]); returns numpy arrays."""
  indptr, ids = np.asarray(indptr), np.asarray(ids)
  for part, array in ((f"{name}_indptr", indptr), (f"{name}_ids", ids)):
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{part} must be a 1-D integer array, got {array.dtype} {array.shape}")
  if indptr.size < 1 or indptr[0] != 0 or indptr[-1] != ids.size or np.any(np.diff(indptr) < 0):
    raise ValueError(f"{name}_indptr must start at 0, never decrease and end at "
                     f"len({name}_ids)={ids.size}")
  if ids.size and (ids.min() < 0 or ids.max() >= num_columns):
    raise ValueError(f"{name}_ids must lie in [0, {num_columns}), got values in "
                     f"[{ids.min()}, {ids.max()}]")
  if values is None:
    return indptr, ids
  values = np.asarray(values)
  if values.shape != ids.shape or not np.issubdtype(values.dtype, np.floating):
    raise ValueError(f"{name}_values must be a float array of shape {ids.shape}, "
                     f"got {values.dtype} {values.shape}")
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name}_values holds a non-finite value")
  return indptr, ids, values


def _normalise_rows(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm; zero rows stay zero."""
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norms > 0, norms, 1).astype(x.dtype)


def _projection(key: jax.Array, num_features: int, dim: int) -> np.ndarray:
  """The ``(num_features, dim)`` Gaussian projection, entries ``N(0, 1/dim)``."""
  return np.asarray(jax.random.normal(key, (num_features, dim), jnp.float32)) / float(np.sqrt(dim))


def label_centroids(feature_indptr, feature_ids, feature_values, label_indptr, label_ids, *,
                    num_features: int, num_labels: int, dim: int,
                    key: jax.Array) -> np.ndarray:
  """Unit-norm label centroids in a random projection of the feature space.

  Point ``i``'s sparse features ``x_i`` (CSR rows) are L2-normalised and
  projected by a fixed Gaussian ``(num_features, dim)`` matrix drawn from
  ``key`` (entries ``N(0, 1/dim)``, which keeps inner products in
  expectation). Label ``l``'s centroid is the normalised sum of the projected
  ``x_i`` over its training points. A label with no training points gets the
  zero vector; ``balanced_kmeans`` then places it wherever the size balance
  has room (its score is 0 for every split).

  Arguments:
    feature_indptr: ``(N + 1,)`` CSR row pointers of the feature matrix.
    feature_ids: ``(nnz,)`` feature column ids in ``[0, num_features)``.
    feature_values: ``(nnz,)`` float feature values.
    label_indptr: ``(N + 1,)`` CSR row pointers of the label matrix.
    label_ids: ``(nnz_labels,)`` label ids in ``[0, num_labels)``.
    num_features, num_labels: ``D`` and ``L``.
    dim: the projected dimension (32-64 is plenty for clustering).
    key: PRNG key of the projection; the same key gives the same centroids.

  Returns:
    ``(L, dim)`` float32, each row of unit norm or zero. Memory is
    O((N + L + D) * dim) plus the inputs; work is O((nnz + nnz_labels) * dim).
  """
  for name, size in (("num_features", num_features), ("num_labels", num_labels), ("dim", dim)):
    if not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"{name} must be a positive integer, got {size!r}")
  _checks.check_key(key)
  f_indptr, f_ids, f_values = _check_csr(feature_indptr, feature_ids, num_features, "feature",
                                         feature_values)
  l_indptr, l_ids = _check_csr(label_indptr, label_ids, num_labels, "label")
  if f_indptr.size != l_indptr.size:
    raise ValueError(f"the feature matrix has {f_indptr.size - 1} points but the label "
                     f"matrix has {l_indptr.size - 1}")
  num_points = f_indptr.size - 1
  shape = (num_points, num_features)
  values = f_values.astype(np.float32)
  squares = sp.csr_matrix((values * values, f_ids, f_indptr), shape=shape)
  norms = np.sqrt(squares @ np.ones(num_features, np.float32))
  inverse = np.where(norms > 0, 1 / np.where(norms > 0, norms, 1), 0).astype(np.float32)
  features = sp.csr_matrix((values * np.repeat(inverse, np.diff(f_indptr)), f_ids, f_indptr),
                           shape=shape)
  points = np.asarray(features @ _projection(key, num_features, dim), np.float32)  # (N, dim)
  labels = sp.csr_matrix((np.ones(l_ids.size, np.float32), l_ids, l_indptr),
                         shape=(num_points, num_labels))
  return _normalise_rows(np.asarray(labels.T @ points, np.float32))


def balanced_kmeans(points, num_clusters: int, *, key: jax.Array,
                    iterations: int = 20) -> np.ndarray:
  """Balanced hierarchical spherical 2-means: a cluster id for every point.

  Cluster ``j`` gets exactly ``L // C + (j < L % C)`` points, so sizes differ
  by at most 1, for any ``1 <= C <= L`` (not only powers of two). The tree
  splits a node planned to hold clusters ``[lo, hi)`` into ``[lo, mid)`` and
  ``[mid, hi)``, ``mid = lo + ceil((hi - lo) / 2)``, with the point counts that
  plan gives; it has ``ceil(log2 C)`` levels. Each split is spherical 2-means:
  two random points of the node start as centroids; then, up to
  ``iterations`` times, the ``n_left`` points of largest ``<x, c_0> - <x, c_1>``
  go left, the others right, and each centroid becomes the normalised sum of
  its side. A level stops early once no point changes side. All nodes of a
  level go through each step together, as one partition (``argpartition`` at
  every node boundary) and one sparse product.

  Arguments:
    points: ``(L, d)`` float points, expected L2-normalised (as
      ``label_centroids`` returns them): the splits compare inner products.
    num_clusters: ``C``, ``1 <= C <= L``.
    key: PRNG key of the initial centroids; the same key gives the same result.
    iterations: at most this many 2-means steps per level, ``>= 1``.

  Returns:
    ``(L,)`` int32 cluster ids in ``[0, C)``.
  """
  x = np.asarray(points)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"points must be a 2-D float array (L, d), got {x.dtype} {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("points holds a non-finite value")
  num_points = x.shape[0]
  if not isinstance(num_clusters, (int, np.integer)) or not 1 <= num_clusters <= num_points:
    raise ValueError(f"num_clusters must be an integer in [1, L={num_points}], "
                     f"got {num_clusters!r}")
  if not isinstance(iterations, (int, np.integer)) or iterations < 1:
    raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
  _checks.check_key(key)
  x = x.astype(np.float32, copy=False)
  rng = np.random.default_rng(np.asarray(jax.random.bits(key, (4,), jnp.uint32)))
  sizes = num_points // num_clusters + (np.arange(num_clusters) < num_points % num_clusters)
  cluster_start = np.concatenate([[0], np.cumsum(sizes)])
  # Nodes are cluster ranges [lo, hi); ``order`` lists the points node by node.
  lo, hi = np.array([0]), np.array([num_clusters])
  order = np.arange(num_points)
  while np.any(hi - lo > 1):
    # A node planned as one cluster has mid == hi: it keeps all its points.
    mid = lo + (hi - lo + 1) // 2
    start = cluster_start[lo]
    perm = _split_level(x[order], start, cluster_start[mid] - start, cluster_start[hi] - start,
                        rng=rng, iterations=iterations)
    order = order[perm]
    lo, hi = np.stack([lo, mid], 1).ravel(), np.stack([mid, hi], 1).ravel()
    lo, hi = lo[hi > lo], hi[hi > lo]
  clusters = np.empty(num_points, np.int32)
  clusters[order] = np.repeat(np.arange(num_clusters, dtype=np.int32), sizes)
  return clusters


def label_clusters(dataset, num_clusters: int, *, key: jax.Array, dim: int = 64) -> np.ndarray:
  """``(L,)`` int32 cluster of each label: ``balanced_kmeans`` of the label centroids.

  Arguments:
    dataset: the training set, a ``sparsejax.data.XMCDataset``.
    num_clusters: ``C``, ``1 <= C <= L``.
    key: PRNG key; ``fold_in(key, 0)`` draws the centroids' projection,
      ``fold_in(key, 1)`` the initial 2-means centroids.
    dim: width of the centroids' random projection (64 is plenty to cluster).

  Returns:
    ``(L,)`` int32 cluster ids in ``[0, C)``, cluster sizes differing by at most 1.
  """
  _checks.check_key(key)
  centroids = label_centroids(dataset.feature_indptr, dataset.feature_ids,
                              dataset.feature_values, dataset.label_indptr, dataset.label_ids,
                              num_features=dataset.num_features, num_labels=dataset.num_labels,
                              dim=dim, key=jax.random.fold_in(key, 0))
  return balanced_kmeans(centroids, num_clusters, key=jax.random.fold_in(key, 1))


def _row_dots(xs, centres, node, block: int = 1 << 15) -> np.ndarray:
  """``score[i] = <xs[i], centres[node[i]]>`` in float64, a cache-sized block at a time."""
  score = np.empty(xs.shape[0], np.float64)
  for lo in range(0, xs.shape[0], block):
    score[lo:lo + block] = np.einsum("ij,ij->i", xs[lo:lo + block], centres[node[lo:lo + block]])
  return score


def _split_level(xs, start, n_left, size, *, rng, iterations: int) -> np.ndarray:
  """One tree level: balanced spherical 2-means in every node at once.

  Arguments:
    xs: ``(L, d)`` points, node by node: node ``j`` holds rows
      ``[start[j], start[j] + size[j])``.
    start, n_left, size: ``(nodes,)`` each node's first row, the number of
      points its left child takes, and its number of points.
    rng: numpy generator of the initial centroids.
    iterations: at most this many assignment steps.

  Returns:
    ``(L,)`` a permutation of the rows: node by node, each node's left child
    (its ``n_left`` points of largest ``<x, c_0> - <x, c_1>``) first.
  """
  num_points, num_nodes = xs.shape[0], start.size
  node = np.repeat(np.arange(num_nodes), size)
  # Whether partitioned row ``i`` is in its node's left child; fixed for the level.
  left_slot = np.arange(num_points) - start[node] < n_left[node]
  # Children as CSR rows (left, right, left, ...) over the partitioned rows.
  child_ptr = np.append(np.stack([start, start + n_left], 1).ravel(), num_points)
  # Two distinct random points of each node start as its centroids.
  first = rng.integers(0, size)
  second = (first + 1 + rng.integers(0, np.maximum(size - 1, 1))) % size
  c0, c1 = xs[start + first], xs[start + second]
  # Partitioning at every child boundary puts each node's rows in place, its
  # n_left largest scores first (O(L log nodes), cheaper than a full sort).
  boundaries = np.unique(child_ptr[child_ptr < num_points])
  side = None
  for step in range(iterations):
    score = _row_dots(xs, c0 - c1, node)
    scale = np.max(np.abs(score))
    # One float64 key orders by node, then by descending score: scores map into
    # (-0.25, 0.25) around the node id.
    perm = np.argpartition(node - score * (0.25 / scale if scale > 0 else 0.0), boundaries)
    new_side = np.empty(num_points, bool)
    new_side[perm] = left_slot
    if step == iterations - 1 or (side is not None and np.array_equal(new_side, side)):
      break
    side = new_side
    children = sp.csr_matrix((np.ones(num_points, np.float32), perm, child_ptr),
                             shape=(2 * num_nodes, num_points))
    sums = children @ xs
    c0, c1 = _normalise_rows(sums[0::2]), _normalise_rows(sums[1::2])
  return perm


def cluster_targets(label_ids: jax.Array, label_mask: jax.Array, cluster_of_label: jax.Array,
                    num_clusters: int) -> jax.Array:
  """Multi-hot cluster targets: 1 for every cluster that holds one of a point's labels.

  Jittable (``num_clusters`` static). Under ``jit`` the ids are trusted.

  Arguments:
    label_ids: ``(B, Lmax)`` integer label ids, padded.
    label_mask: ``(B, Lmax)`` bool, True where ``label_ids`` holds a label.
    cluster_of_label: ``(L,)`` integer cluster id of each label in
      ``[0, num_clusters)`` (``balanced_kmeans``).
    num_clusters: ``C``.

  Returns:
    ``(B, C)`` float32 of zeros and ones.
  """
  _checks.check_int(label_ids, "label_ids")
  _checks.check_int(cluster_of_label, "cluster_of_label")
  if jnp.ndim(label_ids) != 2:
    raise ValueError(f"label_ids must have shape (B, Lmax), got {jnp.shape(label_ids)}")
  if _checks.dtype_of(label_mask) != jnp.bool_ or jnp.shape(label_mask) != jnp.shape(label_ids):
    raise ValueError(f"label_mask must be a bool array of shape {jnp.shape(label_ids)}, got "
                     f"{_checks.dtype_of(label_mask)} {jnp.shape(label_mask)}")
  if jnp.ndim(cluster_of_label) != 1:
    raise ValueError(f"cluster_of_label must have shape (L,), got {jnp.shape(cluster_of_label)}")
  if not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
    raise ValueError(f"num_clusters must be a positive integer, got {num_clusters!r}")
  return _cluster_targets(label_ids, label_mask, cluster_of_label, int(num_clusters))


@functools.partial(jax.jit, static_argnums=3)
def _cluster_targets(label_ids, label_mask, cluster_of_label, num_clusters):
  clusters = cluster_of_label[jnp.where(label_mask, label_ids, 0)].astype(jnp.int32)
  rows = jnp.arange(label_ids.shape[0])[:, None]
  # Padding goes to column ``num_clusters``, which the scatter drops.
  return jnp.zeros((label_ids.shape[0], num_clusters), jnp.float32).at[
      rows, jnp.where(label_mask, clusters, num_clusters)].set(1.0, mode="drop")
