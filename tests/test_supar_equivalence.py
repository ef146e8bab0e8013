"""SμPar at density 1 is μP, bit for bit: the same parameters after training steps, for the
byte LM of ``experiments/supar/sweep.py`` and the MLP of ``experiments/supar/coord_check.py``.

Both are built, initialised and trained exactly as those scripts do (same keys, the same
optimizer chain), with weight decay on and a width multiplier ``m_d = 8/3`` that is not a
power of two, so that any change in init draws, LR or decay multipliers, or in the order of
their floating-point operations shows in the bits.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from experiments.supar import coord_check, sweep
from sparsejax import supar
from sparsejax._tree import path_name

_STEPS = 3
_LM = sweep.Config(width=16, base_width=6, depth=1, heads=2, context=16, batch=4, steps=20,
                   warmup=1, weight_decay=0.1, seeds=1)


def _leaves(params) -> dict[str, np.ndarray]:
  return {path_name(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_bit_identical(mup, supar_):
  """Every leaf of every step's params has the same dtype, shape and bytes."""
  for t, (a, b) in enumerate(zip(mup, supar_, strict=True)):
    a, b = _leaves(a), _leaves(b)
    assert a.keys() == b.keys()
    for name in sorted(a):
      assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, (t, name)
      assert a[name].tobytes() == b[name].tobytes(), (
          f"step {t}, {name}: max |μP - SμPar| = {np.max(np.abs(a[name] - b[name]))}")


def _assert_trained(trajectory):
  """The steps moved every hidden weight (a check of frozen params would prove nothing)."""
  first, last = _leaves(trajectory[0]), _leaves(trajectory[-1])
  hidden = [k for k in first if first[k].ndim == 2 and np.issubdtype(first[k].dtype, np.floating)]
  assert hidden and all(not np.array_equal(first[k], last[k]) for k in hidden)


def _lm_trajectory(name, config, data):
  """The sweep's build_model, make_optimizer and training step; params after 0..3 steps."""
  p = sweep._parameterization(config, name, config.width, 4.0)
  model_key, data_key = sweep._seed_keys(config, 0)
  model, specs = sweep.build_model(config, p, 1.0, key=model_key)
  assert {s.density for s in specs.values()} == {1.0}
  graphdef, params, rest = sweep.split_model(model)
  fns = sweep.run_fns(graphdef, sweep.make_optimizer(specs, p, config), config, steps=1)
  train, state, out = jax.jit(fns.train), fns.init(params), [params]
  for t in range(_STEPS):
    (params, state), _ = train(params, state, rest, data, data_key, jnp.float32(0.05),
                               jnp.int32(t))
    out.append(params)
  return out


# "dense" is what the sweep builds at density 1 (nnx.Linear); the others force its sparse
# classes with every input kept (slow: a compiled step each).
@pytest.mark.parametrize("hidden", ["dense", pytest.param("masked", marks=pytest.mark.slow),
                                    pytest.param("fixed_fanin", marks=pytest.mark.slow)])
def test_byte_lm_supar_at_density_one_trains_bit_identical_to_mup(hidden, monkeypatch):
  config = dataclasses.replace(_LM, layer="masked" if hidden == "dense" else hidden)
  if hidden != "dense":  # the sweep's sparse class with every input kept, not nnx.Linear
    cls = {"masked": sj.nn.MaskedLinear, "fixed_fanin": sj.nn.FixedFanInLinear}[hidden]
    monkeypatch.setattr(sweep, "sparse_linear", lambda density, layer: (
        lambda n_in, n_out, rngs: cls(n_in, n_out, n_in, rngs=rngs)))
  data = jnp.asarray(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
  mup = _lm_trajectory("mup", config, data)
  _assert_trained(mup)
  _assert_bit_identical(mup, _lm_trajectory("supar", config, data))
  # The same comparison tells SP apart: its hidden init std is not divided by sqrt(m_d).
  sp = sweep.build_model(config, sweep._parameterization(config, "sp", config.width, 4.0), 1.0,
                         key=sweep._seed_keys(config, 0)[0])[0]
  with pytest.raises(AssertionError, match="max"):
    _assert_bit_identical(mup[:1], [sweep.split_model(sp)[1]])


def _mlp_trajectory(name, layer, coupling):
  """``coord_check.build_mlp`` at density 1 under ``supar.coord_check``'s Adam chain."""
  p = sj.SuPar(name, width=48, base_width=18, init_std=18 ** -0.5, alpha_in=2.0)
  model = coord_check.build_mlp(p, 1.0, key=jax.random.key(3), layer=layer)
  assert {s.density for s in model.specs.values()} == {1.0}
  tx = sj.static_topology(optax.chain(
      optax.scale_by_adam(),
      supar.scale_by_supar(model.specs, p, weight_decay=0.1, decay_coupling=coupling),
      optax.scale(-1e-2)))
  batch = coord_check.fixed_batch(jax.random.key(4), 32)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda q: model.forward(q, batch)[0], allow_int=True)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state, out = model.params, tx.init(model.params), [model.params]
  for _ in range(_STEPS):
    params, state = step(params, state)
    out.append(params)
  return out


@pytest.mark.parametrize("coupling", ["lr", "independent"])
@pytest.mark.parametrize("layer", ["fixed_fanin", "masked"])
def test_mlp_supar_at_density_one_trains_bit_identical_to_mup(layer, coupling):
  mup = _mlp_trajectory("mup", layer, coupling)
  _assert_trained(mup)
  _assert_bit_identical(mup, _mlp_trajectory("supar", layer, coupling))
