"""SET/RigL topology updates: invariants over many steps, RigL, NNX and plain-JAX training."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax import rewiring, topology


def _loss(params, x, y):
  """Mean squared error of the summed layer outputs (all layers have the same out)."""
  pred = sum(layer(x[name]) for name, layer in params.items())
  return jnp.mean((pred - y) ** 2)


def _setup(in_features, out, fan_in, index_dtype=None, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  layer = sj.FixedFanIn.init(in_features, out, fan_in, key=keys[0], index_dtype=index_dtype)
  layer = layer.replace(values=jax.random.normal(keys[1], layer.values.shape))
  return layer


@pytest.mark.parametrize("mode", ["fraction", "threshold"])
def test_set_invariants_over_many_updates(mode):
  # Two layers: one on the O(out K) redraw path (2K <= in), one on the dense draw
  # (2K > in); uint16 and int32 indices.
  params = {"a": _setup(40, 12, 6), "b": _setup(10, 12, 7, index_dtype=jnp.int32, seed=1)}
  interval, end_step, steps = 3, 240, 300
  inner = optax.adam(0.05)
  schedule = dict(prune_fraction=0.5) if mode == "fraction" else dict(
      prune_fraction=None, prune_threshold=0.4)
  tx = sj.set_topology(inner, key=jax.random.key(7), interval=interval, end_step=end_step,
                       **schedule)
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, key):
    traces.append(1)  # runs only while tracing
    x = {name: jax.random.normal(jax.random.fold_in(key, i), (16, layer.in_features))
         for i, (name, layer) in enumerate(params.items())}
    grads = jax.grad(_loss, allow_int=True)(params, x, 1.0)
    plain_updates, _ = optax.with_extra_args_support(inner).update(
        topology._strip_indices(*sj._tree.flatten_layers(grads)), state.inner_state,
        topology._strip_indices(*sj._tree.flatten_layers(params)))
    updates, new_state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), new_state, plain_updates

  rewired_steps = 0
  for t in range(1, steps + 1):
    new_params, new_state, plain = step(params, state, jax.random.key(t))
    rewire = t % interval == 0 and t <= end_step
    for name in params:
      old, new = params[name], new_params[name]
      k, n_in = old.fan_in, old.in_features
      idx = np.asarray(new.indices).astype(np.int64)
      # Every row keeps exactly K distinct in-range columns.
      assert idx.shape == old.indices.shape and idx.min() >= 0 and idx.max() < n_in
      assert all(len(set(row)) == k for row in idx.tolist())
      stepped = np.asarray(old.values + plain[name].values)
      pruned = np.asarray(new.values == 0) & (stepped != 0)
      untouched = ~pruned
      # Untouched slots are bit-identical to the plain inner step.
      np.testing.assert_array_equal(np.asarray(new.values)[untouched], stepped[untouched])
      np.testing.assert_array_equal(idx[untouched], np.asarray(old.indices)[untouched])
      # Regrown values and their Adam moments are zero.
      mu = np.asarray(new_state.inner_state[0].mu[name].values)
      nu = np.asarray(new_state.inner_state[0].nu[name].values)
      assert not mu[pruned].any() and not nu[pruned].any()
      if not rewire:
        assert not pruned.any() and np.array_equal(idx, old.indices)
        continue
      # Only the scheduled slots change, and they were the smallest |w| of their row.
      if mode == "fraction":
        frac = optax.cosine_decay_schedule(0.5, end_step)(t)
        count = int(np.floor(np.float32(frac) * np.float32(k)))
        assert (pruned.sum(axis=1) == count).all()
      else:
        thr = optax.cosine_decay_schedule(0.4, end_step)(t)
        np.testing.assert_array_equal(pruned, np.abs(stepped) < np.float32(thr))
      for row in range(idx.shape[0]):
        if pruned[row].any() and (~pruned[row]).any():
          assert np.abs(stepped[row][pruned[row]]).max() <= np.abs(stepped[row][~pruned[row]]).min()
      rewired_steps += int(pruned.any())
    params, state = new_params, new_state
  assert rewired_steps > 50  # the schedule really rewired, many times
  assert len(traces) == 1  # one compilation: the rewiring is a lax.cond, not Python


def test_nothing_changes_after_end_step_and_same_key_same_topology():
  params = {"a": _setup(50, 30, 8)}
  x = jax.random.normal(jax.random.key(1), (8, 50))

  def run(key, steps):
    tx = sj.set_topology(optax.sgd(0.1), key=key, interval=2, end_step=10)

    @jax.jit
    def step(p, state):
      grads = jax.grad(_loss, allow_int=True)(p, {"a": x}, 0.0)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state

    state, p, history = tx.init(params), params, []
    for _ in range(steps):
      p, state = step(p, state)
      history.append(np.asarray(p["a"].indices))
    return history

  first, again, other = run(jax.random.key(3), 20), run(jax.random.key(3), 20), run(
      jax.random.key(4), 20)
  assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert not np.array_equal(first[9], other[9])
  assert not np.array_equal(first[1], np.asarray(params["a"].indices))  # step 2 rewired
  assert all(np.array_equal(h, first[9]) for h in first[10:])  # end_step = 10


def test_random_regrowth_is_uniform_over_free_columns():
  # One row, in = 12, K = 4, prune 2: the regrown pair is uniform over the free columns
  # (10 of them: the 8 never used plus the 2 just pruned).
  indices = jnp.tile(jnp.array([[0, 3, 6, 9]], jnp.uint16), (30_000, 1))
  pruned = jnp.tile(jnp.array([[True, False, True, False]]), (30_000, 1))
  new = np.asarray(sj.draw_columns(indices, pruned, 12, key=jax.random.key(0)))
  assert (new[:, 1] == 3).all() and (new[:, 3] == 9).all()
  counts = np.bincount(new[:, [0, 2]].ravel(), minlength=12)
  assert counts[3] == counts[9] == 0
  free = counts[[0, 1, 2, 4, 5, 6, 7, 8, 10, 11]]
  expected = 60_000 / 10
  assert ((free - expected) ** 2 / expected).sum() < 33  # chi2, dof 9, p < 1e-4


def test_draw_columns_rejects_bad_input():
  indices, free = jnp.zeros((4, 3), jnp.int32), jnp.ones((4, 3), bool)
  with pytest.raises(ValueError, match="shape"):
    sj.draw_columns(indices, free[:, :2], 8, key=jax.random.key(0))
  with pytest.raises(ValueError, match="bool"):
    sj.draw_columns(indices, free.astype(jnp.int32), 8, key=jax.random.key(0))
  with pytest.raises(ValueError, match="exceeds in_features"):
    sj.draw_columns(indices, free, 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="integer"):
    sj.draw_columns(indices.astype(jnp.float32), free, 8, key=jax.random.key(0))


def test_draw_columns_in_blocks_and_the_all_free_draw():
  # A block of rows drawn at its global first_row is that block of the whole draw; the
  # all-free draw is draw_columns with every slot free, once sorted.
  key = jax.random.key(5)
  for in_features, fan_in in ((24, 6), (10, 7)):  # redraw / dense draw
    whole = sj.random_topology(in_features, 30, fan_in, jnp.int32, key=jax.random.key(1))
    free = jax.random.bernoulli(jax.random.key(2), 0.5, whole.shape)
    redrawn = sj.draw_columns(whole, free, in_features, key=key)
    for start in (0, 10, 20):
      rows = slice(start, start + 10)
      np.testing.assert_array_equal(
          sj.draw_columns(whole[rows], free[rows], in_features, key=key, first_row=start),
          redrawn[rows])
    everything = jnp.ones_like(free)
    np.testing.assert_array_equal(
        rewiring.draw_all_columns(in_features, 30, fan_in, key=key),
        jnp.sort(sj.draw_columns(whole, everything, in_features, key=key), axis=1))


def test_rewire_layer_is_prune_then_regrow():
  layer = _setup(24, 37, 6, seed=2)
  key = jax.random.key(3)
  for prune, pruned_want in (
      (dict(prune_fraction=0.5), rewiring.prune_smallest(layer.values, 0.5)),
      (dict(prune_threshold=0.5), jnp.abs(layer.values) < 0.5)):
    # Blocks of 5 rows and a ragged tail: the same as the whole layer at once.
    new, pruned = rewiring.rewire_layer(layer.indices, layer.values, **prune, key=key,
                                        in_features=24, block_elements=5 * 6)
    np.testing.assert_array_equal(pruned, pruned_want)
    assert new.dtype == layer.indices.dtype
    np.testing.assert_array_equal(new, sj.draw_columns(layer.indices, pruned, 24, key=key))


def test_rewire_layer_argument_errors():
  layer = _setup(10, 4, 3)
  rewire = lambda **kwargs: rewiring.rewire_layer(layer.indices, kwargs.pop("w", layer.values),
                                                  **kwargs)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="exactly one of prune_fraction and prune_threshold"):
    rewire(key=key, in_features=10)
  with pytest.raises(ValueError, match="exactly one of prune_fraction and prune_threshold"):
    rewire(prune_fraction=0.5, prune_threshold=0.1, key=key, in_features=10)
  with pytest.raises(ValueError, match="exactly one regrowth source"):
    rewire(prune_fraction=0.5)
  with pytest.raises(ValueError, match="exactly one regrowth source"):
    rewire(prune_fraction=0.5, key=key, layer_io=(jnp.ones((2, 10)), jnp.ones((2, 4))))
  with pytest.raises(ValueError, match="needs in_features"):
    rewire(prune_fraction=0.5, key=key)
  with pytest.raises(ValueError, match="needs value_grads"):
    rewire(prune_fraction=0.5, candidates=(layer.indices, layer.values))
  with pytest.raises(ValueError, match="shape"):
    rewire(w=layer.values[:2], prune_fraction=0.5, key=key, in_features=10)


def test_rigl_regrowth_matches_dense_gradient():
  in_features, out, k, batch = 30, 17, 5, 9
  layer = _setup(in_features, out, k, seed=3)
  x = jax.random.normal(jax.random.key(1), (batch, in_features))
  g = jax.random.normal(jax.random.key(2), (batch, out))
  pruned = jax.random.bernoulli(jax.random.key(4), 0.4, (out, k))
  new = np.asarray(rewiring.rigl_regrowth_columns(layer.indices, pruned, x, g))
  dense = np.abs(np.asarray(x, np.float64).T @ np.asarray(g, np.float64))  # (in, out)
  idx, pruned = np.asarray(layer.indices), np.asarray(pruned)
  for u in range(out):
    kept = set(idx[u][~pruned[u]].tolist())
    ranked = [i for i in np.argsort(-dense[:, u], kind="stable") if i not in kept]
    want = ranked[:pruned[u].sum()]
    np.testing.assert_array_equal(new[u][pruned[u]], want)
    np.testing.assert_array_equal(new[u][~pruned[u]], idx[u][~pruned[u]])


def test_rigl_in_blocks_equals_one_block(monkeypatch):
  layer = _setup(20, 37, 4, seed=5)
  x = jax.random.normal(jax.random.key(1), (6, 20))
  g = jax.random.normal(jax.random.key(2), (6, 37))
  pruned = jax.random.bernoulli(jax.random.key(4), 0.5, (37, 4))
  whole = rewiring.rigl_regrowth_columns(layer.indices, pruned, x, g)
  monkeypatch.setattr(rewiring, "_RIGL_BLOCK_ELEMENTS", 20 * 5)  # blocks of 5 rows + tail
  np.testing.assert_array_equal(rewiring.rigl_regrowth_columns(layer.indices, pruned, x, g),
                                whole)


def test_rigl_through_the_transform_and_layer_io_errors():
  params = {"clf": _setup(24, 10, 4)}
  x = jax.random.normal(jax.random.key(1), (8, 24))
  tx = sj.set_topology(optax.sgd(0.01), key=jax.random.key(0), interval=1, end_step=5,
                       regrowth="rigl")
  state = tx.init(params)
  grads = jax.grad(_loss, allow_int=True)(params, {"clf": x}, 1.0)
  g = jax.grad(lambda y: jnp.mean((y - 1.0) ** 2))(params["clf"](x))
  updates, _ = jax.jit(tx.update)(grads, state, params, layer_io={"clf": (x, g)})
  new = optax.apply_updates(params, updates)["clf"]
  pruned = np.asarray(new.values == 0)
  want = rewiring.rigl_regrowth_columns(params["clf"].indices, pruned, x, g)
  np.testing.assert_array_equal(new.indices, want)
  with pytest.raises(ValueError, match="needs layer_io"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="no entry for sparse layer 'clf'"):
    tx.update(grads, state, params, layer_io={"other": (x, g)})
  with pytest.raises(ValueError, match="must be"):
    tx.update(grads, state, params, layer_io={"clf": (x, g[:, :3])})


@pytest.mark.parametrize("regrowth", ["random", "rigl"])
def test_rewiring_in_row_blocks(monkeypatch, regrowth):
  # Blocks of 3 rows and a ragged tail: every block prunes its rows' smallest weights
  # and regrows distinct columns, equal to the one-block result (random draws are
  # keyed per row, RigL has no randomness).
  params = {"clf": _setup(24, 11, 4, seed=3)}
  x = jax.random.normal(jax.random.key(1), (8, 24))
  g = jax.random.normal(jax.random.key(2), (8, 11))
  tx = sj.set_topology(optax.sgd(0.01), key=jax.random.key(0), interval=1, end_step=5,
                       prune_fraction=lambda t: 0.5, regrowth=regrowth)
  grads = jax.grad(_loss, allow_int=True)(params, {"clf": x}, 1.0)
  extra = {"layer_io": {"clf": (x, g)}} if regrowth == "rigl" else {}

  def step():
    updates, _ = tx.update(grads, tx.init(params), params, **extra)
    return optax.apply_updates(params, updates)["clf"]

  whole = step()
  monkeypatch.setattr(rewiring, "_REWIRE_BLOCK_ELEMENTS", 3 * 4)
  blocked = step()
  idx = np.asarray(blocked.indices)
  assert all(len(set(row)) == 4 for row in idx.tolist()) and idx.max() < 24
  assert (np.asarray(blocked.values == 0).sum(axis=1) == 2).all()  # floor(0.5 K) per row
  np.testing.assert_array_equal(blocked.values, whole.values)  # the same slots pruned
  np.testing.assert_array_equal(blocked.indices, whole.indices)


def test_argument_errors():
  with pytest.raises(ValueError, match="interval"):
    sj.set_topology(optax.sgd(1.0), key=jax.random.key(0), interval=0, end_step=5)
  with pytest.raises(ValueError, match="exactly one"):
    sj.set_topology(optax.sgd(1.0), key=jax.random.key(0), interval=1, end_step=5,
                    prune_threshold=0.1)
  with pytest.raises(ValueError, match="prune_fraction must be in"):
    sj.set_topology(optax.sgd(1.0), key=jax.random.key(0), interval=1, end_step=5,
                    prune_fraction=1.5)
  with pytest.raises(ValueError, match="regrowth"):
    sj.set_topology(optax.sgd(1.0), key=jax.random.key(0), interval=1, end_step=5,
                    regrowth="grow")
  params = {"a": _setup(10, 4, 2)}
  tx = sj.set_topology(optax.sgd(1.0), key=jax.random.key(0), interval=1, end_step=5)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state)
  grads_without_indices = {"a": {"values": params["a"].values}}
  with pytest.raises(ValueError, match="allow_int=True"):
    tx.update(grads_without_indices, state, params)
  mapping = {"a": {"values": params["a"].values, "indices": params["a"].indices}}
  tx_state = tx.init(mapping)
  with pytest.raises(ValueError, match="in_features"):
    tx.update(jax.tree.map(jnp.zeros_like, mapping), tx_state, mapping)


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.clf = sj.nn.FixedFanInLinear(16, 40, 4, rngs=rngs)

  def __call__(self, x):
    return self.clf(jax.nn.relu(self.hidden(x)))


def test_nnx_optimizer_step_rewires_and_resets_moments():
  model = _Net(nnx.Rngs(0))
  wrt = (nnx.Param, sj.nn.Indices)
  assert sj.sparse_layer_names(nnx.as_pure(nnx.state(model, wrt))) == ["clf"]
  assert sj.sparse_layer_names({"a": {"b": [_setup(8, 4, 2)]}, "w": jnp.ones(3)}) == ["a/b/0"]
  tx = sj.set_topology(optax.adamw(1e-2), key=jax.random.key(1), interval=2, end_step=10,
                       in_features=sj.nn.fixed_fanin_sizes(model))
  assert sj.nn.fixed_fanin_sizes(model) == {"clf": 16}
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  x = jax.random.normal(jax.random.key(2), (32, 6))

  @nnx.jit
  def train_step(model, optimizer):
    loss = lambda m: jnp.mean(m(x) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt), allow_int=True)(model)
    optimizer.update(model, grads)

  before = np.asarray(model.clf.indices[...])
  train_step(model, optimizer)
  np.testing.assert_array_equal(model.clf.indices[...], before)  # step 1: no rewiring
  train_step(model, optimizer)
  after = np.asarray(model.clf.indices[...])
  changed = after != before
  assert changed.any() and model.clf.indices[...].dtype == jnp.uint16
  values = np.asarray(model.clf.values[...])
  mu = np.asarray(optimizer.opt_state.inner_state[0].mu["clf"]["values"][...])
  assert not values[changed].any() and not mu[changed].any()
  assert all(len(set(row)) == 4 for row in after.tolist())


def test_nnx_optimizer_without_the_indices_says_what_to_pass():
  # wrt=nnx.Param hides the topology from the transformation: it fails, naming the fix.
  model = _Net(nnx.Rngs(0))
  tx = sj.set_topology(optax.adamw(1e-2), key=jax.random.key(1), interval=1, end_step=10,
                       in_features=sj.nn.fixed_fanin_sizes(model))
  with pytest.raises(ValueError, match=re.escape(
      "pass wrt=(nnx.Param, sparsejax.nn.Indices) to nnx.Optimizer")) as raised:
    nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert "'clf'" in str(raised.value) and "allow_int=True" in str(raised.value)
  assert "nnx.DiffState(0, wrt)" in str(raised.value)
  with pytest.raises(ValueError, match="no fixed fan-in layer"):
    tx.init({"kernel": jnp.ones((3, 2))})


def test_static_topology_trains_values_and_keeps_indices():
  params = {"a": _setup(20, 8, 3)}
  x = jax.random.normal(jax.random.key(1), (16, 20))
  tx = sj.static_topology(optax.adam(1e-2))
  state = tx.init(params)
  grads = jax.grad(_loss, allow_int=True)(params, {"a": x}, 1.0)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)["a"]
  np.testing.assert_array_equal(new.indices, params["a"].indices)
  assert not np.array_equal(new.values, params["a"].values)


def _teacher_student(use_set: bool, steps: int = 1500) -> float:
  """Plain JAX + optax: regress a sparse teacher whose support the student lacks at first."""
  in_features, out, k, teacher_k = 16, 16, 4, 2
  rng = np.random.default_rng(0)
  teacher_idx = np.stack([rng.choice(in_features, teacher_k, replace=False) for _ in range(out)])
  teacher_w = rng.choice([-1.0, 1.0], (out, teacher_k)) * rng.uniform(1, 2, (out, teacher_k))
  # The student starts on columns the teacher never reads in that row.
  student_idx = np.stack([rng.choice(np.setdiff1d(np.arange(in_features), teacher_idx[u]), k,
                                     replace=False) for u in range(out)])
  params = {"layer": {"values": jnp.zeros((out, k)),
                      "indices": jnp.asarray(student_idx, jnp.int32)}}

  def loss(params, x):
    layer = params["layer"]
    pred = sj.fixed_fanin_matmul(x, layer["values"], layer["indices"])
    target = sj.fixed_fanin_matmul(x, jnp.asarray(teacher_w, jnp.float32),
                                   jnp.asarray(teacher_idx, jnp.int32))
    return jnp.mean((pred - target) ** 2)

  inner = optax.adam(3e-2)
  tx = (sj.set_topology(inner, key=jax.random.key(0), interval=10, end_step=1000,
                        prune_fraction=0.5, in_features={"layer": in_features})
        if use_set else sj.static_topology(inner))
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    x = jax.random.normal(key, (64, in_features))
    value, grads = jax.value_and_grad(loss, allow_int=True)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for t in range(steps):
    params, state, value = step(params, state, jax.random.key(t))
    losses.append(float(value))
  return float(np.mean(losses[-50:]))


def test_plain_jax_regression_needs_set_to_find_the_support():
  # The target's variance is sum w^2 ~ 2 * 2.33 = 4.7 per output; without rewiring the
  # student's columns are independent of it, so its loss cannot fall below that.
  # With SET each teacher column still missed at the end costs w^2 / 16 in [0.06, 0.25]:
  # over 24 keys about half found all 32 (loss ~1e-13), the rest missed one to three
  # (loss 0.09 to 0.53); this key misses one.
  with_set, without = _teacher_student(True), _teacher_student(False)
  assert without > 3.5, without
  assert with_set < 0.25, with_set


def _dense_candidates(indices, x, g, r):
  """The RegrowthCandidates contract from the dense gradient: per row the r best absent columns."""
  out = indices.shape[0]
  score = jnp.abs(x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, out)).T  # (out, in), as RigL's
  score = score.at[jnp.arange(out)[:, None], indices.astype(jnp.int32)].set(-jnp.inf)
  scores, columns = jax.lax.top_k(score, r)
  return sj.RegrowthCandidates(columns.astype(jnp.int32), scores)


def _rigl_step(params, x, g, tx, **extra):
  grads = jax.grad(_loss, allow_int=True)(params, {"clf": x}, 1.0)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, **extra)
  return optax.apply_updates(params, updates)["clf"], state


@pytest.mark.parametrize("in_features, out, k, fraction, extra_r", [
    (24, 10, 4, 0.5, 0),     # R = floor(f_0 K) exactly
    (30, 17, 6, 0.4, 3),     # more candidates than needed
    (9, 12, 5, 0.6, 2),      # R > in - K: -inf entries the merge must skip
    (20, 11, 5, None, 0),    # threshold mode: R = K
])
def test_rigl_candidates_equal_layer_io(monkeypatch, in_features, out, k, fraction, extra_r):
  params = {"clf": _setup(in_features, out, k, seed=in_features)}
  x = jax.random.normal(jax.random.key(1), (8, in_features))
  g = jax.grad(lambda y: jnp.mean((y - 1.0) ** 2))(params["clf"](x))
  schedule = (dict(prune_fraction=fraction) if fraction is not None
              else dict(prune_fraction=None, prune_threshold=0.8))
  tx = sj.set_topology(optax.adam(0.01), key=jax.random.key(0), interval=1, end_step=5,
                       regrowth="rigl", **schedule)
  r = rewiring.max_pruned_per_row(k, fraction) + extra_r
  assert r == (int(np.floor(fraction * k)) if fraction is not None else k) + extra_r
  via_io, io_state = _rigl_step(params, x, g, tx, layer_io={"clf": (x, g)})
  candidates = {"clf": _dense_candidates(params["clf"].indices, x, g, r)}
  via_candidates, state = _rigl_step(params, x, g, tx, regrowth_candidates=candidates)
  pruned = np.asarray(via_io.values == 0)
  assert pruned.any() and (~pruned).any()
  np.testing.assert_array_equal(
      via_io.indices, rewiring.rigl_regrowth_columns(params["clf"].indices, pruned, x, g))
  np.testing.assert_array_equal(via_candidates.indices, via_io.indices)
  np.testing.assert_array_equal(via_candidates.values, via_io.values)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(io_state)):
    np.testing.assert_array_equal(a, b)
  # In blocks of 2 rows and a ragged tail: the same columns.
  monkeypatch.setattr(rewiring, "_REWIRE_BLOCK_ELEMENTS", 2 * k)
  blocked, _ = _rigl_step(params, x, g, tx, regrowth_candidates=candidates)
  np.testing.assert_array_equal(blocked.indices, via_io.indices)


def test_rigl_candidates_on_a_mesh_equal_one_device():
  # 16 rows over 4 label shards (the other 2 x 4 devices replicate), candidates split by rows.
  params = {"clf": _setup(20, 16, 5, seed=2)}
  x = jax.random.normal(jax.random.key(1), (8, 20))
  g = jax.grad(lambda y: jnp.mean((y - 1.0) ** 2))(params["clf"](x))
  candidates = {"clf": _dense_candidates(params["clf"].indices, x, g, 2)}
  mesh = sj.xmc.mesh_from_spec("data:2,labels:4")
  common = dict(key=jax.random.key(0), interval=1, end_step=5, regrowth="rigl",
                prune_fraction=0.5)
  want, _ = _rigl_step(params, x, g, sj.set_topology(optax.adam(0.01), **common),
                       regrowth_candidates=candidates)
  tx = sj.set_topology(optax.adam(0.01), mesh=mesh, **common)
  got, _ = _rigl_step(params, x, g, tx, regrowth_candidates=candidates)
  assert (np.asarray(want.values) == 0).sum() == 16 * 2
  np.testing.assert_array_equal(got.indices, want.indices)
  np.testing.assert_array_equal(got.values, want.values)
  grads = jax.grad(_loss, allow_int=True)(params, {"clf": x}, 1.0)
  with pytest.raises(ValueError, match="with a mesh needs regrowth_candidates"):
    tx.update(grads, tx.init(params), params, layer_io={"clf": (x, g)})


def test_rigl_candidates_errors():
  params = {"clf": _setup(24, 10, 4)}
  x = jax.random.normal(jax.random.key(1), (8, 24))
  g = jax.grad(lambda y: jnp.mean((y - 1.0) ** 2))(params["clf"](x))
  grads = jax.grad(_loss, allow_int=True)(params, {"clf": x}, 1.0)
  candidates = _dense_candidates(params["clf"].indices, x, g, 4)

  def update(tx=None, **extra):
    tx = tx or sj.set_topology(optax.sgd(0.01), key=jax.random.key(0), interval=1, end_step=5,
                               regrowth="rigl", prune_fraction=0.5)
    return tx.update(grads, tx.init(params), params, **extra)

  with pytest.raises(ValueError, match="needs layer_io=.* or regrowth_candidates="):
    update()
  with pytest.raises(ValueError, match="no entry for sparse layer 'clf'"):
    update(regrowth_candidates={"other": candidates})
  with pytest.raises(ValueError, match="not both"):
    update(regrowth_candidates={"clf": candidates}, layer_io={"clf": (x, g)})
  # floor(0.5 * 4) = 2 slots may go per row: 1 candidate is too few.
  with pytest.raises(ValueError, match="has 1 candidates per row, but a row can prune up to 2"):
    update(regrowth_candidates={"clf": sj.RegrowthCandidates(*(a[:, :1] for a in candidates))})
  threshold = sj.set_topology(optax.sgd(0.01), key=jax.random.key(0), interval=1, end_step=5,
                              regrowth="rigl", prune_fraction=None, prune_threshold=0.1)
  with pytest.raises(ValueError, match="can prune up to 4 of its K=4"):
    update(threshold, regrowth_candidates={"clf": sj.RegrowthCandidates(
        *(a[:, :3] for a in candidates))})
  with pytest.raises(ValueError, match=r"must both be \(10, R\)"):
    update(regrowth_candidates={"clf": sj.RegrowthCandidates(*(a[:5] for a in candidates))})
  with pytest.raises(ValueError, match="columns must be integers"):
    update(regrowth_candidates={"clf": (candidates.scores, candidates.scores)})
  with pytest.raises(ValueError, match="rewire must be None .* or False"):
    update(rewire=True, regrowth_candidates={"clf": candidates})
  # An update stated not to rewire needs no RigL input at all.
  update(rewire=False)


def test_rewire_false_traces_no_rewiring_and_is_the_inner_step(monkeypatch):
  params = {"a": _setup(20, 8, 4)}
  x = jax.random.normal(jax.random.key(1), (16, 20))
  grads = jax.grad(_loss, allow_int=True)(params, {"a": x}, 1.0)
  inner = optax.adam(0.05)
  tx = sj.set_topology(inner, key=jax.random.key(3), interval=2, end_step=10)
  state = tx.init(params)
  state = state._replace(count=jnp.asarray(3, jnp.int32))  # update 4 is due to rewire
  rewired, _ = tx.update(grads, state, params)
  not_rewiring = lambda *args: tx.update(*args, rewire=False)
  kept, kept_state = jax.jit(not_rewiring)(grads, state, params)
  assert not np.array_equal(rewired["a"].indices, 0)  # the cond rewired update 4
  # The inner step, indices untouched, the count advanced; the due rewiring is skipped.
  plain, plain_state = jax.jit(inner.update)(
      topology._strip_indices(*sj._tree.flatten_layers(grads)), state.inner_state,
      topology._strip_indices(*sj._tree.flatten_layers(params)))
  np.testing.assert_array_equal(kept["a"].values, plain["a"].values)
  np.testing.assert_array_equal(kept["a"].indices, 0)
  assert kept["a"].indices.dtype == params["a"].indices.dtype
  assert int(kept_state.count) == 4
  for a, b in zip(jax.tree.leaves(kept_state.inner_state), jax.tree.leaves(plain_state)):
    np.testing.assert_array_equal(a, b)
  # On an update not due, the same bits as the cond's no-rewiring branch.
  off = state._replace(count=jnp.asarray(4, jnp.int32))
  by_cond, _ = jax.jit(tx.update)(grads, off, params)
  np.testing.assert_array_equal(by_cond["a"].values, plain["a"].values)
  # Nothing of the rewiring is traced: no cond, no sort, and _rewire_rows is never called.
  def traced(*args):
    raise RuntimeError("traced rewiring")

  monkeypatch.setattr(rewiring, "_rewire_rows", traced)
  jaxpr = str(jax.make_jaxpr(not_rewiring)(grads, state, params))
  assert "cond" not in jaxpr and "sort" not in jaxpr
  with pytest.raises(RuntimeError, match="traced rewiring"):  # a fresh trace, with the cond
    jax.make_jaxpr(lambda *args: tx.update(*args))(grads, state, params)


def test_is_rewire_step_is_the_rule_of_the_cond():
  params = {"a": _setup(20, 8, 4)}
  grads = jax.grad(_loss, allow_int=True)(params, {"a": jnp.ones((4, 20))}, 1.0)
  interval, end_step = 3, 13
  tx = sj.set_topology(optax.sgd(0.0), key=jax.random.key(3), interval=interval,
                       end_step=end_step, prune_fraction=lambda t: 0.5)
  state = tx.init(params)
  update = jax.jit(tx.update)
  due = []
  for t in range(1, 20):
    updates, _ = update(grads, state._replace(count=jnp.asarray(t - 1, jnp.int32)), params)
    rewired = bool(np.any(optax.apply_updates(params, updates)["a"].values == 0))
    assert rewired == sj.is_rewire_step(t, interval=interval, end_step=end_step), t
    assert bool(sj.is_rewire_step(jnp.asarray(t), interval=interval, end_step=end_step)) == rewired
    due.append(rewired)
  assert [t for t, d in enumerate(due, 1) if d] == [3, 6, 9, 12]


def _prune_by_two_argsorts(w, fraction):
  """prune_smallest's first definition: the rank of each |w| in its row, by two argsorts."""
  magnitude = jnp.abs(w.astype(jnp.float32))
  count = jnp.floor(jnp.asarray(fraction, jnp.float32) * w.shape[1]).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(magnitude, axis=1, stable=True), axis=1, stable=True)
  return rank < count


