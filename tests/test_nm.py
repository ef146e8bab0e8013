"""Greedy N:M masks and the N:M sparsity check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (1, 4), (4, 8), (3, 3)])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_nm_mask_keeps_top_n_per_group(n, m, axis):
  x = np.asarray(jax.random.normal(jax.random.key(n * 10 + m), (24, 48, 24)))
  mask = np.asarray(sj.nm_mask(x, n, m, axis=axis))
  groups = np.moveaxis(x, axis, -1).reshape(*np.moveaxis(x, axis, -1).shape[:-1], -1, m)
  kept = np.moveaxis(mask, axis, -1).reshape(groups.shape)
  assert np.all(kept.sum(-1) == n)
  ref = np.argsort(-np.abs(groups), axis=-1, kind="stable")[..., :n]
  ref_mask = np.zeros(groups.shape, bool)
  np.put_along_axis(ref_mask, ref, True, axis=-1)
  np.testing.assert_array_equal(kept, ref_mask)
  assert bool(sj.is_nm_sparse(np.where(mask, x, 0), n, m, axis=axis))
  if n < m:
    assert not bool(sj.is_nm_sparse(x, n, m, axis=axis))


def test_nm_mask_ties_keep_lower_index_and_bfloat16():
  x = jnp.array([[1.0, -1.0, 1.0, 0.5]], jnp.bfloat16)
  np.testing.assert_array_equal(sj.nm_mask(x, 2, 4), [[True, True, False, False]])
  np.testing.assert_array_equal(sj.nm_mask(x, 1, 2), [[True, False, True, False]])


def test_is_nm_sparse_counts_nonzeros_and_works_under_jit():
  x = jnp.array([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
  assert bool(jax.jit(lambda x: sj.is_nm_sparse(x, 1, 2))(x))
  assert not bool(sj.is_nm_sparse(x, 1, 4))
  assert bool(sj.is_nm_sparse(x, 2, 4))


@pytest.mark.parametrize("n, m, axis, match", [
    (1, 3, -1, r"length of axis 1 to be divisible by 3, got shape \(4, 8\)"),
    (2, 4, 0, None),
    (3, 2, -1, "1 <= n <= m"),
    (0, 2, -1, "1 <= n <= m"),
    (1, 2, 2, "axis 2 is out of range"),
])
def test_bad_arguments_raise(n, m, axis, match):
  x = jnp.ones((4, 8))
  if match is None:  # a valid call, for contrast
    sj.nm_mask(x, n, m, axis=axis)
    return
  with pytest.raises(ValueError, match=match):
    sj.nm_mask(x, n, m, axis=axis)
  with pytest.raises(ValueError, match=match):
    sj.is_nm_sparse(x, n, m, axis=axis)


def test_nm_mask_rejects_nan():
  with pytest.raises(ValueError, match=r"x holds a non-finite value nan at index \(1, 2\)"):
    sj.nm_mask(jnp.ones((2, 4)).at[1, 2].set(jnp.nan), 2, 4)
