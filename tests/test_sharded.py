"""Label-sharded XMC and SET on 8 CPU devices: equal to one device, bit for bit where random."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparsejax as sj
from sparsejax import rewiring, xmc

B, D, K = 8, 10, 4
# 37 labels: padded to 38/40 on 2/4/8 label shards; 40 needs no padding on any mesh.
LABEL_IDS = np.array([[0, 5, 36, 0], [3, 3, 10, 0], [1, 2, 0, 0], [0, 0, 0, 0],
                      [36, 35, 34, 33], [20, 21, 0, 0], [4, 9, 14, 19], [30, 31, 0, 0]], np.int32)
LABEL_MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                       [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
SPECS = ["labels:8", "data:2,labels:4", "data:4,labels:2"]


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices before jax starts"


@functools.cache
def _classifier(kind, num_labels):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  bias = 0.5 * jax.random.normal(k3, (num_labels,))
  if kind == "fixed_fanin":
    layer = sj.FixedFanIn.init(D, num_labels, K, key=k1)
    values = jax.random.normal(k2, (num_labels, K))
    return xmc.fixed_fanin_logits, {"values": values, "indices": layer.indices, "bias": bias}
  return xmc.dense_logits, {"kernel_t": jax.random.normal(k1, (num_labels, D)) / np.sqrt(D),
                            "bias": bias}


def _place(mesh, classifier, *data):
  """The padded classifier sharded over labels, the batch arrays over data."""
  padded = xmc.pad_labels(classifier, xmc.padded_num_labels(
      jax.tree.leaves(classifier)[0].shape[0], mesh.shape["labels"]))
  return (jax.device_put(padded, NamedSharding(mesh, P("labels"))),
          *(jax.device_put(x, NamedSharding(mesh, P("data"))) for x in data))


@functools.cache
def _one_device_loss(kind, num_labels):
  """The reference: ``chunked_loss``'s values and gradients on the unpadded classifier."""
  logits_fn, classifier = _classifier(kind, num_labels)
  h = jax.random.normal(jax.random.key(9), (B, D))
  return _values_and_grads(lambda c, h, loss: xmc.chunked_loss(
      logits_fn, c, h, LABEL_IDS, LABEL_MASK, loss=loss, chunk_size=3))(classifier, h)


def _values_and_grads(loss_fn):
  """Jitted ``(c, h) -> [(value, (dc, dh)) per loss]`` of ``loss_fn(c, h, loss)``."""
  return jax.jit(lambda c, h: [
      jax.value_and_grad(functools.partial(loss_fn, loss=loss), argnums=(0, 1),
                         allow_int=True)(c, h) for loss in xmc.LOSSES])


@pytest.mark.parametrize("spec, kind, num_labels", [
    (spec, kind, 37) for spec in SPECS for kind in ("fixed_fanin", "dense")] + [
    ("data:2,labels:4", "fixed_fanin", 40)])  # 37 labels are padded on every mesh, 40 not