@pytest.mark.parametrize("fan_in", [1, 7, 64])
def test_prune_smallest_equals_the_two_argsort_definition(fan_in):
  keys = jax.random.split(jax.random.key(fan_in), 3)
  ties = jax.random.randint(keys[0], (300, fan_in), -2, 3).astype(jnp.float32)  # |w| in {0, 1, 2}
  odd = jnp.where(jax.random.bernoulli(keys[1], 0.2, ties.shape), jnp.nan, ties)
  odd = odd.at[:, 0].set(-0.0).at[::3, -1].set(-jnp.nan).at[1::3, -1].set(jnp.inf)
  for w in (jax.random.normal(keys[2], (300, fan_in)), ties, odd, ties.astype(jnp.bfloat16)):
    for fraction in (0.0, 0.1, 0.3, 0.5, 0.99, 1.0, 1.5, -0.25):
      np.testing.assert_array_equal(rewiring.prune_smallest(w, fraction),
                                    _prune_by_two_argsorts(w, fraction), err_msg=f"{fraction}")


def _draw_by_full_rounds(key, indices, free, in_features, row_offset, all_free):
  """_draw_columns's first definition: every round redraws and sorts all rows (3 operands)."""
  out, fan_in = indices.shape
  rows = row_offset + jnp.arange(out, dtype=jnp.int32)

  def draw(step):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, step), rows)
    return jax.vmap(lambda k: jax.random.randint(k, (fan_in,), 0, in_features))(keys)

  def repeated(cols):
    return jnp.concatenate([jnp.zeros((out, 1), bool), cols[:, 1:] == cols[:, :-1]], axis=1)

  def sort_rows(*state):
    return jax.lax.sort(state, dimension=1, num_keys=2, is_stable=True)

  slots = jnp.broadcast_to(jnp.arange(fan_in, dtype=jnp.int32), (out, fan_in))
  cols, free, slots = sort_rows(jnp.where(free, draw(0), indices.astype(jnp.int32)),
                                free.astype(jnp.int32), slots)
  step = 1
  while repeated(cols).any():
    cols, free, slots = sort_rows(jnp.where(repeated(cols), draw(step), cols), free, slots)
    step += 1
  if all_free:
    return cols
  return jnp.zeros((out, fan_in), jnp.int32).at[jnp.arange(out)[:, None], slots].set(cols)


