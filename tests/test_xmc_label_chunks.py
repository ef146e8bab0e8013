"""Chunked XMC losses and top-k: equal to the full-logits reference, in O(chunk) memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import sparsejax as sj
from sparsejax import xmc

B, D, L, K = 6, 10, 37, 4
# Point 1 repeats a label, point 3 has none, point 4 holds the last labels of L.
LABEL_IDS = np.array([[0, 5, 36, 0], [3, 3, 10, 0], [1, 2, 0, 0], [0, 0, 0, 0],
                      [36, 35, 34, 33], [20, 21, 0, 0]], np.int32)
LABEL_MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                       [1, 1, 1, 1], [1, 1, 0, 0]], bool)


def _classifier(kind, key=0):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  bias = 0.5 * jax.random.normal(k3, (L,))
  if kind == "fixed_fanin":
    layer = sj.FixedFanIn.init(D, L, K, key=k1)
    return xmc.fixed_fanin_logits, {"values": layer.values, "bias": bias}, layer.indices
  kernel_t = jax.random.normal(k1, (L, D)) / np.sqrt(D)
  return xmc.dense_logits, {"kernel_t": kernel_t, "bias": bias}, None


def _with_indices(params, indices):
  return params if indices is None else {**params, "indices": indices}


def _reference_loss(logits_fn, params, h, loss):
  z = logits_fn(params, h)
  y = np.zeros((B, L), bool)
  for row, col in zip(*np.nonzero(LABEL_MASK)):
    y[row, LABEL_IDS[row, col]] = True
  if loss == "squared_hinge":
    terms = jnp.maximum(0, 1 - jnp.where(y, 1.0, -1.0) * z) ** 2
  else:
    terms = -(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z))
  return jnp.sum(terms) / B


# chunk_size 5 leaves a ragged last chunk (37 = 7 * 5 + 2), 100 >= L is one chunk.
@pytest.mark.parametrize("kind, loss, chunk_size", [
    (kind, loss, 5) for kind in ("fixed_fanin", "dense") for loss in xmc.LOSSES] + [
    ("fixed_fanin", "squared_hinge", 1), ("dense", "bce", 1),
    ("fixed_fanin", "bce", 100), ("dense", "squared_hinge", 100)])
def test_chunked_loss_and_grads_equal_the_full_logits(kind, loss, chunk_size):
  logits_fn, params, indices = _classifier(kind)
  h = jax.random.normal(jax.random.key(9), (B, D))

  def chunked(params, h):
    return xmc.chunked_loss(logits_fn, _with_indices(params, indices), h, LABEL_IDS, LABEL_MASK,
                            loss=loss, chunk_size=chunk_size)

  def full(params, h):
    return _reference_loss(logits_fn, _with_indices(params, indices), h, loss)

  @jax.jit  # one compile for both
  def both(params, h):
    return (jax.value_and_grad(chunked, argnums=(0, 1))(params, h),
            jax.value_and_grad(full, argnums=(0, 1))(params, h))

  with jax.default_matmul_precision("highest"):  # no TF32 on a GPU: its rounding varies by shape
    (value, grads), (want, want_grads) = both(params, h)
  np.testing.assert_allclose(value, want, rtol=2e-6)
  for got_leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=2e-5, atol=2e-6)


def test_a_fixed_fanin_layer_is_a_classifier_and_its_indices_pass_through():
  layer = sj.FixedFanIn.init(D, L, K, key=jax.random.key(1)).replace(bias=jnp.ones(L))
  h = jax.random.normal(jax.random.key(2), (B, D))
  loss = lambda layer: xmc.chunked_loss(xmc.fixed_fanin_logits, layer, h, LABEL_IDS, LABEL_MASK,
                                        chunk_size=8)
  grads = jax.jit(jax.grad(loss, allow_int=True))(layer)
  assert grads.indices.dtype == jax.dtypes.float0
  want = jax.grad(lambda v, b: _reference_loss(
      xmc.fixed_fanin_logits, {"values": v, "indices": layer.indices, "bias": b}, h,
      "squared_hinge"), argnums=(0, 1))(layer.values, layer.bias)
  np.testing.assert_allclose(grads.values, want[0], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(grads.bias, want[1], rtol=2e-5, atol=2e-6)


def test_the_two_classifier_forms_score_alike():
  """A ``FixedFanIn`` and its mapping (bias optional) are one fixed fan-in classifier."""
  layer = sj.FixedFanIn.init(D, L, K, key=jax.random.key(1)).replace(bias=jnp.ones(L))
  h = jax.random.normal(jax.random.key(2), (B, D))
  parts = {"values": layer.values, "indices": layer.indices}
  np.testing.assert_array_equal(xmc.fixed_fanin_logits(layer, h),
                                xmc.fixed_fanin_logits({**parts, "bias": layer.bias}, h))
  np.testing.assert_array_equal(xmc.fixed_fanin_logits(layer.replace(bias=None), h),
                                xmc.fixed_fanin_logits(parts, h))
  with pytest.raises(ValueError, match="fixed fan-in classifier must be"):
    xmc.fixed_fanin_logits({"values": layer.values}, h)
  with pytest.raises(ValueError, match="dense classifier must be"):
    xmc.dense_logits(parts, h)


def _scores_classifier(values):
  """A 'classifier' whose logits are fixed per label: exercises ties and special floats."""
  return {"s": jnp.asarray(values, jnp.float32)}


def _score_logits(params, h):
  return jnp.broadcast_to(params["s"], (h.shape[0], params["s"].shape[0])) + 0 * h[:, :1]


@pytest.mark.parametrize("k, chunk_size", [(1, 1), (5, 4), (5, 64), (37, 6)])
def test_chunked_topk_equals_lax_top_k_with_ties(k, chunk_size):
  # Integer-valued weights and inputs make every logit exact, so ties are exact.
  rng = np.random.default_rng(0)
  params = {"kernel_t": jnp.asarray(rng.integers(-1, 2, (L, D)), jnp.float32),
            "bias": jnp.asarray(rng.integers(-1, 2, L), jnp.float32)}
  h = jnp.asarray(rng.integers(-1, 2, (B, D)), jnp.float32)
  scores, ids = xmc.chunked_topk(xmc.dense_logits, params, h, k=k, chunk_size=chunk_size)
  want_scores, want_ids = lax.top_k(xmc.dense_logits(params, h), k)
  assert ids.dtype == jnp.int32 and ids.shape == (B, k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(scores, want_scores)


def test_chunked_topk_orders_special_floats_like_lax_top_k():
  values = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, 1.0, -np.inf, -0.0, 0.0, 2.0]
  h = jnp.ones((2, 3))
  for chunk_size in (1, 3, 4):
    scores, ids = xmc.chunked_topk(_score_logits, _scores_classifier(values), h,
                                   k=len(values), chunk_size=chunk_size)
    want_scores, want_ids = lax.top_k(_score_logits(_scores_classifier(values), h), len(values))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)


def test_chunked_topk_on_a_fixed_fanin_layer():
  layer = sj.FixedFanIn.init(D, L, K, key=jax.random.key(3))
  h = jax.random.normal(jax.random.key(4), (B, D))
  _, ids = xmc.chunked_topk(xmc.fixed_fanin_logits, layer, h, k=5, chunk_size=10)
  np.testing.assert_array_equal(ids, lax.top_k(layer(h), 5)[1])


@pytest.mark.parametrize("change, match", [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=2.5), "chunk_size"),
    (dict(loss="hinge"), "loss"), (dict(h=np.ones(D, np.float32)), "h must have shape"),
    (dict(label_ids=LABEL_IDS[:2]), "label_ids must have shape"),
    (dict(label_mask=LABEL_MASK.astype(int)), "label_mask"),
    (dict(label_ids=np.where(LABEL_MASK, 37, 0)), "out of range"),
    (dict(classifier={"kernel_t": jnp.ones((L, D)), "bias": jnp.ones(L + 1)}), "leading"),
    (dict(logits_fn=lambda p, h: xmc.dense_logits(p, h)[:, :1]), "logits_fn must return")])
def test_chunked_loss_rejects_bad_input(change, match):
  args = dict(logits_fn=xmc.dense_logits, classifier=_classifier("dense")[1],
              h=np.ones((B, D), np.float32), label_ids=LABEL_IDS, label_mask=LABEL_MASK,
              loss="bce", chunk_size=8)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    xmc.chunked_loss(args.pop("logits_fn"), args.pop("classifier"), args.pop("h"),
                     args.pop("label_ids"), args.pop("label_mask"), **args)


def test_label_ids_are_checked_when_concrete_and_by_checkify_when_traced():
  from jax.experimental import checkify
  logits_fn, params, _ = _classifier("dense")
  h = jnp.ones((B, D))
  padded = np.where(LABEL_MASK, LABEL_IDS, -7)  # masked-out padding may hold any id
  loss = lambda ids: xmc.chunked_loss(logits_fn, params, h, ids, LABEL_MASK, chunk_size=8)
  np.testing.assert_allclose(loss(padded), loss(LABEL_IDS), rtol=1e-6)
  bad = LABEL_IDS.copy()
  bad[4, 2] = L
  with pytest.raises(ValueError, match=r"label_ids\[4, 2\] = 37 is out of range for L=37"):
    loss(bad)

  def checked(ids):
    xmc.check_label_ids(ids, LABEL_MASK, L)
    return loss(ids)  # traced ids: trusted, the out-of-range one is dropped

  run = checkify.checkify(jax.jit(checked))
  err, value = run(padded)
  assert err.get() is None and np.isclose(value, loss(LABEL_IDS))
  err, _ = run(bad)
  assert "label_ids[4, 2] = 37 is out of range for L=37" in err.get()


@pytest.mark.parametrize("k, chunk_size, match", [(0, 4, "k must"), (L + 1, 4, "k must"),
                                                 (3, 0, "chunk_size")])
def test_chunked_topk_rejects_bad_input(k, chunk_size, match):
  with pytest.raises(ValueError, match=match):
    xmc.chunked_topk(xmc.dense_logits, _classifier("dense")[1], jnp.ones((B, D)), k=k,
                     chunk_size=chunk_size)


# -- Memory: compiled, never run. One chunk of logits is 0.5 MiB; neither L is a
# multiple of the chunk, so the overlapping last chunk is compiled too.
MB, MD, MK, MCHUNK, MLMAX = 128, 32, 16, 1024, 8
SMALL_L, LARGE_L = 8192 + 100, 65536 + 100
LOGITS_GROWTH = MB * (LARGE_L - SMALL_L) * 4  # what (B, L) float32 logits would add: 28 MiB
VALUES_GROWTH = (LARGE_L - SMALL_L) * MK * 4  # one more (L, K) float32 array: 3.5 MiB


def _shapes(num_labels):
  f32 = jnp.float32
  return ({"values": jax.ShapeDtypeStruct((num_labels, MK), f32),
           "bias": jax.ShapeDtypeStruct((num_labels,), f32)},
          jax.ShapeDtypeStruct((num_labels, MK), jnp.uint16),
          jax.ShapeDtypeStruct((MB, MD), f32),
          jax.ShapeDtypeStruct((MB, MLMAX), jnp.int32),
          jax.ShapeDtypeStruct((MB, MLMAX), jnp.bool_))


def _chunked_step(params, indices, h, label_ids, label_mask):
  loss = lambda params, h: xmc.chunked_loss(
      xmc.fixed_fanin_logits, {**params, "indices": indices}, h, label_ids, label_mask,
      chunk_size=MCHUNK)
  return jax.value_and_grad(loss, argnums=(0, 1))(params, h)


def _full_logits_step(params, indices, h, label_ids, label_mask):
  def loss(params, h):
    z = xmc.fixed_fanin_logits({**params, "indices": indices}, h)
    y = jnp.zeros(z.shape, bool).at[jnp.arange(MB)[:, None], label_ids].set(label_mask)
    return jnp.sum(jnp.maximum(0, 1 - jnp.where(y, z, -z)) ** 2) / MB
  return jax.value_and_grad(loss, argnums=(0, 1))(params, h)


def _topk(params, indices, h, label_ids, label_mask):
  return xmc.chunked_topk(xmc.fixed_fanin_logits, {**params, "indices": indices}, h, k=5,
                          chunk_size=MCHUNK)


def _temp_growth(fn):
  small, large = (sj.memory.compiled_memory(fn, *_shapes(n)) for n in (SMALL_L, LARGE_L))
  return large["temp_bytes"] - small["temp_bytes"], large


@pytest.mark.parametrize("fn", [_chunked_step, _topk], ids=["loss_value_and_grad", "topk"])
def test_temp_memory_does_not_grow_with_batch_times_labels(fn):
  growth, large = _temp_growth(fn)
  # No (B, L) logits, nor even a classifier-sized copy (padding, a zero-filled
  # gradient per chunk): the gradient slices are written in place.
  assert growth < VALUES_GROWTH / 4, f"temp grew by {growth / 2**20:.2f} MiB"
  assert large["temp_bytes"] < LOGITS_GROWTH / 4
  assert large["total_bytes"] == (large["argument_bytes"] + large["output_bytes"]
                                  + large["temp_bytes"] - large["alias_bytes"])


def test_the_memory_bound_catches_full_logits():
  growth, _ = _temp_growth(_full_logits_step)
  assert growth >= LOGITS_GROWTH


def _count_dots(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_the_gradient_computes_each_chunks_logits_once():
  # Dense logits: one matmul forward, two backward (dh, dkernel), and no recomputed
  # forward matmul in a second pass over the chunks.
  _, params, _ = _classifier("dense")
  h = jax.random.normal(jax.random.key(9), (B, D))
  loss = lambda params, h: xmc.chunked_loss(xmc.dense_logits, params, h, LABEL_IDS, LABEL_MASK,
                                            chunk_size=5)
  assert _count_dots(loss, params, h) == 1
  assert _count_dots(jax.grad(loss, argnums=(0, 1)), params, h) == 3


@pytest.mark.parametrize("kind", ["fixed_fanin", "dense"])
def test_the_cotangent_scales_the_saved_gradients(kind):
  # A weighted sum of two calls, through a function of h: the backward scales by each
  # call's cotangent and the chain rule reaches the encoder.
  logits_fn, params, indices = _classifier(kind)
  x = jax.random.normal(jax.random.key(9), (B, D))
  encoder = jax.random.normal(jax.random.key(8), (D, D)) / np.sqrt(D)

  def objective(loss_fn, params, encoder):
    h = jnp.tanh(x @ encoder)
    c = _with_indices(params, indices)
    return 0.7 * loss_fn(c, h, "squared_hinge") - 2.0 * loss_fn(c, h, "bce")

  chunked = lambda c, h, loss: xmc.chunked_loss(logits_fn, c, h, LABEL_IDS, LABEL_MASK,
                                                loss=loss, chunk_size=5)
  full = lambda c, h, loss: _reference_loss(logits_fn, c, h, loss)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(jax.grad(functools.partial(objective, chunked), argnums=(0, 1)))(params, encoder)
    want = jax.grad(functools.partial(objective, full), argnums=(0, 1))(params, encoder)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=2e-5, atol=2e-6)


# -- RigL regrowth candidates. More inputs than D, so that rows have columns to choose from.
RD = 24


def _rigl_layer(bias=True, key=0):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  layer = sj.FixedFanIn.init(RD, L, K, key=k1, bias=bias)
  layer = layer.replace(values=jax.random.normal(k2, (L, K)))
  return layer.replace(bias=0.5 * jax.random.normal(k3, (L,))) if bias else layer


def _dense_gradient(layer, h, loss):
  """``(L, in)``: ``(h^T g)^T`` for ``g`` the full-logit loss's gradient w.r.t. the logits."""
  g = jax.grad(lambda z: _reference_loss(lambda _, h: z, None, h, loss))(layer(h))
  return (h.T @ g).T, g