def test_sharded_loss_and_grads_equal_one_device(spec, kind, num_labels):
  mesh = xmc.mesh_from_spec(spec)
  logits_fn, classifier = _classifier(kind, num_labels)
  h = jax.random.normal(jax.random.key(9), (B, D))
  padded, h_sharded, ids, mask = _place(mesh, classifier, h, LABEL_IDS, LABEL_MASK)
  sharded = _values_and_grads(lambda c, h, loss: xmc.sharded_chunked_loss(
      logits_fn, c, h, ids, mask, mesh=mesh, num_labels=num_labels, loss=loss, chunk_size=3))
  for (want, (want_dc, want_dh)), (got, (got_dc, got_dh)) in zip(
      _one_device_loss(kind, num_labels), sharded(padded, h_sharded), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Every label shard's part of dh is summed in.
    np.testing.assert_allclose(got_dh, want_dh, rtol=1e-5, atol=1e-6)
    for name, want_leaf in want_dc.items():
      got_leaf = np.asarray(got_dc[name])
      if want_leaf.dtype == jax.dtypes.float0:
        assert got_leaf.dtype == jax.dtypes.float0
        continue
      assert got_dc[name].sharding.is_equivalent_to(NamedSharding(mesh, P("labels")), 2)
      np.testing.assert_allclose(got_leaf[:num_labels], want_leaf, rtol=1e-5, atol=1e-6)
      assert not got_leaf[num_labels:].any()  # padded labels get no gradient


@pytest.mark.parametrize("impl", ["pallas", "pallas_tile"])
def test_kernels_trace_inside_shard_map(impl):
  # The GPU path: every pallas_call of the loss and its gradient (forward, dvalues, dx)
  # must tell shard_map over which mesh axes its output varies, or tracing fails. Only
  # traced here (the kernels compile on a GPU, where this run trained); Pallas
  # interpret mode cannot run inside shard_map with check_vma in jax 0.10.
  mesh = xmc.mesh_from_spec("data:2,labels:4")
  logits_fn, classifier = _classifier("fixed_fanin", 40)
  indices = classifier["indices"]
  floats = {name: classifier[name] for name in ("values", "bias")}
  h = jax.random.normal(jax.random.key(9), (B, D))
  fanin_logits = lambda c, h: sj.fixed_fanin_matmul(h, c["values"], c["indices"],
                                                    impl=impl) + c["bias"]
  loss = lambda c, h: xmc.sharded_chunked_loss(fanin_logits, {**c, "indices": indices}, h,
                                               LABEL_IDS, LABEL_MASK, mesh=mesh, num_labels=40,
                                               chunk_size=3)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(floats, h)
  assert "pallas_call" in str(jaxpr)


def test_padded_rows_never_count_whatever_they_hold():
  # Padding filled with large weights instead of zeros changes neither loss nor top-k.
  mesh = xmc.mesh_from_spec("data:2,labels:4")
  logits_fn, classifier = _classifier("dense", 37)
  h = jax.random.normal(jax.random.key(9), (B, D))
  junk = jax.tree.map(lambda leaf: leaf.at[37:].set(100.0), xmc.pad_labels(classifier, 40))
  want = xmc.chunked_loss(logits_fn, classifier, h, LABEL_IDS, LABEL_MASK, chunk_size=4)
  got = xmc.sharded_chunked_loss(logits_fn, junk, h, LABEL_IDS, LABEL_MASK, mesh=mesh,
                                 num_labels=37, chunk_size=4)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  scores, ids = xmc.sharded_chunked_topk(logits_fn, junk, h, mesh=mesh, num_labels=37, k=37,
                                         chunk_size=4)
  assert np.asarray(ids).max() < 37 and (np.sort(np.asarray(ids), axis=1) == np.arange(37)).all()


class _Model(nnx.Module):
  def __init__(self, num_padded, rngs):
    self.encoder = nnx.Linear(6, D, rngs=rngs)
    self.clf = sj.nn.FixedFanInLinear(D, num_padded, K, rngs=rngs)

  def classifier(self, rows=None):
    return {name: getattr(self.clf, name)[...][:rows] for name in ("values", "indices", "bias")}


def test_nnx_value_and_grad_through_an_encoder():
  mesh = xmc.mesh_from_spec("data:2,labels:4")
  model = _Model(40, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, 6))
  wrt = (nnx.Param, sj.nn.Indices)

  def sharded(model):
    h = jax.lax.with_sharding_constraint(model.encoder(x), NamedSharding(mesh, P("data")))
    return xmc.sharded_chunked_loss(xmc.fixed_fanin_logits, model.classifier(), h, LABEL_IDS,
                                    LABEL_MASK, mesh=mesh, num_labels=37, loss="bce",
                                    chunk_size=4)

  def one(model):  # the first 37 rows only: the padded rows' gradient is zero
    return xmc.chunked_loss(xmc.fixed_fanin_logits, model.classifier(37), model.encoder(x),
                            LABEL_IDS, LABEL_MASK, loss="bce", chunk_size=4)

  grad = lambda f: nnx.jit(nnx.value_and_grad(f, argnums=nnx.DiffState(0, wrt),
                                              allow_int=True))(model)
  (want, want_grads), (got, got_grads) = grad(one), grad(sharded)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for path, leaf in nnx.to_flat_state(want_grads):
    if leaf[...].dtype != jax.dtypes.float0:
      got_leaf = dict(nnx.to_flat_state(got_grads))[path][...]
      np.testing.assert_allclose(got_leaf, leaf[...], rtol=1e-5, atol=1e-6, err_msg=str(path))


