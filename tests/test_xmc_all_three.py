"""The three methods in one XMC model: MVUE-pruned encoder gradients, a fixed fan-in
classifier under SET, and SμPar's classifier init and learning rate."""

import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.xmc import train
from sparsejax.xmc import XMCModel, read_checkpoint, supar_classifier

SIZES = dict(num_features=64, num_labels=40, embed_dim=32, hidden_layers=2, intermediate=0,
             num_clusters=0)


def _model(grad_prune="", fan_in=8, seed=0):
  return XMCModel(**SIZES, fan_in=fan_in, grad_prune=grad_prune, rngs=nnx.Rngs(seed))


def _grads(model, batch):
  def loss(model):
    z = model.encode(*batch)
    return jnp.sum(jnp.sin(model.classifier(z)))
  return nnx.grad(loss)(model)


def test_grad_prune_keeps_the_init_and_prunes_only_the_mlp_weight_gradients():
  plain, pruned = _model(), _model("mvue:1:2")
  params = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
  for a, b in zip(params(plain), params(pruned)):  # the keys are drawn after every init
    np.testing.assert_array_equal(a, b)
  rng = np.random.default_rng(0)
  batch = (jnp.asarray(rng.integers(0, 64, (16, 5))), jnp.asarray(rng.random((16, 5)), jnp.float32),
           jnp.ones((16, 5), bool))
  g_plain, g_pruned = _grads(plain, batch), _grads(pruned, batch)
  # The input of each MLP layer keeps the dense dY, so the bag's gradient is unchanged...
  np.testing.assert_allclose(g_pruned["bag"]["embedding"][...], g_plain["bag"]["embedding"][...],
                             rtol=1e-5, atol=1e-6)
  # ...while each layer's dW = X^T prune(dY) differs, and the forward is the same.
  for i in range(2):
    dense_dw = np.asarray(g_plain["mlp"][i]["kernel"][...])
    pruned_dw = np.asarray(g_pruned["mlp"][i]["layer"]["kernel"][...])
    assert not np.allclose(dense_dw, pruned_dw)
    assert np.linalg.norm(pruned_dw - dense_dw) < 2 * np.linalg.norm(dense_dw)
  np.testing.assert_array_equal(plain.encode(*batch), pruned.encode(*batch))
  # Inference has no backward pass: model.eval() skips the pruning, so any batch size goes
  # (15 is no multiple of m = 2, which the pruning refuses), and model.train() restores it.
  odd = tuple(b[:15] for b in batch)
  with pytest.raises(ValueError, match="divisible by 2"):
    pruned.encode(*odd)
  pruned.eval()
  np.testing.assert_array_equal(pruned.encode(*odd), plain.encode(*odd))
  pruned.train()
  assert not any(layer.deterministic for layer in pruned.mlp)


def test_supar_classifier_draws_sqrt_3k_std_and_returns_in_over_k():
  model = XMCModel(**{**SIZES, "num_labels": 4000}, fan_in=8, rngs=nnx.Rngs(0))
  multiplier = supar_classifier(model, key=jax.random.key(1))
  assert multiplier == pytest.approx(32 / 8)
  values = np.asarray(model.classifier.values[...])
  assert np.std(values) == pytest.approx(1 / math.sqrt(3 * 8), rel=0.03)
  assert abs(np.mean(values)) < 0.01
  with pytest.raises(ValueError, match="dense"):
    supar_classifier(_model(fan_in=0), key=jax.random.key(1))


def test_all_three_train_and_resume_bit_for_bit(tmp_path):
  flags = dict(num_train=500, num_test=100, num_labels=64, num_features=256, embed_dim=32,
               fan_in=4, hidden_layers=2, batch_size=50, label_chunk=32, epochs=2, set_interval=4,
               warmup_steps=4, eval_every=0, checkpoint_every=3, valid_fraction=0.0,
               grad_prune="mvue:1:2", supar=True)
  out = tmp_path / "run"
  results = train.run(train.Config(output_dir=str(out), **flags), report=lambda line: None)
  assert float(results["epochs"][-1]["loss"]) < float(results["epochs"][0]["loss"])
  assert results["metrics"]["P@1"] > 0
  final = read_checkpoint(out)[1]
  # The pruning keys travel in the checkpoint: resuming from step 18 ends where the run did.
  resumed = tmp_path / "resumed"
  shutil.copytree(out, resumed)
  shutil.rmtree(resumed / "checkpoints" / "20")
  train.run(train.Config(output_dir=str(resumed), **flags), report=lambda line: None)
  again = read_checkpoint(resumed)[1]
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