@pytest.mark.parametrize("out,fan_in,in_features", [
    (1001, 16, 40),     # many rounds, (column, free, position, slot) in one int32 key
    (61, 4096, 8192),   # 4096 slots: too many bits for one key, the 3-operand sort
    (503, 5, 300_000),  # few repeats, 19-bit columns
])
def test_draw_columns_equals_redrawing_all_rows_every_round(monkeypatch, out, fan_in,
                                                            in_features):
  # Small compaction levels, so rows are gathered level after level (1001 -> 250 -> ...).
  monkeypatch.setattr(rewiring, "_COMPACT_MIN_ROWS", 4)
  keys = jax.random.split(jax.random.key(out), 3)
  indices = sj.random_topology(in_features, out, fan_in, jnp.int32, key=keys[0])
  free = jax.random.bernoulli(keys[1], 0.4, (out, fan_in))
  new, rounds = rewiring._draw_columns(keys[2], indices, free, in_features, 17,
                                       all_free=False, with_rounds=True)
  np.testing.assert_array_equal(
      new, _draw_by_full_rounds(keys[2], indices, free, in_features, 17, False))
  everything = jnp.ones_like(free)
  np.testing.assert_array_equal(
      rewiring._draw_columns(keys[2], indices, everything, in_features, all_free=True),
      _draw_by_full_rounds(keys[2], indices, everything, in_features, 0, True))
  if in_features < 10_000:
    assert rounds > 3  # the compacted levels really redrew