@pytest.mark.parametrize("loss", xmc.LOSSES)
@pytest.mark.parametrize("bias, chunk_size, num_candidates", [
    (True, 5, 3), (False, 8, 20), (True, 100, 1)])  # R=20 > 24-4 absent: -inf at the end
def test_chunked_loss_and_candidates(loss, bias, chunk_size, num_candidates):
  layer = _rigl_layer(bias)
  h = jax.random.normal(jax.random.key(9), (B, RD))
  kwargs = dict(loss=loss, chunk_size=chunk_size)

  def with_candidates(layer, h):
    return xmc.chunked_loss_and_candidates(layer, h, LABEL_IDS, LABEL_MASK,
                                           num_candidates=num_candidates, **kwargs)

  def plain(layer, h):
    return xmc.chunked_loss(xmc.fixed_fanin_logits, layer, h, LABEL_IDS, LABEL_MASK, **kwargs)

  @jax.jit
  def both(layer, h):
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1), allow_int=True)
    return grad(with_candidates, has_aux=True)(layer, h), grad(plain)(layer, h)

  with jax.default_matmul_precision("highest"):
    ((value, candidates), grads), (want, want_grads) = both(layer, h)
    dense, _ = _dense_gradient(layer, h, loss)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  assert grads[0].indices.dtype == jax.dtypes.float0
  for got_leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads),
                                 strict=True):
    if want_leaf.dtype != jax.dtypes.float0:
      np.testing.assert_allclose(got_leaf, want_leaf, rtol=2e-5, atol=2e-6)
  # Brute force: the current columns out, then the largest |dense gradient|.
  score = jnp.abs(dense).at[jnp.arange(L)[:, None], layer.indices].set(-jnp.inf)
  want_scores, want_columns = lax.top_k(score, num_candidates)
  assert candidates.columns.dtype == jnp.int32
  assert candidates.columns.shape == candidates.scores.shape == (L, num_candidates)
  finite = np.isfinite(want_scores)
  np.testing.assert_array_equal(np.isfinite(candidates.scores), finite)
  np.testing.assert_array_equal(np.where(finite, candidates.columns, -1),
                                np.where(finite, want_columns, -1))
  np.testing.assert_allclose(np.where(finite, candidates.scores, 0),
                             np.where(finite, want_scores, 0), rtol=1e-5, atol=1e-7)
  assert finite.sum(1).max() == min(num_candidates, RD - K)
  # Undifferentiated, the same outputs.
  unjitted_value, unjitted = with_candidates(layer, h)
  np.testing.assert_allclose(unjitted_value, value, rtol=1e-6)
  np.testing.assert_array_equal(unjitted.columns, candidates.columns)


