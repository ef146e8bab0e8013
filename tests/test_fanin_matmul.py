"""fixed_fanin_matmul: values and both gradients against a dense float64 reference.

Every XLA path runs each check: the gather path (``"xla"``) and the label-tile
path (``"xla_tile"``), the latter also with several tiles (``small_tiles``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sparsejax as sj
from _reference import rel_err

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
  layer = sj.FixedFanIn.init(n_in, n_out, k, key=kl, dtype=dtype, index_dtype=index_dtype)
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


def _sparse_vjp(x, layer, g, impl="xla"):
  y, vjp = jax.vjp(lambda x, v: sj.fixed_fanin_matmul(x, v, layer.indices, impl=impl), x,
                   layer.values)
  return (y, *vjp(g))


@pytest.fixture
def small_tiles(monkeypatch):
  """Forces the tile path's row tiles (full tiles + a ragged tail) at test sizes."""
  from sparsejax import fanin_matmul
  monkeypatch.setattr(fanin_matmul, "_TILE_ELEMENTS", 100)


# (impl, fixture that forces several chunks or tiles, or None)
PATHS = [("xla", None), ("xla", "small_chunks"), ("xla_tile", None),
         ("xla_tile", "small_tiles")]


@pytest.mark.parametrize("impl, split", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_matches_dense_float32(case, impl, split, request):
  if split:
    request.getfixturevalue(split)
  layer, x, g = _problem(case, seed=len(request.node.name))
  y, dx, dvalues = jax.jit(_sparse_vjp, static_argnums=3)(x, layer, g, impl)
  ref_dx, ref_dvalues = _dense_grads(x, layer, g)
  w = np.asarray(layer.to_dense(), np.float64)
  assert y.shape == (*case[0], case[2]) and y.dtype == jnp.float32
  assert rel_err(y, np.asarray(x, np.float64) @ w) < 1e-5
  assert rel_err(dx, ref_dx) < 1e-5
  assert rel_err(dvalues, ref_dvalues) < 1e-5
  assert dx.dtype == x.dtype and dvalues.dtype == layer.values.dtype


@pytest.mark.parametrize("impl", ["xla", "xla_tile"])
def test_random_configurations_match_dense(impl):
  # Fresh shapes each run; the seed is in the failure message so a failure can be replayed.
  seed = int(np.random.SeedSequence().entropy % 2**31)
  rng = np.random.default_rng(seed)
  for _ in range(4):
    n_in = int(rng.integers(1, 80))
    case = (tuple(int(d) for d in rng.integers(1, 5, size=rng.integers(1, 4))), n_in,
            int(rng.integers(1, 90)), int(rng.integers(1, n_in + 1)),
            [jnp.uint16, jnp.int16, jnp.int32][rng.integers(3)])
    layer, x, g = _problem(case, seed=int(rng.integers(2**31)))
    y, dx, dvalues = jax.jit(_sparse_vjp, static_argnums=3)(x, layer, g, impl)
    ref_dx, ref_dvalues = _dense_grads(x, layer, g)
    ref_y = np.asarray(x, np.float64) @ np.asarray(layer.to_dense(), np.float64)
    assert rel_err(y, ref_y) < 1e-5, (seed, case)
    assert rel_err(dx, ref_dx) < 1e-5, (seed, case)
    assert rel_err(dvalues, ref_dvalues) < 1e-5, (seed, case)


@pytest.mark.parametrize("impl, split", PATHS)
def test_bfloat16_close_to_float64_reference(impl, split, request):
  if split:
    request.getfixturevalue(split)
  layer, x, g = _problem(((64,), 96, 300, 24, jnp.uint16), seed=1, dtype=jnp.bfloat16)
  y, dx, dvalues = jax.jit(_sparse_vjp, static_argnums=3)(x, layer, g, impl)
  assert y.dtype == dx.dtype == dvalues.dtype == jnp.bfloat16
  ref_dx, ref_dvalues = _dense_grads(x, layer, g)
  assert rel_err(y, np.asarray(x, np.float64) @ np.asarray(layer.to_dense(), np.float64)) < 1e-2
  assert rel_err(dx, ref_dx) < 1e-2
  assert rel_err(dvalues, ref_dvalues) < 1e-2


@pytest.mark.parametrize("impl", ["xla", "xla_tile"])
def test_bfloat16_accumulates_in_float32(impl):
  # 256 inputs of 1 + 2^-7: a bf16 running sum would stall at 256 + ...; f32 does not.
  n = 256
  x = jnp.full((1, n), 1 + 2.0**-7, jnp.bfloat16)
  values = jnp.ones((1, n), jnp.bfloat16)
  indices = jnp.arange(n, dtype=jnp.int32)[None]
  y = sj.fixed_fanin_matmul(x, values, indices, impl=impl)
  assert float(y[0, 0]) == pytest.approx(n * (1 + 2.0**-7), rel=4e-3)


@pytest.mark.parametrize("impl", ["xla", "xla_tile"])
def test_check_grads(impl):
  layer, x, _ = _problem(((3,), 12, 10, 4, jnp.int32), seed=2)
  f = lambda x, v: jnp.sum(jnp.sin(sj.fixed_fanin_matmul(x, v, layer.indices, impl=impl)))
  check_grads(f, (x, layer.values), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("impl, split", PATHS)
def test_float64_check_grads_tight(impl, split, request):
  if split:
    request.getfixturevalue(split)
  with jax.enable_x64(True):
    layer, x, _ = _problem(((4,), 10, 6, 3, jnp.int32), seed=3, dtype=jnp.float64)
    f = lambda x, v: jnp.sum(jnp.tanh(sj.fixed_fanin_matmul(x, v, layer.indices,
                                                            impl=impl)) ** 2)
    check_grads(f, (x, layer.values), order=1, modes=["rev"], atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("impl", ["xla", "xla_tile"])
def test_vmap_over_inputs_values_and_indices(impl):
  layers = [sj.FixedFanIn.init(20, 11, 5, key=jax.random.key(i), index_dtype=jnp.int32)
            for i in range(3)]
  values = jnp.stack([layer.values for layer in layers])
  indices = jnp.stack([layer.indices for layer in layers])
  x = jax.random.normal(jax.random.key(9), (3, 4, 20))
  matmul = lambda x, v, i: sj.fixed_fanin_matmul(x, v, i, impl=impl)
  batched = jax.vmap(matmul)(x, values, indices)
  for i, layer in enumerate(layers):
    np.testing.assert_allclose(batched[i], x[i] @ layer.to_dense(), rtol=1e-5, atol=1e-5)
  # Gradients under vmap equal the per-layer gradients.
  loss = lambda x, v, i: jnp.sum(matmul(x, v, i) ** 2)
  dv = jax.vmap(jax.grad(loss, argnums=1))(x, values, indices)
  for i in range(3):
    np.testing.assert_allclose(dv[i], jax.grad(loss, argnums=1)(x[i], values[i], indices[i]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "xla_tile"])
def test_colliding_indices_scatter_add(impl):
  # Every output reads the same 3 columns: dx sums over all (u, k) hitting a column.
  n_out, n_in = 50, 8
  indices = jnp.tile(jnp.array([1, 4, 6], jnp.uint16), (n_out, 1))
  layer = sj.FixedFanIn(jax.random.normal(jax.random.key(0), (n_out, 3)), indices,
                        in_features=n_in)
  x = jax.random.normal(jax.random.key(1), (2, n_in))
  dx = jax.grad(lambda x: jnp.sum(sj.fixed_fanin_matmul(x, layer.values, layer.indices,
                                                        impl=impl)))(x)
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
  layer = sj.FixedFanIn.init(16, 8, 3, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 16))
  f = jax.jit(lambda x, v: sj.fixed_fanin_matmul(x, v, layer.indices))
  np.testing.assert_allclose(f(x, layer.values), x @ layer.to_dense(), rtol=1e-5, atol=1e-6)
  bad = np.asarray(layer.indices).astype(np.int32)
  bad[5, 0] = 16
  with pytest.raises(ValueError, match="row 5"):
    jax.jit(lambda x: sj.fixed_fanin_matmul(x, layer.values, bad))(x)


@pytest.mark.parametrize("impl", ["xla", "xla_tile"])
def test_repeated_column_in_a_row_counts_twice_on_every_path(impl):
  # Traced indices are trusted; a repeat must then mean the same on every path.
  x = jax.random.normal(jax.random.key(0), (3, 6))
  values = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  indices = jnp.array([[2, 2], [0, 5]], jnp.int32)
  f = jax.jit(lambda x, v, i: sj.fixed_fanin_matmul(x, v, i, impl=impl))
  y, vjp = jax.vjp(lambda x, v: f(x, v, indices), x, values)
  np.testing.assert_allclose(y[:, 0], 3.0 * x[:, 2], rtol=1e-6)
  g = jnp.ones_like(y)
  dx, dv = vjp(g)
  np.testing.assert_allclose(dv[0], jnp.full(2, jnp.sum(x[:, 2])), rtol=1e-6)
  np.testing.assert_allclose(dx[:, 2], jnp.full(3, 3.0), rtol=1e-6)


def test_tile_path_inside_shard_map():
  # Rows split over 8 devices: each shard's tile matmul and gradients equal one device's.
  from jax.sharding import PartitionSpec as P
  mesh = sj.xmc.mesh_from_spec("labels:8")
  layer = sj.FixedFanIn.init(24, 40, 5, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (6, 24))

  def loss(x, values, indices):
    return jnp.sum(jnp.sin(sj.fixed_fanin_matmul(x, values, indices, impl="xla_tile")))

  def sharded(x, values, indices):
    per_shard = jax.shard_map(lambda x, v, i: jax.lax.psum(loss(x, v, i), "labels"),
                              mesh=mesh, in_specs=(P(), P("labels"), P("labels")), out_specs=P())
    return per_shard(x, values, indices)

  want = jax.grad(loss, argnums=(0, 1))(x, layer.values, layer.indices)
  got = jax.jit(jax.grad(sharded, argnums=(0, 1)))(x, layer.values, layer.indices)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_tile_kernels_through_the_custom_vjp(dtype):
  # impl="interpret_tile": the fused tile kernels (Pallas interpret mode) behind the op's VJP.
  case = ((2, 3), 40, 33, 7, jnp.int16)
  layer, x, g = _problem(case, seed=4, dtype=dtype)
  y, dx, dvalues = jax.jit(_sparse_vjp, static_argnums=3)(x, layer, g, "interpret_tile")
  ref_dx, ref_dvalues = _dense_grads(x, layer, g)
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  assert y.dtype == dx.dtype == dvalues.dtype == dtype
  assert rel_err(y, np.asarray(x, np.float64) @ np.asarray(layer.to_dense(), np.float64)) < tolerance
  assert rel_err(dx, ref_dx) < tolerance
  assert rel_err(dvalues, ref_dvalues) < tolerance


def test_tile_rows_fit_the_budget_in_multiples_of_256():
  from sparsejax import fanin_matmul
  assert fanin_matmul.tile_rows(768, 65_536) == 65_536  # one chunk of the GPU default: one tile
  rows = fanin_matmul.tile_rows(768, 3_000_000)
  assert rows % 256 == 0 and rows * 768 <= fanin_matmul._TILE_ELEMENTS < (rows + 256) * 768
  assert fanin_matmul.tile_rows(2**27, 10) == 1  # a row larger than the budget: one at a time
