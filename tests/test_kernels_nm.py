"""Pallas MVUE N:M kernels against ``sparsejax.nm_prune`` and a float64 reference.

On CPU (CI) they run in Pallas interpret mode, where an element the kernel does
not write is NaN (``test_kernels_fanin.test_interpret_mode_poisons_unwritten_outputs``).
``SPARSEJAX_TEST_COMPILED=1`` runs the same checks on the compiled kernels (on a GPU).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from _reference import approx_probabilities, mvue_probabilities, z_scores

import sparsejax as sj
from sparsejax.kernels import nm
from sparsejax.mvue import key_data

_ENTROPY = np.random.SeedSequence().entropy  # fresh inputs every run; printed on failure
_INTERPRET = os.environ.get("SPARSEJAX_TEST_COMPILED") != "1"
_IMPL = "interpret" if _INTERPRET else "pallas"
_SMALL_MASK = nm.MaskTuning(groups_per_program=16)  # several, ragged blocks at test sizes
_SMALL_DW = nm.DwTuning(block_in=16, block_out=16, block_groups=16)
_RANDOM = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx")]


def _x(shape, dtype, salt):
  rng = np.random.default_rng([_ENTROPY, *shape, salt])
  x = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))
  x[rng.random(shape) < 0.15] = 0.0  # zero entries and some all-zero groups
  return jnp.asarray(x, dtype)


def _assert_same_pruning(out, ref, method, dtype):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(out).all(), _ENTROPY  # unwritten (NaN-poisoned) elements fail here
  if method == "mvue":
    np.testing.assert_array_equal(out, ref, err_msg=str(_ENTROPY))
  else:
    # mvue_approx divides by a sum of products, which XLA and the kernel's compiler may
    # contract (FMA) differently: the same entries, values within a couple of ulps.
    np.testing.assert_array_equal(out != 0, ref != 0, err_msg=str(_ENTROPY))
    np.testing.assert_allclose(out, ref, rtol=4e-7 if dtype == jnp.float32 else 8e-3)


# Groups along the first, a middle and the last axis; ragged blocks; a single group.
_MASK_CASES = ([(*nmm, jnp.float32, shape, axis) for nmm in _RANDOM
                for shape, axis in [((40, 24), 0), ((3, 8, 5), 1), ((2, 3, 4, 28), 3), ((1, 4), 1)]]
               + [(*nmm, jnp.bfloat16, (2, 12, 7), 1) for nmm in _RANDOM])


@pytest.mark.parametrize("n, m, method, dtype, shape, axis", _MASK_CASES)
def test_mask_kernel_equals_nm_prune(n, m, method, dtype, shape, axis):
  x = _x(shape, dtype, m)
  key = jax.random.key(int(np.random.default_rng(_ENTROPY).integers(2**31)))
  out = nm.nm_prune_kernel(x, key_data(key), m=m, method=method, axis=axis,
                           interpret=_INTERPRET, tuning=_SMALL_MASK)
  assert out.shape == x.shape and out.dtype == x.dtype
  ref = sj.nm_prune(x, key=key, n=n, m=m, method=method, axis=axis)
  _assert_same_pruning(out, ref, method, dtype)


@pytest.mark.parametrize("n, m, method", _RANDOM)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_groups_pass_the_kernels_unchanged(n, m, method, dtype):
  # As nm_prune: a group holding a NaN or inf comes out as it went in, the rest keeps its bits.
  x = _x((24, 6), dtype, m)
  bad = x.at[m + 1, 0].set(jnp.nan).at[2 * m, 3].set(-jnp.inf)  # groups along axis 0
  poisoned = np.zeros(x.shape, bool)
  poisoned[m:2 * m, 0] = poisoned[2 * m:3 * m, 3] = True
  key = jax.random.key(5)
  prune = lambda x: np.asarray(nm.nm_prune_kernel(x, key_data(key), m=m, method=method, axis=0,
                                                  interpret=_INTERPRET, tuning=_SMALL_MASK),
                               np.float32)
  out, clean = prune(bad), prune(x)
  np.testing.assert_array_equal(out[poisoned], np.asarray(bad, np.float32)[poisoned])
  assert np.isnan(out[m + 1, 0]) and out[2 * m, 3] == -np.inf
  np.testing.assert_array_equal(out[~poisoned].view(np.uint32), clean[~poisoned].view(np.uint32))
  ref = np.asarray(sj.nm_prune(bad, key=key, n=n, m=m, method=method, axis=0), np.float32)
  np.testing.assert_array_equal(out[poisoned], ref[poisoned])
  _assert_same_pruning(out[~poisoned], ref[~poisoned], method, dtype)
  # The fused dW: the poisoned dY columns make their dW columns non-finite, and only those.
  dw = np.asarray(nm.pruned_weight_grad(jnp.ones((24, 5), dtype), bad, key_data(key), m=m,
                                        method=method, interpret=_INTERPRET, tuning=_SMALL_DW))
  assert np.isnan(dw[:, 0]).all() and not np.isfinite(dw[:, 3]).any()
  assert np.isfinite(dw[:, [1, 2, 4, 5]]).all()


@pytest.mark.parametrize("n, m, method", _RANDOM)
def test_mask_kernel_is_unbiased(n, m, method):
  # The library's z-test, with replicates from group numbers instead of keys: row r of
  # the (draws, size) input is x again, so its groups draw fresh uniforms.
  rng = np.random.default_rng(1)
  size, draws = 256, 2000
  x = (rng.lognormal(0, 1.5, size) * rng.choice([-1, 1], size)).astype(np.float32)
  samples = np.asarray(nm.nm_prune_kernel(jnp.tile(jnp.asarray(x), (draws, 1)),
                                          key_data(jax.random.key(11)), m=m, method=method,
                                          axis=1, interpret=_INTERPRET), np.float64)
  x64 = x.astype(np.float64)
  groups = x64.reshape(-1, m)
  p = (np.concatenate([approx_probabilities(g) for g in groups]) if method == "mvue_approx"
       else np.concatenate([mvue_probabilities(g, n) for g in groups]))
  assert z_scores(x64, samples, p).max() < stats.norm.isf(1e-3 / (2 * size))
  kept = (samples.reshape(draws, -1, m) != 0).sum(-1)
  assert kept.max() == n and kept.min() == n  # no zero entries in x: exactly n per group


@pytest.mark.parametrize("n, m, method, dtype, tokens, ins, outs, splits", [
    *[(*nmm, jnp.float32, 64, 32, 48, 1) for nmm in _RANDOM],  # several blocks in every dim
    (2, 4, "mvue", jnp.bfloat16, 36, 20, 33, 1),  # ragged tokens, inputs and outputs
    (1, 2, "mvue", jnp.float32, 2, 1, 1, 4),  # one token group, one input, one output
    (2, 4, "mvue_approx", jnp.bfloat16, 8, 17, 16, 1),
    (1, 2, "mvue", jnp.float32, 200, 32, 48, 3),  # 7 token steps in 3 ranges: a ragged last one
    (2, 4, "mvue", jnp.bfloat16, 256, 20, 33, 2)])
def test_fused_weight_grad_matches_float64_reference(n, m, method, dtype, tokens, ins, outs,
                                                     splits):
  x, g = _x((tokens, ins), dtype, 1), _x((tokens, outs), dtype, 2)
  key = jax.random.key(int(np.random.default_rng(_ENTROPY).integers(2**31)))
  dw = nm.pruned_weight_grad(x, g, key_data(key), m=m, method=method, interpret=_INTERPRET,
                             tuning=_SMALL_DW._replace(splits=splits))
  assert dw.shape == (ins, outs) and dw.dtype == jnp.float32
  pruned = np.asarray(sj.nm_prune(g, key=key, n=n, m=m, method=method, axis=0), np.float64)
  ref = np.asarray(x, np.float64).T @ pruned
  err = np.linalg.norm(np.asarray(dw, np.float64) - ref) / max(np.linalg.norm(ref), 1e-30)
  assert np.isfinite(np.asarray(dw)).all() and err < (1e-5 if dtype == jnp.float32 else 1e-2), (
      err, _ENTROPY)


@jax.default_matmul_precision("highest")  # no TF32 in the XLA matmuls on a GPU
def test_dispatch_prune_grad_and_pruned_linear(monkeypatch):
  k = jax.random.split(jax.random.key(0), 4)
  x, w = jax.random.normal(k[0], (3, 8, 12)), jax.random.normal(k[1], (12, 20))
  target = jax.random.normal(k[2], (3, 8, 20))

  def loss(w, x, impl, method):
    y = sj.prune_grad(x @ w, key=k[3], n=2, m=4, method=method, axis=1, impl=impl)
    return jnp.sum(jnp.sin(y) * target)

  for method in ("mvue", "greedy"):  # greedy has no kernel: every impl takes the XLA path
    grads = {impl: jax.grad(loss, argnums=(0, 1))(w, x, impl, method) for impl in ("xla", _IMPL)}
    for a, b in zip(grads[_IMPL], grads["xla"]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def linear_loss(w, x, impl):
    return jnp.sum(jnp.sin(sj.pruned_linear(x, w, key=k[3], n=2, m=4, method="mvue", impl=impl)) * target)

  grads = {impl: jax.grad(linear_loss, argnums=(0, 1))(w, x, impl) for impl in ("xla", _IMPL)}
  for a, b in zip(grads[_IMPL], grads["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  dense_dx = jax.grad(lambda x: jnp.sum(jnp.sin(x @ w) * target))(x)
  np.testing.assert_allclose(grads[_IMPL][1], dense_dx, rtol=1e-5, atol=1e-5)  # x: dense dY
  monkeypatch.setenv("SPARSEJAX_KERNELS", _IMPL)
  np.testing.assert_allclose(jax.grad(linear_loss)(w, x, None), grads["xla"][0], rtol=1e-5,
                             atol=1e-5)


def test_pruned_linear_errors_name_the_problem():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="kernel"):
    sj.pruned_linear(jnp.ones((8, 3)), jnp.ones((4, 2)), key=key, n=2, m=4, method="mvue")
  with pytest.raises(ValueError, match="divisible by 4"):
    sj.pruned_linear(jnp.ones((6, 3)), jnp.ones((3, 2)), key=key, n=2, m=4, method="mvue")
  with pytest.raises(ValueError, match="PRNG key"):
    sj.pruned_linear(jnp.ones((8, 3)), jnp.ones((3, 2)), key=None, n=2, m=4, method="mvue")