def _loss_and_candidates(loss_fn):
  """Jitted ``(c, h) -> ((loss, candidates), (dc, dh))`` of ``loss_fn(c, h)``."""
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True, allow_int=True))


@pytest.mark.parametrize("spec", SPECS)
def test_sharded_candidates_equal_one_device(spec):
  mesh = xmc.mesh_from_spec(spec)
  _, classifier = _classifier("fixed_fanin", 37)
  h = jax.random.normal(jax.random.key(9), (B, D))
  kwargs = dict(loss="bce", chunk_size=3, num_candidates=3)
  (want, want_candidates), (want_dc, want_dh) = _loss_and_candidates(
      lambda c, h: xmc.chunked_loss_and_candidates(c, h, LABEL_IDS, LABEL_MASK, **kwargs))(
          classifier, h)
  padded, h_sharded, ids, mask = _place(mesh, classifier, h, LABEL_IDS, LABEL_MASK)
  (got, candidates), (got_dc, got_dh) = _loss_and_candidates(
      lambda c, h: xmc.sharded_chunked_loss_and_candidates(c, h, ids, mask, mesh=mesh,
                                                           num_labels=37, **kwargs))(
          padded, h_sharded)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_dh, want_dh, rtol=1e-5, atol=1e-6)
  for name in ("values", "bias"):
    np.testing.assert_allclose(np.asarray(got_dc[name])[:37], want_dc[name], rtol=1e-5,
                               atol=1e-6)
  # The whole batch's candidates, on each device its rows; padded rows have none.
  rows = NamedSharding(mesh, P("labels"))
  assert all(leaf.sharding.is_equivalent_to(rows, 2) for leaf in candidates)
  np.testing.assert_array_equal(np.asarray(candidates.columns)[:37], want_candidates.columns)
  np.testing.assert_allclose(np.asarray(candidates.scores)[:37], want_candidates.scores,
                             rtol=1e-5, atol=1e-7)
  assert np.isneginf(np.asarray(candidates.scores)[37:]).all()


def _dyadic(key, shape):
  """Multiples of 1/4 in [-2, 2]: sums of a few products are exact in any order."""
  return jax.random.randint(key, shape, -8, 9).astype(jnp.float32) / 4


TOPK_CASES = ((6, 2), (37, 16))  # (k, chunk_size): k above the 5..19 rows of a shard


