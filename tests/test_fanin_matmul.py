"""fixed_fanin_matmul: values and both gradients against a dense float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sparsejax as sj
from conftest import rel_err

# (batch shape, in, out, K, index dtype)
CASES = [
    ((5,), 16, 9, 1, jnp.uint16),
    ((3,), 16, 9, 16, jnp.int32),  # fan-in = in
    ((2, 3), 40, 33, 7, jnp.int16),
    ((2, 2, 3), 24, 17, 5, jnp.uint16),
    ((1,), 70, 130, 12, jnp.int32),
    ((7,), 33, 1, 4, jnp.uint16),  # a single output
]


def _problem(case, seed, dtype=jnp.float32):
  batch, n_in, n_out, k, index_dtype = case
  kx, kl, kg = jax.random.split(jax.random.key(seed), 3)
  layer = sj.FixedFanIn.init(kl, n_in, n_out, k, dtype=dtype, index_dtype=index_dtype)
  x = jax.random.normal(kx, (*batch, n_in), dtype)
  g = jax.random.normal(kg, (*batch, n_out), dtype)
  return layer, x, g


def _dense_grads(x, layer, g):
  """float64 dx and dW (as (out, K) at the layer's indices) of <x @ W, g>."""
  x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
  w = np.asarray(layer.to_dense(), np.float64)
  dx = g64 @ w.T
  dw = x64.reshape(-1, x64.shape[-1]).T @ g64.reshape(-1, g64.shape[-1])  # (in, out)
  idx = np.asarray(layer.indices).astype(np.int64)
  return dx, dw.T[np.arange(idx.shape[0])[:, None], idx]


def _sparse_vjp(x, layer, g):
  y, vjp = jax.vjp(lambda x, v: sj.fixed_fanin_matmul(x, v, layer.indices), x, layer.values)
  return (y, *vjp(g))


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_matches_dense_float32(case, chunked, request):
  if chunked:
    request.getfixturevalue("small_chunks")
  layer, x, g = _problem(case, seed=len(request.node.name))
  y, dx, dvalues = jax.jit(_sparse_vjp)(x, layer, g)
  ref_dx, ref_dvalues = _dense_grads(x, layer, g)
  w = np.asarray(layer.to_dense(), np.float64)
  assert y.shape == (*case[0], case[2]) and y.dtype == jnp.float32
  assert rel_err(y, np.asarray(x, np.float64) @ w) < 1e-5
  assert rel_err(dx, ref_dx) < 1e-5
  assert rel_err(dvalues, ref_dvalues) < 1e-5
  assert dx.dtype == x.dtype and dvalues.dtype == layer.values.dtype


def test_random_configurations_match_dense():
  # Fresh shapes each run; the seed is in the failure message so a failure can be replayed.
  seed = int(np.random.SeedSequence().entropy % 2**31)
  rng = np.random.default_rng(seed)
  for _ in range(6):
    n_in = int(rng.integers(1, 80))
    case = (tuple(int(d) for d in rng.integers(1, 5, size=rng.integers(1, 4))), n_in,
            int(rng.integers(1, 90)), int(rng.integers(1, n_in + 1)),
            [jnp.uint16, jnp.int16, jnp.int32][rng.integers(3)])
    layer, x, g = _problem(case, seed=int(rng.integers(2**31)))
    y, dx, dvalues = jax.jit(_sparse_vjp)(x, layer, g)
    ref_dx, ref_dvalues = _dense_grads(x, layer, g)
    ref_y = np.asarray(x, np.float64) @ np.asarray(layer.to_dense(), np.float64)
    assert rel_err(y, ref_y) < 1e-5, (seed, case)
    assert rel_err(dx, ref_dx) < 1e-5, (seed, case)
    assert rel_err(dvalues, ref_dvalues) < 1e-5, (seed, case)


def test_bfloat16_close_to_float64_reference():
  layer, x, g = _problem(((64,), 96, 300, 24, jnp.uint16), seed=1, dtype=jnp.bfloat16)
  y, dx, dvalues = jax.jit(_sparse_vjp)(x, layer, g)
  assert y.dtype == dx.dtype == dvalues.dtype == jnp.bfloat16
  ref_dx, ref_dvalues = _dense_grads(x, layer, g)
  assert rel_err(y, np.asarray(x, np.float64) @ np.asarray(layer.to_dense(), np.float64)) < 1e-2
  assert rel_err(dx, ref_dx) < 1e-2
  assert rel_err(dvalues, ref_dvalues) < 1e-2


def test_bfloat16_accumulates_in_float32():
  # 4096 inputs of 1 + 2^-8: a bf16 running sum would stall at 256 + ...; f32 does not.
  n = 256
  x = jnp.full((1, n), 1 + 2.0**-7, jnp.bfloat16)
  values = jnp.ones((1, n), jnp.bfloat16)
  indices = jnp.arange(n, dtype=jnp.int32)[None]
  y = sj.fixed_fanin_matmul(x, values, indices)
  assert float(y[0, 0]) == pytest.approx(n * (1 + 2.0**-7), rel=4e-3)


def test_check_grads():
  layer, x, _ = _problem(((3,), 12, 10, 4, jnp.int32), seed=2)
  f = lambda x, v: jnp.sum(jnp.sin(sj.fixed_fanin_matmul(x, v, layer.indices)))
  check_grads(f, (x, layer.values), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


def test_float64_check_grads_tight():
  with jax.enable_x64(True):
    layer, x, _ = _problem(((4,), 10, 6, 3, jnp.int32), seed=3, dtype=jnp.float64)
    f = lambda x, v: jnp.sum(jnp.tanh(sj.fixed_fanin_matmul(x, v, layer.indices)) ** 2)
    check_grads(f, (x, layer.values), order=1, modes=["rev"], atol=1e-7, rtol=1e-7)


def test_vmap_over_inputs_values_and_indices():
  layers = [sj.FixedFanIn.init(jax.random.key(i), 20, 11, 5, index_dtype=jnp.int32)
            for i in range(3)]
  values = jnp.stack([layer.values for layer in layers])
  indices = jnp.stack([layer.indices for layer in layers])
  x = jax.random.normal(jax.random.key(9), (3, 4, 20))
  batched = jax.vmap(sj.fixed_fanin_matmul)(x, values, indices)
  for i, layer in enumerate(layers):
    np.testing.assert_allclose(batched[i], x[i] @ layer.to_dense(), rtol=1e-5, atol=1e-5)
  # Gradients under vmap equal the per-layer gradients.
  loss = lambda x, v, i: jnp.sum(sj.fixed_fanin_matmul(x, v, i) ** 2)
  dv = jax.vmap(jax.grad(loss, argnums=1))(x, values, indices)
  for i in range(3):
    np.testing.assert_allclose(dv[i], jax.grad(loss, argnums=1)(x[i], values[i], indices[i]),
                               rtol=1e-5, atol=1e-5)


def test_colliding_indices_scatter_add():
  # Every output reads the same 3 columns: dx sums over all (u, k) hitting a column.
  n_out, n_in = 50, 8
  indices = jnp.tile(jnp.array([1, 4, 6], jnp.uint16), (n_out, 1))
  layer = sj.FixedFanIn(jax.random.normal(jax.random.key(0), (n_out, 3)), indices,
                        in_features=n_in)
  x = jax.random.normal(jax.random.key(1), (2, n_in))
  dx = jax.grad(lambda x: jnp.sum(layer(x)))(x)
  col_sums = np.asarray(layer.to_dense()).sum(axis=1)
  np.testing.assert_allclose(dx, np.tile(col_sums, (2, 1)), rtol=1e-5)
  assert np.all(np.asarray(dx)[:, [0, 2, 3, 5, 7]] == 0)


@pytest.mark.parametrize(
    "x_shape, values_shape, indices_shape, indices_dtype, match",
    [
        ((4, 10), (6, 3), (6, 2), jnp.int32, "indices shape"),
        ((4, 10), (6,), (6,), jnp.int32, "values must have shape"),
        ((4, 2), (6, 3), (6, 3), jnp.int32, "exceeds the input size"),
        ((4, 10), (6, 3), (6, 3), jnp.float32, "integer"),
    ],
)
def test_bad_shapes_raise(x_shape, values_shape, indices_shape, indices_dtype, match):
  with pytest.raises(ValueError, match=match):
    sj.fixed_fanin_matmul(jnp.ones(x_shape), jnp.ones(values_shape),
                          jnp.zeros(indices_shape, indices_dtype))


def test_integer_x_raises():
  with pytest.raises(ValueError, match="x must be a floating-point"):
    sj.fixed_fanin_matmul(jnp.ones((2, 5), jnp.int32), jnp.ones((3, 2)),
                          jnp.zeros((3, 2), jnp.int32))


@pytest.mark.parametrize("bad", [10, -1])
def test_concrete_out_of_range_index_names_row(bad):
  indices = jnp.array([[0, 1], [2, 3], [4, bad]], jnp.int32)
  with pytest.raises(ValueError, match=r"indices\[2, 1\] = %d .*row 2" % bad):
    sj.fixed_fanin_matmul(jnp.ones((1, 10)), jnp.ones((3, 2)), indices)


def test_concrete_indices_closed_over_inside_jit():
  layer = sj.FixedFanIn.init(jax.random.key(0), 16, 8, 3)
  x = jax.random.normal(jax.random.key(1), (2, 16))
  f = jax.jit(lambda x, v: sj.fixed_fanin_matmul(x, v, layer.indices))
  np.testing.assert_allclose(f(x, layer.values), x @ layer.to_dense(), rtol=1e-5, atol=1e-6)
  bad = np.asarray(layer.indices).astype(np.int32)
  bad[5, 0] = 16
  with pytest.raises(ValueError, match="row 5"):
    jax.jit(lambda x: sj.fixed_fanin_matmul(x, layer.values, bad))(x)
