"""FixedFanIn: init, from_dense/to_dense, validation and checkify checks."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import sparsejax as sj
from _reference import dense_reference, rel_err


@pytest.mark.parametrize("n_in, n_out, k", [(10, 500, 1), (10, 500, 4), (10, 500, 6),
                                            (10, 50, 10), (768, 300, 64), (70_000, 20, 3)])
def test_random_topology_rows_distinct_sorted_in_range(n_in, n_out, k):
  idx = np.asarray(sj.random_topology(n_in, n_out, k, key=jax.random.key(0))).astype(np.int64)
  assert idx.shape == (n_out, k)
  assert np.all(np.diff(idx, axis=1) > 0)  # sorted and distinct
  assert idx.min() >= 0 and idx.max() < n_in


@pytest.mark.parametrize("k", [2, 4])  # 2 uses the resampling path, 4 the dense draw
def test_random_topology_uniform_over_subsets(k):
  n_in, n_out = 6, 60_000
  idx = np.asarray(sj.random_topology(n_in, n_out, k, key=jax.random.key(3)))
  subsets = list(itertools.combinations(range(n_in), k))
  code = {s: i for i, s in enumerate(subsets)}
  counts = np.bincount([code[tuple(r)] for r in idx.tolist()], minlength=len(subsets))
  expected = n_out / len(subsets)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  # dof = 14; P(chi2 > 45) < 1e-4. A biased sampler (e.g. favouring low ids) fails.
  assert chi2 < 45, (chi2, counts)


def test_random_topology_deterministic_per_key():
  a = sj.random_topology(100, 1000, 20, key=jax.random.key(5))
  b = sj.random_topology(100, 1000, 20, key=jax.random.key(5))
  c = sj.random_topology(100, 1000, 20, key=jax.random.key(6))
  assert np.array_equal(a, b)
  assert not np.array_equal(a, c)


def test_init_dtypes_shapes_and_scale():
  layer = sj.FixedFanIn.init(768, 2000, 64, key=jax.random.key(0))
  assert layer.values.shape == layer.indices.shape == (2000, 64)
  assert layer.indices.dtype == jnp.uint16 and layer.values.dtype == jnp.float32
  assert layer.bias.shape == (2000,) and not np.any(layer.bias)
  bound = 1 / np.sqrt(64)
  assert np.abs(layer.values).max() <= bound
  assert np.std(layer.values) == pytest.approx(bound / np.sqrt(3), rel=0.02)
  assert layer.density == 64 / 768
  assert sj.FixedFanIn.init(70_000, 4, 2, key=jax.random.key(0)).indices.dtype == jnp.int32
  no_bias = sj.FixedFanIn.init(8, 4, 2, key=jax.random.key(0), bias=False, dtype=jnp.bfloat16)
  assert no_bias.bias is None and no_bias.values.dtype == jnp.bfloat16


def test_init_same_key_same_bits():
  a = sj.FixedFanIn.init(50, 40, 7, key=jax.random.key(1))
  b = sj.FixedFanIn.init(50, 40, 7, key=jax.random.key(1))
  assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_call_adds_bias_and_matches_dense():
  layer = sj.FixedFanIn.init(30, 20, 5, key=jax.random.key(2))
  layer = layer.replace(bias=jax.random.normal(jax.random.key(3), (20,)))
  x = jax.random.normal(jax.random.key(4), (3, 2, 30))
  assert rel_err(layer(x), dense_reference(x, layer)) < 1e-5
  assert rel_err(jax.jit(lambda layer, x: layer(x))(layer, x), dense_reference(x, layer)) < 1e-5
  single = x[0, 0]  # no batch dimension: (in,) -> (out,)
  assert layer(single).shape == (20,)
  assert rel_err(layer(single), dense_reference(single, layer)) < 1e-5


def test_from_dense_keeps_exactly_top_k_per_output():
  w = np.asarray(jax.random.normal(jax.random.key(0), (40, 25)))
  layer = sj.FixedFanIn.from_dense(w, 6)
  kept = np.asarray(layer.to_dense())
  for u in range(25):
    top = set(np.argsort(-np.abs(w[:, u]))[:6])
    assert set(np.flatnonzero(kept[:, u])) == top
  mask = np.asarray(layer.to_mask())
  np.testing.assert_array_equal(kept, np.where(mask, w, 0))
  assert mask.sum(axis=0).tolist() == [6] * 25


def test_from_dense_carries_bias_and_index_dtype():
  w = jnp.ones((5, 3)) * jnp.arange(5.0)[:, None]
  layer = sj.FixedFanIn.from_dense(w, 2, bias=jnp.ones(3), index_dtype=jnp.int32)
  assert layer.indices.dtype == jnp.int32
  np.testing.assert_array_equal(layer.indices, [[3, 4]] * 3)
  np.testing.assert_array_equal(layer.bias, jnp.ones(3))


def test_pytree_roundtrip_and_grad_wrt_float_leaves():
  layer = sj.FixedFanIn.init(12, 7, 3, key=jax.random.key(0))
  leaves, treedef = jax.tree.flatten(layer)
  assert len(leaves) == 3
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.in_features == 12 and rebuilt.indices is leaves[1]
  x = jax.random.normal(jax.random.key(1), (4, 12))
  grads = jax.grad(lambda layer: jnp.sum(layer(x) ** 2), allow_int=True)(layer)
  assert grads.values.shape == (7, 3) and grads.indices.dtype == jax.dtypes.float0


# --- bad input -----------------------------------------------------------------

def _valid():
  return dict(values=jnp.ones((3, 2)), indices=jnp.array([[0, 1], [1, 2], [2, 3]], jnp.int32),
              in_features=4)


@pytest.mark.parametrize("change, match", [
    (dict(values=jnp.ones(3)), r"values must have shape \(out, K\)"),
    (dict(indices=jnp.zeros((3, 3), jnp.int32)), "indices shape"),
    (dict(indices=jnp.zeros((3, 2))), "integer"),
    (dict(values=jnp.ones((3, 2), jnp.int32)), "floating-point"),
    (dict(indices=jnp.array([[0, 1], [1, 4], [2, 3]], jnp.int32)), r"out of range.*row 1"),
    (dict(indices=jnp.array([[0, 1], [1, 2], [-1, 3]], jnp.int32)), r"out of range.*row 2"),
    (dict(indices=jnp.array([[0, 1], [2, 2], [2, 3]], jnp.int32)), r"row 1 repeats column\(s\) \[2\]"),
    (dict(bias=jnp.ones(4)), r"bias must have shape \(3,\)"),
    (dict(values=jnp.ones((3, 2)).at[2, 0].set(jnp.nan)), r"non-finite value nan at index \(2, 0\)"),
    (dict(bias=jnp.ones(3).at[1].set(jnp.inf)), "bias holds a non-finite"),
    (dict(in_features=1), "fan_in=2 exceeds in_features=1"),
    (dict(indices=jnp.zeros((3, 2), jnp.int8) + jnp.array([0, 1], jnp.int8), in_features=300),
     "cannot hold column ids up to 299"),
])
def test_constructor_rejects_bad_input(change, match):
  with pytest.raises(ValueError, match=match):
    sj.FixedFanIn(**{**_valid(), **change})


@pytest.mark.parametrize("args, kwargs, match", [
    ((8, 4, 0), {}, "fan_in must be a positive integer"),
    ((8, 4, 9), {}, "fan_in=9 exceeds in_features=8"),
    ((8, 0, 2), {}, "out_features must be a positive integer"),
    ((70_000, 4, 2), dict(index_dtype=jnp.uint16), "cannot hold column ids up to 69999"),
    ((40_000, 4, 2), dict(index_dtype=jnp.int16), "cannot hold column ids up to 39999"),
    ((8, 4, 2), dict(index_dtype=jnp.float32), "index_dtype must be an integer"),
    ((8, 4, 2), dict(dtype=jnp.int32), "dtype must be a floating-point dtype"),
])
def test_init_rejects_bad_sizes(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    sj.FixedFanIn.init(*args, key=jax.random.key(0), **kwargs)


def test_from_dense_rejects_nan_and_bad_shapes():
  with pytest.raises(ValueError, match="w holds a non-finite"):
    sj.FixedFanIn.from_dense(jnp.ones((4, 3)).at[1, 1].set(jnp.nan), 2)
  with pytest.raises(ValueError, match=r"w must have shape \(in, out\)"):
    sj.FixedFanIn.from_dense(jnp.ones(4), 2)
  with pytest.raises(ValueError, match="fan_in=5 exceeds"):
    sj.FixedFanIn.from_dense(jnp.ones((4, 3)), 5)


def test_call_rejects_wrong_input_size():
  layer = sj.FixedFanIn(**_valid())
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\)"):
    layer(jnp.ones((2, 5)))


def test_replace_validates():
  layer = sj.FixedFanIn(**_valid())
  with pytest.raises(ValueError, match="repeats"):
    layer.replace(indices=jnp.array([[0, 0], [1, 2], [2, 3]], jnp.int32))
  with pytest.raises(ValueError, match="unknown FixedFanIn fields"):
    layer.replace(weight=1)


def _corrupt(layer, row, col, value):
  # Bypasses validation, as a buggy in-jit update could.
  indices = layer.indices.at[row, col].set(value)
  return jax.tree_util.tree_unflatten(jax.tree.structure(layer), [layer.values, indices, layer.bias])


@pytest.mark.parametrize("value, match", [(9, r"out of range \[0, 8\) in row 3"),
                                          (None, "row 3 repeats")])
def test_checkify_check_names_row(value, match):
  layer = sj.FixedFanIn.init(8, 5, 3, key=jax.random.key(0), index_dtype=jnp.int32)
  value = layer.indices[3, 0] if value is None else value
  bad = _corrupt(layer, 3, 1, value)
  checked = checkify.checkify(jax.jit(lambda layer, x: (sj.check_fixed_fanin(layer), layer(x))[1]))
  err, _ = checked(layer, jnp.ones((2, 8)))
  assert err.get() is None
  err, _ = checked(bad, jnp.ones((2, 8)))
  assert err.get() is not None and re.search(match, err.get())
  with pytest.raises(Exception, match=match):
    bad.check()  # eager: raises at once


def test_constructor_inside_jit_checks_constants_and_trusts_tracers():
  good = _valid()
  bad_indices = np.array([[0, 1], [3, 3], [2, 3]], np.int32)
  with pytest.raises(ValueError, match="row 1 repeats"):
    jax.jit(lambda v: sj.FixedFanIn(v, bad_indices, in_features=4).values)(good["values"])
  # Traced indices cannot be checked at trace time: construction succeeds.
  layer = jax.jit(lambda i: sj.FixedFanIn(good["values"], i, in_features=4).indices)(bad_indices)
  np.testing.assert_array_equal(layer, bad_indices)