@functools.cache
def _tied_topk(kind):
  """Dyadic weights and features (exact logits on any layout) with copied rows (exact ties).

  Returns ``(logits_fn, classifier, h, [chunked_topk result per TOPK_CASES])``.
  """
  logits_fn, classifier = _classifier(kind, 37)
  classifier = {name: _dyadic(jax.random.key(i), leaf.shape) if leaf.dtype == jnp.float32
                else leaf for i, (name, leaf) in enumerate(classifier.items())}
  for src, dst in ((3, 20), (3, 36), (7, 8), (0, 35)):
    classifier = {name: leaf.at[dst].set(leaf[src]) for name, leaf in classifier.items()}
  h = _dyadic(jax.random.key(5), (B, D)).at[1].set(0.0)  # point 1: only the bias, more ties
  want = [xmc.chunked_topk(logits_fn, classifier, h, k=k, chunk_size=chunk_size)
          for k, chunk_size in TOPK_CASES]
  return logits_fn, classifier, h, want


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kind", ["fixed_fanin", "dense"])
def test_sharded_topk_equals_one_device_ties_included(spec, kind):
  mesh = xmc.mesh_from_spec(spec)
  logits_fn, classifier, h, want = _tied_topk(kind)
  got = jax.jit(lambda c, h: [xmc.sharded_chunked_topk(
      logits_fn, c, h, mesh=mesh, num_labels=37, k=k, chunk_size=chunk_size)
      for k, chunk_size in TOPK_CASES])(*_place(mesh, classifier, h))
  for got_array, want_array in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(got_array, want_array)
    assert got_array.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
  # The copies tie on every point, and rank by id.
  z, ids = np.asarray(logits_fn(classifier, h)), np.asarray(got[-1][1])
  assert (z[:, 3] == z[:, 20]).all() and (z[:, 3] == z[:, 36]).all()
  rank = np.argsort(ids, axis=1)
  assert ((rank[:, 3] < rank[:, 20]) & (rank[:, 20] < rank[:, 36])).all()


@functools.cache
def _sparse_params():
  keys = jax.random.split(jax.random.key(0), 4)
  clf = sj.FixedFanIn.init(24, 40, 6, key=keys[0])  # the redraw path (2K <= in)
  small = sj.FixedFanIn.init(10, 16, 7, key=keys[1], index_dtype=jnp.int32)  # dense draw (2K > in)
  return {"clf": {"values": jax.random.normal(keys[2], clf.values.shape),
                  "indices": clf.indices, "bias": clf.bias},
          "small": small.replace(values=jax.random.normal(keys[3], small.values.shape)),
          "dense": jnp.ones((3, 5))}


def _loss(params, targets):
  """Pulls the weights to targets: an elementwise gradient, the same bits on any layout."""
  return (0.5 * jnp.sum((params["clf"]["values"] - targets["clf"]) ** 2)
          + 0.5 * jnp.sum((params["small"].values - targets["small"]) ** 2)
          + jnp.sum(params["clf"]["bias"]) + jnp.sum(params["dense"]))


def _targets(t):
  keys = jax.random.split(jax.random.key(t))
  return {"clf": jax.random.normal(keys[0], (40, 6)), "small": jax.random.normal(keys[1], (16, 7))}


@functools.cache
def _train(mesh, steps=6, threshold=False):
  """SET every other step with Adam; params placed row-sharded when ``mesh`` is given.

  Returns the ``(params, state)`` after each step and the compiled step's HLO.
  """
  kwargs = dict(prune_fraction=None, prune_threshold=0.5) if threshold else {}
  params = _sparse_params()
  tx = sj.set_topology(optax.adam(0.1), key=jax.random.key(3), interval=2, end_step=10,
                       in_features={"clf": 24}, mesh=mesh, **kwargs)
  if mesh is not None:
    rows = NamedSharding(mesh, P("labels"))
    params = {**params, "clf": jax.device_put(params["clf"], rows),
              "small": jax.device_put(params["small"], rows)}
  state = tx.init(params)

  @jax.jit
  def step(params, state, targets):
    grads = jax.grad(_loss, allow_int=True)(params, targets)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = step.lower(params, state, _targets(0)).compile()
  history = []
  for t in range(steps):
    params, state = compiled(params, state, _targets(t))
    history.append((params, state))
  return history, compiled.as_text()