def test_rewiring_in_accelerator_blocks_same_bits_and_set_invariants(monkeypatch):
  # In blocks of 5 rows (as on CPU, shrunk) or all in one (the GPU/TPU block size, where
  # the draw also gathers the still-repeating rows, shrunk too), the same topology.
  monkeypatch.setattr(rewiring, "_COMPACT_MIN_ROWS", 8)
  in_features, out, fan_in = 20, 203, 8
  params = {"clf": _setup(in_features, out, fan_in, seed=4)}
  x = jax.random.normal(jax.random.key(1), (8, in_features))
  grads = jax.grad(_loss, allow_int=True)(params, {"clf": x}, 1.0)
  tx = sj.set_topology(optax.adam(0.01), key=jax.random.key(2), interval=2, end_step=9,
                       prune_fraction=lambda t: 0.5)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)  # update 1 does not rewire: moments nonzero

  def rewiring_update(backend):
    with monkeypatch.context() as patch:
      patch.setattr(jax, "default_backend", lambda: backend)
      patch.setattr(rewiring, "_REWIRE_BLOCK_ELEMENTS", 5 * fan_in)
      updates, new_state = jax.jit(tx.update)(grads, state, params)  # update 2 rewires
    return optax.apply_updates(params, updates)["clf"], new_state

  assert rewiring._REWIRE_BLOCK_ELEMENTS_ACCELERATOR >= out * fan_in
  on_cpu, cpu_state = rewiring_update("cpu")
  on_gpu, gpu_state = rewiring_update("gpu")
  np.testing.assert_array_equal(on_gpu.indices, on_cpu.indices)
  np.testing.assert_array_equal(on_gpu.values, on_cpu.values)
  jax.tree.map(np.testing.assert_array_equal, gpu_state, cpu_state)
  idx = np.asarray(on_gpu.indices).astype(np.int64)
  assert idx.min() >= 0 and idx.max() < in_features
  assert (np.sort(idx, axis=1)[:, 1:] != np.sort(idx, axis=1)[:, :-1]).all()  # K distinct
  pruned = np.asarray(on_gpu.values == 0)
  assert (pruned.sum(axis=1) == fan_in // 2).all()
  for moment in (gpu_state.inner_state[0].mu, gpu_state.inner_state[0].nu):
    moment = np.asarray(moment["clf"].values)
    assert not moment[pruned].any() and moment[~pruned].all()


def test_max_pruned_per_row_counts_as_prune_smallest():
  for fan_in, fraction in ((64, 0.3), (10, 0.7), (3, 1.0), (5, 0.0)):
    w = jax.random.normal(jax.random.key(fan_in), (4, fan_in))
    pruned = rewiring.prune_smallest(w, fraction)
    assert rewiring.max_pruned_per_row(fan_in, fraction) == int(pruned.sum(axis=1).max())
  assert rewiring.max_pruned_per_row(8, lambda t: 0.5) == 8  # a schedule: up to K
  assert rewiring.max_pruned_per_row(8, None) == 8  # threshold mode: up to K
  with pytest.raises(ValueError, match="fan_in must be a positive integer"):
    rewiring.max_pruned_per_row(0, 0.3)
