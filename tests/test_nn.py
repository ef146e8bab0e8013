"""Flax NNX modules: training leaves topology alone; orbax round-trips the state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax.nn import FixedFanInLinear, Indices, Mask, MaskedLinear


def _train_steps(model, steps=3):
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, model.in_features))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
    optimizer.update(model, grads)
    return loss, grads

  losses = []
  for _ in range(steps):
    loss, grads = step(model, optimizer)
    losses.append(float(loss))
  return losses, grads


def test_fixed_fanin_linear_matches_functional_layer():
  model = FixedFanInLinear(30, 12, 4, rngs=nnx.Rngs(0))
  # The module draws from rngs.params(): a fresh Rngs(0) gives the same first key.
  functional = sj.FixedFanIn.init(30, 12, 4, key=nnx.Rngs(0).params())
  np.testing.assert_array_equal(model.indices[...], functional.indices)
  np.testing.assert_array_equal(model.values[...], functional.values)
  assert model.indices[...].dtype == jnp.uint16
  x = jax.random.normal(jax.random.key(2), (5, 30))
  np.testing.assert_allclose(model(x), functional(x), rtol=1e-6)


@pytest.mark.parametrize("make, topology", [
    (lambda: FixedFanInLinear(20, 10, 3, rngs=nnx.Rngs(0)), "indices"),
    (lambda: MaskedLinear(20, 10, 3, rngs=nnx.Rngs(0)), "mask"),
])
def test_optimizer_updates_params_and_leaves_topology(make, topology):
  model = make()
  before = jax.tree.map(np.array, nnx.state(model))
  losses, grads = _train_steps(model)
  assert losses[-1] < losses[0]
  # Gradients exist only for Params; the topology variable is not in them.
  assert topology not in grads and "bias" in grads
  after = nnx.state(model)
  np.testing.assert_array_equal(before[topology][...], after[topology][...])
  weights = "values" if topology == "indices" else "weight"
  assert not np.array_equal(before[weights][...], after[weights][...])


def test_masked_linear_training_keeps_masked_weights_zero():
  model = MaskedLinear(16, 8, 2, rngs=nnx.Rngs(3))
  _train_steps(model, steps=5)
  weight, mask = np.asarray(model.weight[...]), np.asarray(model.mask[...])
  assert np.all(weight[~mask] == 0) and np.any(weight[mask] != 0)


def test_variable_types():
  model = FixedFanInLinear(8, 4, 2, use_bias=False, rngs=nnx.Rngs(0))
  assert isinstance(model.indices, Indices) and isinstance(model.values, nnx.Param)
  assert model.bias is None
  assert isinstance(MaskedLinear(8, 4, 2, rngs=nnx.Rngs(0)).mask, Mask)


class _Net(nnx.Module):
  def __init__(self, n_in, *, rngs):
    self.masked = MaskedLinear(n_in, 32, 8, rngs=rngs)
    self.sparse = FixedFanInLinear(32, 50, 6, rngs=rngs)
    self.wide = FixedFanInLinear(70_000, 3, 2, use_bias=False, rngs=rngs)  # int32 indices

  def __call__(self, x):
    return self.sparse(jax.nn.relu(self.masked(x)))


def test_orbax_roundtrip_restores_every_variable_bit_exact(tmp_path):
  model = _Net(16, rngs=nnx.Rngs(0))
  _train_steps(model.sparse, steps=2)
  _, state = nnx.split(model)
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
  # A fresh model from another seed, restored from disk, must equal the saved one.
  abstract = nnx.eval_shape(lambda: _Net(16, rngs=nnx.Rngs(1)))
  graphdef, abstract_state = nnx.split(abstract)
  with ocp.StandardCheckpointer() as ckpt:
    restored_state = ckpt.restore(path, abstract_state)
  restored = nnx.merge(graphdef, restored_state)
  saved_leaves = jax.tree.leaves(state)
  restored_leaves = jax.tree.leaves(nnx.state(restored))
  assert len(saved_leaves) == len(restored_leaves) == 8
  for a, b in zip(saved_leaves, restored_leaves):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert restored.sparse.indices[...].dtype == jnp.uint16
  assert restored.wide.indices[...].dtype == jnp.int32
  x = jax.random.normal(jax.random.key(4), (2, 16))
  np.testing.assert_array_equal(restored(x), model(x))


def test_embedding_bag_is_the_sparse_linear_map():
  bag = sj.nn.EmbeddingBag(50, 6, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 50, (4, 7)).astype(np.int32)
  weights = rng.normal(size=(4, 7)).astype(np.float32)
  mask = rng.random((4, 7)) < 0.7
  ids[~mask] = 49  # padding may hold any id; masked entries must not count
  dense = np.zeros((4, 50))
  for b, f in zip(*np.nonzero(mask)):
    dense[b, ids[b, f]] += weights[b, f]  # a repeated id adds up, as in x @ E
  table = np.asarray(bag.embedding[...], np.float64)
  np.testing.assert_allclose(bag(ids, weights, mask), dense @ table, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bag(ids[0]), table[ids[0]].sum(0), rtol=1e-5)  # weights 1
  # Its gradient is the dense one, rows of ids never seen stay exactly zero.
  grad = nnx.grad(lambda m: jnp.sum(m(ids, weights, mask) ** 2))(bag)["embedding"][...]
  out = dense @ table
  np.testing.assert_allclose(grad, 2 * dense.T @ out, rtol=1e-4, atol=1e-5)
  unseen = np.setdiff1d(np.arange(50), ids[mask])
  assert not np.asarray(grad)[unseen].any()


def test_embedding_bag_rejects_bad_input():
  bag = sj.nn.EmbeddingBag(10, 3, rngs=nnx.Rngs(0))
  ids = jnp.array([[1, 2], [3, 10]])
  with pytest.raises(ValueError, match=r"ids\[1, 1\] = 10 is out of range"):
    bag(ids)
  bag(ids, mask=jnp.array([[True, True], [True, False]]))  # masked out: fine
  with pytest.raises(ValueError, match="weights must have the shape"):
    bag(ids, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="mask must be a bool"):
    bag(ids, mask=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="ids must be an integer"):
    bag(jnp.ones((2, 2)))
