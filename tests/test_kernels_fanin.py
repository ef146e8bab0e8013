"""Pallas fixed fan-in kernels against a float64 reference.

On CPU (CI) they run in Pallas interpret mode. ``SPARSEJAX_TEST_COMPILED=1``
runs the same checks on the compiled kernels (on a GPU).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import sparsejax as sj
from _reference import fanin_reference, finite_rel_err
from sparsejax.kernels import fanin

_ENTROPY = np.random.SeedSequence().entropy  # fresh inputs every run; printed on failure
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
_INTERPRET = os.environ.get("SPARSEJAX_TEST_COMPILED") != "1"
_IMPL = "interpret" if _INTERPRET else "pallas"
_SMALL = fanin.Tuning(block_rows=8, block_batch=16)  # several blocks at test sizes


def _case(in_features, out, fan_in, batch, dtype, index_dtype, collide=False):
  rng = np.random.default_rng([_ENTROPY, in_features, out, fan_in, batch])
  if collide:  # every row reads the same few columns: long column runs for dx
    cols = np.tile(np.arange(fan_in), (out, 1))
  else:
    cols = np.argsort(rng.random((out, in_features)), axis=1)[:, :fan_in]
  values = rng.standard_normal((out, fan_in))
  x, g = rng.standard_normal((batch, in_features)), rng.standard_normal((batch, out))
  return (jnp.asarray(x, dtype), jnp.asarray(values, dtype), jnp.asarray(cols, index_dtype),
          jnp.asarray(g, dtype))


_CASES = [
    # in, out, K, batch: ragged rows and batch; exact block multiples; K = in; K = 1 and
    # batch 1; in > 65536 with int32 indices.
    (30, 21, 3, 19), (64, 64, 8, 32), (16, 40, 16, 70), (8, 33, 1, 1), (70_000, 9, 4, 3),
]


@pytest.mark.parametrize("in_features, out, fan_in, batch", _CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_match_float64_reference(in_features, out, fan_in, batch, dtype):
  index_dtype = jnp.int32 if in_features > 65536 else jnp.uint16
  x, values, indices, g = _case(in_features, out, fan_in, batch, dtype, index_dtype)
  blocks = dict(interpret=_INTERPRET, tuning=_SMALL)
  y = fanin.fanin_forward(x, values, indices, **blocks)
  dvalues = fanin.fanin_dvalues(x, g, indices, values_dtype=values.dtype, **blocks)
  dx = fanin.fanin_dx(g, values, indices, in_features=in_features, chunk=8, **blocks)
  y_ref, dvalues_ref, dx_ref = fanin_reference(x, values, indices, g)
  tol = _TOL[dtype]
  assert y.dtype == dtype and y.shape == (batch, out)
  assert dvalues.dtype == dtype and dvalues.shape == values.shape
  assert dx.dtype == jnp.float32 and dx.shape == x.shape
  errors = {name: finite_rel_err(got, want) for name, got, want in
            (("y", y, y_ref), ("dvalues", dvalues, dvalues_ref), ("dx", dx, dx_ref))}
  assert max(errors.values()) < tol, (errors, "entropy", _ENTROPY)


def test_dx_with_heavily_colliding_indices():
  # 200 rows all read columns 0..3: each of those columns sums 200 entries (25 chunks).
  x, values, indices, g = _case(16, 200, 4, 24, jnp.float32, jnp.uint16, collide=True)
  dx = fanin.fanin_dx(g, values, indices, in_features=16, interpret=_INTERPRET, tuning=_SMALL,
                      chunk=8)
  _, _, dx_ref = fanin_reference(x, values, indices, g)
  assert finite_rel_err(dx, dx_ref) < 1e-5, _ENTROPY
  assert not np.any(np.asarray(dx)[:, 4:])  # untouched columns stay exactly zero


def test_interpret_mode_poisons_unwritten_outputs():
  # The guarantee the checks above rely on: an element the kernel does not write is NaN.
  def half_kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  call = pl.pallas_call(half_kernel, grid=(2,), in_specs=[pl.BlockSpec((4,), lambda i: (i,))],
                        out_specs=pl.BlockSpec((4,), lambda i: (i,)),
                        out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True)
  out = np.asarray(call(jnp.ones(8)))
  assert (out[:4] == 1).all() and np.isnan(out[4:]).all()


def test_dispatch_interpret_equals_xla_with_gradients(monkeypatch):
  layer = sj.FixedFanIn.init(40, 50, 6, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 7, 40))  # leading dims are flattened

  def loss(values, x, impl):
    return jnp.sum(jnp.sin(sj.fixed_fanin_matmul(x, values, layer.indices, impl=impl)))

  grads = {impl: jax.grad(loss, argnums=(0, 1))(layer.values, x, impl)
           for impl in ("xla", _IMPL)}
  values = {impl: sj.fixed_fanin_matmul(x, layer.values, layer.indices, impl=impl)
            for impl in ("xla", _IMPL)}
  np.testing.assert_allclose(values[_IMPL], values["xla"], rtol=1e-5, atol=1e-5)
  for a, b in zip(grads[_IMPL], grads["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert sj.resolve_impl() == ("xla" if jax.default_backend() == "cpu" else "pallas")  # auto
  monkeypatch.setenv("SPARSEJAX_KERNELS", _IMPL)
  assert sj.resolve_impl() == _IMPL
  np.testing.assert_allclose(sj.fixed_fanin_matmul(x, layer.values, layer.indices),
                             values["xla"], rtol=1e-5, atol=1e-5)
  monkeypatch.setenv("SPARSEJAX_KERNELS", "cuda")
  with pytest.raises(ValueError, match="SPARSEJAX_KERNELS"):
    sj.fixed_fanin_matmul(x, layer.values, layer.indices)


@pytest.mark.parametrize("collide", [False, True])
def test_sorted_topology_reused_across_calls(collide):
  x, values, indices, g = _case(16, 200, 4, 24, jnp.float32, jnp.uint16, collide=collide)
  order, col_ptr = fanin.sort_topology(indices, 16)
  assert int(col_ptr[-1]) == indices.size and np.all(np.diff(np.asarray(col_ptr)) >= 0)
  flat = np.asarray(indices).reshape(-1)
  assert np.all(np.diff(flat[np.asarray(order)]) >= 0)  # slots in column order
  dx = fanin.fanin_dx_sorted(g, values, order, col_ptr, interpret=_INTERPRET, tuning=_SMALL,
                             chunk=8)
  _, _, dx_ref = fanin_reference(x, values, indices, g)
  assert finite_rel_err(dx, dx_ref) < 1e-5, _ENTROPY
