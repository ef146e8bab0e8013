"""Label clusters: centroids, balanced hierarchical 2-means, multi-hot cluster targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import xmc
from sparsejax.xmc import clusters


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _planted(num_groups, per_group, dim, noise, seed=0):
  """Points around ``num_groups`` random unit centres, shuffled; and each point's group."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(num_groups, dim)))
  groups = rng.permutation(np.repeat(np.arange(num_groups), per_group))
  return _unit(centres[groups] + noise * rng.normal(size=(groups.size, dim))), groups


def _purity(found, planted):
  """Fraction of points in the majority planted group of their found cluster."""
  return sum(np.bincount(planted[found == c]).max() for c in np.unique(found)) / planted.size


@pytest.mark.parametrize("num_points, num_clusters", [(1000, 16), (1000, 7), (37, 37), (5, 1),
                                                      (100, 3), (2, 2)])
def test_cluster_sizes_differ_by_at_most_one(num_points, num_clusters):
  points = _unit(np.random.default_rng(1).normal(size=(num_points, 8)))
  found = xmc.balanced_kmeans(points, num_clusters, key=jax.random.key(0), iterations=3)
  assert found.dtype == np.int32 and found.shape == (num_points,)
  sizes = np.bincount(found, minlength=num_clusters)
  assert sizes.size == num_clusters and sizes.max() - sizes.min() <= 1


def test_same_key_same_clusters_other_key_other_start():
  points = _unit(np.random.default_rng(2).normal(size=(500, 8)))
  run = lambda seed: xmc.balanced_kmeans(points, 8, key=jax.random.key(seed))
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


@pytest.mark.parametrize("num_groups", [16, 12])
def test_recovers_planted_groups(num_groups):
  # A balanced split can cut a group in two when no hyperplane splits the groups
  # evenly, so purity is averaged over a few draws.
  purity, shuffled = [], []
  for seed in range(3):
    points, groups = _planted(num_groups, 64, 16, noise=0.1, seed=seed)
    found = xmc.balanced_kmeans(points, num_groups, key=jax.random.key(seed))
    purity.append(_purity(found, groups))
    shuffled.append(_purity(np.random.default_rng(seed).permutation(found), groups))
  assert np.mean(purity) > 0.9 and min(purity) > 0.85, purity
  # The bar means something: a random balanced assignment is far below it.
  assert max(shuffled) < 0.5


def test_zero_points_are_placed_by_the_balance():
  points, _ = _planted(4, 25, 8, noise=0.1)
  points[:10] = 0  # labels without training points get zero centroids
  sizes = np.bincount(xmc.balanced_kmeans(points, 4, key=jax.random.key(0)))
  np.testing.assert_array_equal(sizes, [25, 25, 25, 25])


@pytest.mark.parametrize("change, match", [
    (dict(num_clusters=0), "num_clusters"), (dict(num_clusters=11), "num_clusters"),
    (dict(iterations=0), "iterations"), (dict(points=np.ones(10)), "2-D float"),
    (dict(points=np.ones((10, 2), int)), "2-D float"),
    (dict(points=np.full((10, 2), np.nan)), "non-finite")])
def test_balanced_kmeans_rejects_bad_input(change, match):
  args = dict(points=np.ones((10, 2)), num_clusters=2, iterations=2)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    xmc.balanced_kmeans(args.pop("points"), args.pop("num_clusters"), key=jax.random.key(0),
                        **args)


def _csr(rows, num_columns, values=None):
  indptr = np.cumsum([0] + [len(r) for r in rows])
  ids = np.array([c for r in rows for c in r], np.int64)
  dense = np.zeros((len(rows), num_columns))
  vals = np.concatenate([np.asarray(v, float) for v in values]) if values else np.ones(ids.size)
  dense[np.repeat(np.arange(len(rows)), np.diff(indptr)), ids] = vals
  return indptr, ids, vals, dense


