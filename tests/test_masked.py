"""MaskedDense: same maths as FixedFanIn with the same topology, masked gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from _reference import rel_err


def test_init_matches_fixed_fanin_with_same_key():
  key = jax.random.key(7)
  sparse = sj.FixedFanIn.init(24, 16, 5, key=key)
  masked = sj.MaskedDense.init(24, 16, 5, key=key)
  np.testing.assert_array_equal(masked.weight, sparse.to_dense())
  np.testing.assert_array_equal(masked.mask.sum(axis=0), np.full(16, 5))
  assert float(masked.density) == pytest.approx(5 / 24)
  x = jax.random.normal(jax.random.key(8), (6, 24))
  assert rel_err(masked(x), sparse(x)) < 1e-6


def test_weight_gradient_is_zero_off_mask_and_matches_sparse():
  key = jax.random.key(1)
  sparse = sj.FixedFanIn.init(20, 9, 4, key=key)
  masked = sj.MaskedDense.init(20, 9, 4, key=key)
  # Nonzero off-mask weights must neither leak into the output nor receive gradient.
  masked = jax.tree_util.tree_unflatten(
      jax.tree.structure(masked), [masked.weight + 5.0 * ~masked.mask, masked.mask, masked.bias])
  x = jax.random.normal(jax.random.key(2), (3, 20))
  np.testing.assert_allclose(masked(x), sparse(x), rtol=1e-5, atol=1e-6)
  dw = jax.grad(lambda w: jnp.sum(jnp.tanh(masked.__class__(w, masked.mask)(x))))(masked.weight)
  assert np.all(np.asarray(dw)[~np.asarray(masked.mask)] == 0)
  dvalues = jax.grad(lambda v: jnp.sum(jnp.tanh(sj.fixed_fanin_matmul(x, v, sparse.indices))))(
      sparse.values)
  rows = np.arange(9)[:, None]
  np.testing.assert_allclose(np.asarray(dw)[np.asarray(sparse.indices), rows], dvalues,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight=jnp.ones((4, 3)), mask=jnp.ones((4, 3))), "mask must be a bool"),
    (dict(weight=jnp.ones((4, 3)), mask=jnp.ones((3, 4), bool)), "mask shape"),
    (dict(weight=jnp.ones(4), mask=jnp.ones(4, bool)), r"weight must have shape \(in, out\)"),
    (dict(weight=jnp.ones((4, 3)), mask=jnp.ones((4, 3), bool), bias=jnp.ones(4)),
     r"bias must have shape \(3,\)"),
    (dict(weight=jnp.ones((4, 3)).at[0, 0].set(jnp.nan), mask=jnp.ones((4, 3), bool)),
     "weight holds a non-finite"),
])
def test_rejects_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sj.MaskedDense(**kwargs)


def test_call_rejects_wrong_input_size():
  layer = sj.MaskedDense.init(6, 3, 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\)"):
    layer(jnp.ones((2, 7)))