@pytest.mark.parametrize("spec", ["labels:8", "data:2,labels:4"])
def test_sharded_set_equals_one_device_bit_for_bit(spec):
  mesh = xmc.mesh_from_spec(spec)
  (one, _), (sharded, hlo) = _train(None), _train(mesh)
  start = _sparse_params()["clf"]["indices"]
  assert not np.array_equal(one[-1][0]["clf"]["indices"], start)  # it did rewire
  for (want_params, want_state), (got_params, got_state) in zip(one, sharded):
    for want, got in zip(jax.tree.leaves((want_params, want_state)),
                         jax.tree.leaves((got_params, got_state)), strict=True):
      np.testing.assert_array_equal(got, want)
  params, state = sharded[-1]
  adam = state.inner_state[0]
  for array in (params["clf"]["indices"], params["small"].indices, adam.mu["clf"]["values"],
                adam.nu["small"].values):
    assert array.sharding.spec == P("labels"), array.sharding
  # No layer is gathered: each device rewires its own rows (and the gradient is elementwise).
  assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_sharded_set_threshold_mode():
  mesh = xmc.mesh_from_spec("data:2,labels:4")
  for (want, _), (got, _) in zip(_train(None, 3, True)[0], _train(mesh, 3, True)[0]):
    np.testing.assert_array_equal(got["clf"]["indices"], want["clf"]["indices"])
    np.testing.assert_array_equal(got["small"].values, want["small"].values)


@pytest.mark.parametrize("in_features, fan_in", [(24, 6), (10, 7)])  # redraw / dense draw
def test_draws_depend_only_on_key_and_row(in_features, fan_in):
  key = jax.random.key(11)
  whole = sj.random_topology(in_features, 40, fan_in, key=key)
  np.testing.assert_array_equal(sj.random_topology(in_features, 10, fan_in, key=key), whole[:10])
  free = jax.random.bernoulli(jax.random.key(2), 0.5, whole.shape)
  redrawn = np.asarray(sj.draw_columns(whole, free, in_features, key=key))
  for start in (0, 10, 20, 30):  # any block of rows, drawn at its global row offset
    block = sj.draw_columns(whole[start:start + 10], free[start:start + 10], in_features,
                            key=key, first_row=start)
    np.testing.assert_array_equal(block, redrawn[start:start + 10])
  # Kept slots unchanged, rows distinct.
  kept = ~np.asarray(free)
  np.testing.assert_array_equal(redrawn[kept], np.asarray(whole)[kept])
  assert all(len(set(row)) == fan_in for row in redrawn.tolist())


def test_set_rewiring_in_small_blocks_gives_the_same_bits(monkeypatch):
  params = _sparse_params()
  tx = sj.set_topology(optax.sgd(0.1), key=jax.random.key(3), interval=1, end_step=5,
                       in_features={"clf": 24})
  grads = jax.grad(_loss, allow_int=True)(params, _targets(0))
  step = lambda: jax.jit(tx.update)(grads, tx.init(params), params)[0]
  whole = step()
  # Blocks of 3 rows and a 1-row tail, on both draw paths.
  monkeypatch.setattr(rewiring, "_REWIRE_BLOCK_ELEMENTS", 3 * 7)
  blocked = step()
  for got, want in ((blocked["clf"]["indices"], whole["clf"]["indices"]),
                    (blocked["small"].indices, whole["small"].indices)):
    assert np.asarray(want).any()  # rewired
    np.testing.assert_array_equal(got, want)


def test_mesh_from_spec():
  devices = jax.devices()
  for spec, shape in (("labels:8", (1, 8)), ("data:8", (8, 1)), ("data:2,labels:4", (2, 4)),
                      (" labels:4 , data:2 ", (2, 4))):
    mesh = xmc.mesh_from_spec(spec)
    assert mesh.axis_names == ("data", "labels") and mesh.devices.shape == shape
    assert sorted(mesh.devices.ravel().tolist(), key=id) == sorted(devices, key=id)
  mesh = xmc.mesh_from_spec("labels:4", devices=devices[4:])
  assert mesh.devices.shape == (1, 4) and list(mesh.devices.ravel()) == devices[4:]
  for spec, match in (("labels", "not 'name:size'"), ("labels:x", "not 'name:size'"),
                      ("data:2,", "not 'name:size'"), ("", "non-empty"),
                      ("model:8", "unknown axis 'model'"), ("labels:4,labels:2", "twice"),
                      ("data:0,labels:8", "positive size"), ("labels:4", "8 are given"),
                      ("data:4,labels:4", "16 devices")):
    with pytest.raises(ValueError, match=match):
      xmc.mesh_from_spec(spec)