@pytest.mark.parametrize("loss", xmc.LOSSES)
def test_candidates_merged_with_the_pruned_slots_are_rigl(loss):
  # set_topology's merge, written out: the union of a row's candidates and its pruned slots
  # (scored by |dvalues|) by (score descending, column ascending); the j-th pruned slot takes
  # the j-th best. Equal to rigl_regrowth_columns with at least as many candidates as
  # pruned slots.
  layer = _rigl_layer()
  h = jax.random.normal(jax.random.key(9), (B, RD))
  pruned = np.asarray(jax.random.bernoulli(jax.random.key(5), 0.5, (L, K)))
  loss_fn = lambda layer: xmc.chunked_loss_and_candidates(layer, h, LABEL_IDS, LABEL_MASK,
                                                          loss=loss, chunk_size=6,
                                                          num_candidates=K)
  with jax.default_matmul_precision("highest"):
    (_, candidates), grads = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)(layer)
    _, g = _dense_gradient(layer, h, loss)
    want = sj.rigl_regrowth_columns(layer.indices, pruned, h, g)
  indices = np.asarray(layer.indices, np.int64)
  columns = np.concatenate([np.asarray(candidates.columns), indices], axis=1)
  scores = np.concatenate([np.asarray(candidates.scores),
                           np.where(pruned, np.abs(np.asarray(grads.values)), -np.inf)], axis=1)
  merged = indices.copy()
  for row in range(L):
    best = columns[row][np.lexsort((columns[row], -scores[row]))]
    merged[row, pruned[row]] = best[:pruned[row].sum()]
  np.testing.assert_array_equal(merged, want)
  assert (merged != indices).any()


@pytest.mark.parametrize("change, match", [
    (dict(num_candidates=0), "num_candidates"), (dict(num_candidates=RD + 1), "num_candidates"),
    (dict(classifier={"kernel_t": jnp.ones((L, RD))}), "fixed fan-in classifier"),
    (dict(h=np.ones((B, RD + 1), np.float32)), "the layer reads 24"),
    (dict(loss="hinge"), "loss"), (dict(chunk_size=0), "chunk_size"),
    (dict(label_ids=np.where(LABEL_MASK, 37, 0)), "out of range")])
def test_chunked_loss_and_candidates_rejects_bad_input(change, match):
  args = dict(classifier=_rigl_layer(), h=np.ones((B, RD), np.float32), label_ids=LABEL_IDS,
              label_mask=LABEL_MASK, chunk_size=8, num_candidates=4)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    xmc.chunked_loss_and_candidates(args.pop("classifier"), args.pop("h"),
                                    args.pop("label_ids"), args.pop("label_mask"), **args)
