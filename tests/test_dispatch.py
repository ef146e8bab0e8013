"""impl dispatch: what each name selects, and that "auto" only picks paths the backend runs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax import dispatch

# The paths that run compiled on each backend (interpret mode is for tests only).
AVAILABLE = {"cpu": {"xla", "xla_tile"}, "tpu": {"xla", "xla_tile"},
             "gpu": {"xla", "xla_tile", "pallas", "pallas_tile"}}


@pytest.mark.parametrize("backend", sorted(AVAILABLE))
def test_auto_picks_only_paths_the_backend_runs(backend):
  for batch, in_features, out, fan_in in itertools.product(
      (1, 7, 16, 256, 4096), (1, 8, 128, 768, 70_000), (1, 4096, 3_000_000), (1, 8, 64, 128)):
    if fan_in > in_features:
      continue
    choice = dispatch.fanin_choice(backend, batch=batch, in_features=in_features, out=out,
                                   fan_in=fan_in)
    assert choice in AVAILABLE[backend], (backend, batch, in_features, out, fan_in, choice)


def test_auto_resolves_for_this_backend():
  choice = dispatch.resolve_fanin_impl(None, batch=128, in_features=128, out=4096, fan_in=32)
  assert choice in AVAILABLE[jax.default_backend()]


def test_explicit_impls_pass_through_and_env_overrides(monkeypatch):
  shape = dict(batch=4, in_features=8, out=5, fan_in=2)
  for impl in dispatch.FANIN_IMPLS[1:]:
    assert dispatch.resolve_fanin_impl(impl, **shape) == impl
  monkeypatch.setenv("SPARSEJAX_KERNELS", "interpret_tile")
  assert dispatch.resolve_fanin_impl(None, **shape) == "interpret_tile"
  # The N:M ops have no tile algorithm: they take the backend part.
  assert dispatch.resolve_impl(None) == "interpret"
  assert dispatch.resolve_impl("pallas_tile") == "pallas"


def test_unknown_impl_is_named():
  with pytest.raises(ValueError, match="impl .* must be one of .*'gather'"):
    dispatch.resolve_impl("gather")
  with pytest.raises(ValueError, match="got 'tile'"):
    sj.fixed_fanin_matmul(jnp.ones((2, 4)), jnp.ones((3, 2)), jnp.zeros((3, 2), jnp.int32),
                          impl="tile")


def test_auto_matches_the_path_it_picks():
  # "auto" computes exactly what the chosen path computes (same bits).
  layer = sj.FixedFanIn.init(128, 300, 32, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (64, 128))
  choice = dispatch.resolve_fanin_impl(None, batch=64, in_features=128, out=300, fan_in=32)
  got = sj.fixed_fanin_matmul(x, layer.values, layer.indices)
  want = sj.fixed_fanin_matmul(x, layer.values, layer.indices, impl=choice)
  np.testing.assert_array_equal(got, want)