def test_label_centroids_match_a_dense_reference():
  # 4 points, 6 features, 5 labels; label 4 has no point.
  f_indptr, f_ids, f_vals, x = _csr([[0, 2], [1, 2, 5], [3], [0, 4]], 6,
                                    [[1.0, 2.0], [0.5, -1.0, 3.0], [4.0], [1.0, 1.0]])
  l_indptr, l_ids, _, y = _csr([[0, 1], [1], [2, 3], [3, 0]], 5)
  key, dim = jax.random.key(3), 3
  got = xmc.label_centroids(f_indptr, f_ids, f_vals, l_indptr, l_ids, num_features=6,
                            num_labels=5, dim=dim, key=key)
  projection = clusters._projection(key, 6, dim)
  want = y.T @ (_unit(x) @ projection)
  norms = np.linalg.norm(want, axis=1, keepdims=True)
  want = np.where(norms > 0, want / np.where(norms > 0, norms, 1), 0)
  assert got.dtype == np.float32 and got.shape == (5, dim)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[4], 0)
  # Same key, same projection; the projection has N(0, 1/dim) entries.
  np.testing.assert_array_equal(got, xmc.label_centroids(
      f_indptr, f_ids, f_vals, l_indptr, l_ids, num_features=6, num_labels=5, dim=dim, key=key))
  wide = clusters._projection(key, 4000, 16)
  assert wide.dtype == np.float32 and abs(np.mean(wide ** 2) * 16 - 1) < 0.05


def test_centroids_then_clusters_group_labels_that_share_points():
  # 8 topics with 8 labels each; a point of topic t uses topic t's features and labels.
  rng = np.random.default_rng(4)
  topics, labels_per_topic, feats_per_topic, num_points = 8, 8, 20, 800
  topic = rng.integers(0, topics, num_points)
  features = [rng.choice(feats_per_topic, 5, replace=False) + t * feats_per_topic for t in topic]
  labels = [rng.choice(labels_per_topic, 2, replace=False) + t * labels_per_topic for t in topic]
  f_indptr, f_ids, f_vals, _ = _csr(features, topics * feats_per_topic,
                                    [rng.uniform(0.5, 1.5, 5) for _ in topic])
  l_indptr, l_ids, _, _ = _csr(labels, topics * labels_per_topic)
  centroids = xmc.label_centroids(f_indptr, f_ids, f_vals, l_indptr, l_ids,
                                  num_features=topics * feats_per_topic,
                                  num_labels=topics * labels_per_topic, dim=32,
                                  key=jax.random.key(0))
  found = xmc.balanced_kmeans(centroids, topics, key=jax.random.key(1))
  assert _purity(found, np.arange(topics * labels_per_topic) // labels_per_topic) > 0.9


@pytest.mark.parametrize("change, match", [
    (dict(feature_indptr=np.array([0, 2, 1, 4])), "feature_indptr"),
    (dict(feature_ids=np.array([0, 1, 2, 6])), r"feature_ids must lie in \[0, 6\)"),
    (dict(feature_values=np.ones(3)), "feature_values"),
    (dict(feature_values=np.array([1, np.inf, 1, 1])), "non-finite"),
    (dict(label_indptr=np.array([0, 1, 3])), "points"),
    (dict(label_ids=np.array([0, 1, 9])), "label_ids"), (dict(dim=0), "dim")])
def test_label_centroids_reject_bad_input(change, match):
  args = dict(feature_indptr=np.array([0, 2, 3, 4]), feature_ids=np.array([0, 1, 2, 5]),
              feature_values=np.ones(4), label_indptr=np.array([0, 1, 2, 3]),
              label_ids=np.array([0, 1, 2]), num_features=6, num_labels=3, dim=2)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    xmc.label_centroids(**args, key=jax.random.key(0))


def test_cluster_targets_multi_hot():
  cluster_of_label = jnp.array([2, 0, 2, 1, 1], jnp.int32)
  label_ids = jnp.array([[0, 2, 4], [3, 9, 9], [0, 0, 0]], jnp.int32)
  label_mask = jnp.array([[True, True, True], [True, False, False], [False] * 3])
  want = np.array([[0, 1, 1], [0, 1, 0], [0, 0, 0]], np.float32)
  got = xmc.cluster_targets(label_ids, label_mask, cluster_of_label, 3)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)
  jitted = jax.jit(xmc.cluster_targets, static_argnums=3)
  np.testing.assert_array_equal(jitted(label_ids, label_mask, cluster_of_label, 3), want)
  with pytest.raises(ValueError, match="label_mask"):
    xmc.cluster_targets(label_ids, label_mask[:, :2], cluster_of_label, 3)
  with pytest.raises(ValueError, match="num_clusters"):
    xmc.cluster_targets(label_ids, label_mask, cluster_of_label, 0)