def test_padding_helpers():
  assert [xmc.padded_num_labels(n, 4) for n in (1, 4, 5, 37)] == [4, 4, 8, 40]
  with pytest.raises(ValueError, match="shards"):
    xmc.padded_num_labels(37, 0)
  layer = sj.FixedFanIn(jnp.ones((5, 3)), jnp.tile(jnp.arange(3), (5, 1)), in_features=10)
  padded = xmc.pad_labels(layer, 8)
  assert padded.values.shape == padded.indices.shape == (8, 3) and padded.bias is None
  np.testing.assert_array_equal(padded.values[:5], layer.values)
  assert not padded.values[5:].any() and not padded.indices[5:].any()
  with pytest.raises(ValueError, match="num_padded"):
    xmc.pad_labels(layer, 4)


def test_sharded_errors():
  mesh = xmc.mesh_from_spec("data:2,labels:4")
  logits_fn, classifier = _classifier("dense", 40)
  h = jnp.ones((B, D))
  loss = lambda c=classifier, h=h, ids=LABEL_IDS, mesh=mesh, **kw: xmc.sharded_chunked_loss(
      logits_fn, c, h, ids, LABEL_MASK, mesh=mesh, **{"num_labels": 37, "chunk_size": 4, **kw})
  with pytest.raises(ValueError, match="no axis 'labels'"):
    loss(mesh=jax.make_mesh((8,), ("batch",)))
  with pytest.raises(ValueError, match="no axis 'rows'"):
    loss(label_axis="rows")
  with pytest.raises(ValueError, match="must differ"):
    loss(label_axis="data")
  with pytest.raises(ValueError, match="39 rows do not split over the 4"):
    loss(c=jax.tree.map(lambda leaf: leaf[:39], classifier))
  with pytest.raises(ValueError, match="batch of 7 does not split"):
    loss(h=h[:7], ids=LABEL_IDS[:7])
  with pytest.raises(ValueError, match=r"num_labels must be an integer in \[1, 40\]"):
    loss(num_labels=41)
  with pytest.raises(ValueError, match="loss must be one of"):
    loss(loss="hinge")
  with pytest.raises(ValueError, match="out of range for L=30"):  # a padded label id
    loss(num_labels=30)
  with pytest.raises(ValueError, match="chunk_size"):
    loss(chunk_size=0)
  with pytest.raises(ValueError, match=r"k must be an integer in \[1, num_labels=37\]"):
    xmc.sharded_chunked_topk(logits_fn, classifier, h, mesh=mesh, num_labels=37, k=38,
                             chunk_size=4)
  with pytest.raises(ValueError, match="a fixed fan-in classifier must be"):
    xmc.sharded_chunked_loss_and_candidates(classifier, h, LABEL_IDS, LABEL_MASK, mesh=mesh,
                                            num_labels=37, chunk_size=4, num_candidates=2)
  with pytest.raises(ValueError, match="with a 'rows' axis"):
    sj.set_topology(optax.sgd(0.1), key=jax.random.key(0), interval=1, end_step=5,
                    mesh=mesh, row_axis="rows")
  tx = sj.set_topology(optax.sgd(0.1), key=jax.random.key(0), interval=1, end_step=5, mesh=mesh)
  with pytest.raises(ValueError, match="'clf' has 38 rows, not a multiple of the 4"):
    tx.init({"clf": {"values": jnp.ones((38, 3)), "indices": jnp.zeros((38, 3), jnp.int32)}})
