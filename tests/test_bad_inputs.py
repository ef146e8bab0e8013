"""Bad inputs, one table row each: the call, the exception it must raise, a message fragment.

Four tables, every row a real call:

- ``API_ROWS``: the library's public functions and layers, with tiny arrays (the
  checks are described once, in README.md, "What the API guarantees"; the
  non-raising side, such as NaN propagation, traced values trusted and checkify,
  is tested next to each feature);
- ``DATA_ROWS``: the XMC readers, writers and data checks, each row writing a small
  bad file into ``tmp_path`` (fragments name file and line);
- ``TRAINER_ROWS``: the XMC trainer's flags, refused before any work;
- ``RUN_ROWS``: trainer runs refused once the data is known, which must leave
  nothing in the output directory that blocks the corrected retry.

Checkpoint damage, divergence and the command line's one-line errors are in
``tests/test_xmc_reliability.py``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import checkify
from jax.sharding import Mesh

import sparsejax as sj
from experiments.xmc import train
from sparsejax import rewiring, supar, xmc
from sparsejax.data import xmc as data
from sparsejax.data.synthetic_xmc import synthetic_xmc
from sparsejax.data.xmc import (XMCDataset, XMCFormatError, batches, bow_header,
                                check_train_test, epoch_order, hash_tokenize, iter_bow, pad_points,
                                pad_tokens, read_bow, read_raw_text, steps_per_epoch, write_bow,
                                write_raw_text)
from sparsejax.mvue import group_uniforms, prune_groups


# -- The library API ------------------------------------------------------------------------

KEY = jax.random.key(0)
KEY_HINT = "key must be a PRNG key from jax.random.key(seed)"
VALUES = jnp.ones((3, 2))
INDICES = jnp.array([[0, 1], [1, 2], [2, 3]], jnp.int32)
X = jnp.ones((2, 4))
BAD_INDICES = np.array([[0, 1], [1, 2], [2, 9]], np.int32)  # a constant closed over in jit


def _layer(**change):
  return sj.FixedFanIn(**{"values": VALUES, "indices": INDICES, "in_features": 4, **change})


def _corrupt(**leaves):
  """A layer with bad leaves that skipped validation, as a buggy update inside jit could."""
  layer = _layer(bias=jnp.zeros(3))
  return jax.tree.unflatten(jax.tree.structure(layer), [
      leaves.get("values", layer.values), leaves.get("indices", layer.indices), layer.bias])


def _checkified(layer):
  err, _ = checkify.checkify(jax.jit(sj.check_fixed_fanin))(layer)
  err.throw()


def _set(**change):
  return sj.set_topology(optax.sgd(0.1), **{"key": KEY, "interval": 2, "end_step": 10, **change})


def _set_update(params, grads=None, tx=None, **kwargs):
  tx = tx or _set()
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params) if grads is None else grads
  return tx.update(grads, state, params, **kwargs)


class _Net(nnx.Module):
  def __init__(self):
    self.clf = sj.nn.FixedFanInLinear(4, 3, 2, rngs=nnx.Rngs(0))


def _nnx_optimizer_without_indices():
  model = _Net()
  tx = _set(in_features=sj.nn.fixed_fanin_sizes(model))
  nnx.Optimizer(model, tx, wrt=nnx.Param)


# The label problem of tests/test_xmc_label_chunks.py, shrunk: 2 points, L = 5 labels.
H = jnp.ones((2, 4))
LABEL_IDS = np.array([[0, 4], [2, 0]], np.int32)
LABEL_MASK = np.array([[True, True], [True, False]])
DENSE = {"kernel_t": jnp.ones((5, 4)), "bias": jnp.zeros(5)}
SPARSE = {"values": jnp.ones((5, 2)), "indices": jnp.array([[0, 1]] * 5, jnp.int32)}


def _loss(**change):
  args = dict(logits_fn=xmc.dense_logits, classifier=DENSE, h=H, label_ids=LABEL_IDS,
              label_mask=LABEL_MASK, chunk_size=2)
  args.update(change)
  return xmc.chunked_loss(args.pop("logits_fn"), args.pop("classifier"), args.pop("h"),
                          args.pop("label_ids"), args.pop("label_mask"), **args)


def _candidates(**change):
  args = dict(classifier=SPARSE, h=H, label_ids=LABEL_IDS, label_mask=LABEL_MASK, chunk_size=2,
              num_candidates=1)
  args.update(change)
  return xmc.chunked_loss_and_candidates(args.pop("classifier"), args.pop("h"),
                                         args.pop("label_ids"), args.pop("label_mask"), **args)


def _mesh(spec="labels:8"):
  return xmc.mesh_from_spec(spec)


def _sharded_loss(**change):
  args = dict(classifier=xmc.pad_labels(DENSE, 8), mesh=_mesh(), num_labels=5, chunk_size=2)
  args.update(change)
  return xmc.sharded_chunked_loss(xmc.dense_logits, args.pop("classifier"), H,
                                  args.pop("label_ids", LABEL_IDS), LABEL_MASK, **args)


def _checked_labels(ids):
  err, _ = checkify.checkify(jax.jit(xmc.check_label_ids, static_argnums=2))(ids, LABEL_MASK, 5)
  err.throw()


def _embed(ids, **kwargs):
  return sj.nn.EmbeddingBag(10, 3, rngs=nnx.Rngs(0))(ids, **kwargs)


P = pytest.param
API_ROWS = [
    # -- fixed fan-in layer: FixedFanIn(...), init, from_dense, replace, __call__
    P(lambda: _layer(values=jnp.ones(3)), ValueError, "values must have shape (out, K)",
      id="layer-values-1d"),
    P(lambda: _layer(indices=jnp.zeros((3, 3), jnp.int32)), ValueError,
      "indices shape (3, 3) must equal values shape (3, 2)", id="layer-indices-shape"),
    P(lambda: _layer(indices=INDICES.astype(jnp.float32)), ValueError,
      "indices must be an integer array", id="layer-indices-float"),
    P(lambda: _layer(values=jnp.ones((3, 2), jnp.int32)), ValueError,
      "values must be a floating-point array", id="layer-values-int"),
    P(lambda: _layer(indices=INDICES.at[1, 1].set(4)), ValueError,
      "indices[1, 1] = 4 is out of range for in_features=4 (row 1)", id="layer-index-high"),
    P(lambda: _layer(indices=INDICES.at[2, 0].set(-1)), ValueError,
      "indices[2, 0] = -1 is out of range", id="layer-index-negative"),
    P(lambda: _layer(indices=INDICES.at[1, 0].set(2)), ValueError,
      "indices row 1 repeats column(s) [2]", id="layer-repeat"),
    P(lambda: _layer(values=VALUES.at[2, 0].set(jnp.nan)), ValueError,
      "values holds a non-finite value nan at index (2, 0)", id="layer-nan"),
    P(lambda: _layer(bias=jnp.ones(4)), ValueError, "bias must have shape (3,)", id="layer-bias"),
    P(lambda: _layer(bias=jnp.ones(3).at[1].set(jnp.inf)), ValueError,
      "bias holds a non-finite value inf", id="layer-bias-inf"),
    P(lambda: _layer(in_features=1), ValueError, "fan_in=2 exceeds in_features=1",
      id="layer-fan-in-too-large"),
    P(lambda: _layer(indices=INDICES.astype(jnp.int8), in_features=300), ValueError,
      "index_dtype int8 cannot hold column ids up to 299", id="layer-index-dtype-small"),
    P(lambda: sj.FixedFanIn.init(8, 4, 0, key=KEY), ValueError,
      "fan_in must be a positive integer, got 0", id="init-fan-in-zero"),
    P(lambda: sj.FixedFanIn.init(8, 0, 2, key=KEY), ValueError,
      "out_features must be a positive integer", id="init-out-zero"),
    P(lambda: sj.FixedFanIn.init(70_000, 4, 2, key=KEY, index_dtype=jnp.uint16), ValueError,
      "cannot hold column ids up to 69999", id="init-index-dtype-small"),
    P(lambda: sj.FixedFanIn.init(8, 4, 2, key=KEY, index_dtype=jnp.float32), ValueError,
      "index_dtype must be an integer dtype", id="init-index-dtype-float"),
    P(lambda: sj.FixedFanIn.init(8, 4, 2, key=KEY, dtype=jnp.int32), ValueError,
      "dtype must be a floating-point dtype", id="init-dtype-int"),
    P(lambda: sj.FixedFanIn.from_dense(jnp.ones((4, 3)).at[1, 1].set(jnp.nan), 2), ValueError,
      "w holds a non-finite value", id="from-dense-nan"),
    P(lambda: sj.FixedFanIn.from_dense(jnp.ones(4), 2), ValueError,
      "w must have shape (in, out)", id="from-dense-1d"),
    P(lambda: _layer().replace(weight=1), ValueError, "unknown FixedFanIn fields ['weight']",
      id="replace-unknown-field"),
    P(lambda: _layer().replace(indices=INDICES.at[0, 1].set(0)), ValueError,
      "indices row 0 repeats column(s) [0]", id="replace-repeat"),
    P(lambda: _layer()(jnp.ones((2, 5))), ValueError, "x must have shape (..., 4)",
      id="layer-call-x-size"),
    # -- fixed_fanin_matmul: the layer's checks on concrete operands, every impl
    P(lambda: sj.fixed_fanin_matmul(X, VALUES, INDICES.at[1, 0].set(2)), ValueError,
      "indices row 1 repeats column(s) [2]", id="matmul-repeat"),
    P(lambda: sj.fixed_fanin_matmul(X, VALUES, INDICES.at[1, 0].set(2), impl="xla_tile"),
      ValueError, "indices row 1 repeats column(s) [2]", id="matmul-repeat-tile"),
    P(lambda: sj.fixed_fanin_matmul(X, VALUES.at[0, 1].set(jnp.nan), INDICES), ValueError,
      "values holds a non-finite value nan at index (0, 1)", id="matmul-nan"),
    P(lambda: sj.fixed_fanin_matmul(X, VALUES.at[2, 1].set(-jnp.inf), INDICES,
                                    impl="interpret"),
      ValueError, "values holds a non-finite value -inf at index (2, 1)", id="matmul-inf-kernel"),
    P(lambda: sj.fixed_fanin_matmul(X, VALUES, INDICES.at[2, 1].set(4)), ValueError,
      "indices[2, 1] = 4 is out of range for in_features=4 (row 2)", id="matmul-index-high"),
    P(lambda: jax.jit(lambda x: sj.fixed_fanin_matmul(x, VALUES, BAD_INDICES))(X),
      ValueError, "indices[2, 1] = 9 is out of range", id="matmul-constant-in-jit"),
    P(lambda: sj.fixed_fanin_matmul(X.astype(jnp.int32), VALUES, INDICES), ValueError,
      "x must be a floating-point array", id="matmul-x-int"),
    P(lambda: sj.fixed_fanin_matmul(jnp.float32(1), VALUES, INDICES), ValueError,
      "x must have shape (..., in), got a scalar", id="matmul-x-scalar"),
    P(lambda: sj.fixed_fanin_matmul(jnp.ones((2, 1)), VALUES, INDICES), ValueError,
      "fan-in K=2 exceeds the input size in=1", id="matmul-k-exceeds-in"),
    P(lambda: sj.fixed_fanin_matmul(X, VALUES, INDICES, impl="cuda"), ValueError,
      "impl (or $SPARSEJAX_KERNELS) must be one of", id="matmul-bad-impl"),
    # -- check_fixed_fanin: the same checks under checkify, for traced layers
    P(lambda: _checkified(_corrupt(indices=INDICES.at[1, 0].set(7))), checkify.JaxRuntimeError,
      "FixedFanIn indices out of range [0, 4) in row 1", id="checkify-index-range"),
    P(lambda: _checkified(_corrupt(indices=INDICES.at[2, 0].set(3))), checkify.JaxRuntimeError,
      "FixedFanIn row 2 repeats an input column", id="checkify-repeat"),
    P(lambda: _checkified(_corrupt(values=VALUES.at[1, 1].set(jnp.nan))),
      checkify.JaxRuntimeError, "FixedFanIn values hold a NaN or inf in row 1",
      id="checkify-nan"),
    P(lambda: _corrupt(indices=INDICES.at[0, 0].set(1)).check(), checkify.JaxRuntimeError,
      "FixedFanIn row 0 repeats an input column", id="check-eager"),
    # -- masked dense layer
    P(lambda: sj.MaskedDense(jnp.ones((4, 3)), jnp.ones((4, 3))), ValueError,
      "mask must be a bool array", id="masked-mask-dtype"),
    P(lambda: sj.MaskedDense(jnp.ones((4, 3)), jnp.ones((3, 4), bool)), ValueError,
      "mask shape (3, 4) must equal weight shape (4, 3)", id="masked-mask-shape"),
    P(lambda: sj.MaskedDense(jnp.ones(4), jnp.ones(4, bool)), ValueError,
      "weight must have shape (in, out)", id="masked-weight-1d"),
    P(lambda: sj.MaskedDense(jnp.ones((4, 3)).at[0, 0].set(jnp.nan), jnp.ones((4, 3), bool)),
      ValueError, "weight holds a non-finite value nan", id="masked-nan"),
    P(lambda: sj.MaskedDense.init(4, 3, 2, key=KEY)(jnp.ones((2, 5))), ValueError,
      "x must have shape (..., 4)", id="masked-call-x-size"),
    # -- PRNG keys: every entry that takes one
    P(lambda: sj.FixedFanIn.init(8, 4, 2, key=0), ValueError, "got int 0", id="key-init-int"),
    P(lambda: sj.random_topology(8, 4, 2, key=0), ValueError, KEY_HINT, id="key-topology"),
    P(lambda: sj.MaskedDense.init(8, 4, 2, key=1), ValueError, KEY_HINT, id="key-masked"),
    P(lambda: sj.draw_columns(INDICES, jnp.ones((3, 2), bool), 8, key=0), ValueError, KEY_HINT,
      id="key-draw-columns"),
    P(lambda: rewiring.draw_all_columns(8, 4, 2, key=jnp.zeros(2, jnp.int32)), ValueError,
      "got an array of dtype int32 and shape (2,)", id="key-draw-all-int32"),
    P(lambda: rewiring.rewire_layer(INDICES, VALUES, prune_fraction=0.5, key=3, in_features=4),
      ValueError, KEY_HINT, id="key-rewire-layer"),
    P(lambda: sj.nm_prune(X, key=0, n=1, m=2, method="mvue"), ValueError, "got int 0",
      id="key-nm-prune"),
    P(lambda: sj.nm_prune(X, key=jax.random.split(KEY, 3), n=1, m=2, method="mvue"), ValueError,
      "got a key array of shape (3,)", id="key-nm-prune-key-array"),
    P(lambda: sj.prune_grad(X, key=0, n=1, m=2, method="mvue"), ValueError, "got int 0",
      id="key-prune-grad"),
    P(lambda: sj.prune_weight_grad(lambda x, w: x @ w, X, jnp.ones((4, 2)), key=0, n=1, m=2,
                                   method="mvue"),
      ValueError, KEY_HINT, id="key-prune-weight-grad"),
    P(lambda: sj.pruned_linear(X, jnp.ones((4, 2)), key=0, n=1, m=2, method="mvue"), ValueError,
      KEY_HINT, id="key-pruned-linear"),
    P(lambda: _set(key=0), ValueError, KEY_HINT, id="key-set-topology"),
    P(lambda: supar.initialize({"w": jnp.ones((2, 2))}, {"w": "hidden"}, sj.SuPar(), key=0),
      ValueError, KEY_HINT, id="key-supar-initialize"),
    P(lambda: xmc.balanced_kmeans(np.ones((4, 2), np.float32), 2, key=0), ValueError, KEY_HINT,
      id="key-balanced-kmeans"),
    P(lambda: xmc.label_clusters(None, 2, key=0), ValueError, KEY_HINT, id="key-label-clusters"),
    P(lambda: xmc.label_centroids([0, 1], [0], [1.0], [0, 1], [0], num_features=2, num_labels=1,
                                  dim=2, key=5),
      ValueError, KEY_HINT, id="key-label-centroids"),
    # -- N:M weight masks (nm_mask keeps refusing NaN: a weight mask of NaN is a bug)
    P(lambda: sj.nm_mask(jnp.ones((2, 4)).at[1, 2].set(jnp.nan), 2, 4), ValueError,
      "x holds a non-finite value nan at index (1, 2)", id="nm-mask-nan"),
    P(lambda: sj.nm_mask(jnp.ones((2, 6)), 2, 4), ValueError,
      "needs the length of axis 1 to be divisible by 4", id="nm-mask-not-divisible"),
    P(lambda: sj.nm_mask(jnp.ones((2, 4)), 3, 2), ValueError,
      "N:M sparsity needs integers 1 <= n <= m, got n=3, m=2", id="nm-mask-n-above-m"),
    P(lambda: sj.nm_mask(jnp.ones((2, 4)), 2, 4, axis=2), ValueError,
      "axis 2 is out of range for an array of shape (2, 4)", id="nm-mask-axis"),
    P(lambda: sj.nm_mask(jnp.ones((2, 4), jnp.int32), 2, 4), ValueError,
      "x must be a floating-point array", id="nm-mask-int"),
    P(lambda: sj.is_nm_sparse(jnp.ones((3, 4)), 2, 4, axis=0), ValueError,
      "divisible by 4", id="is-nm-sparse-not-divisible"),
    # -- MVUE N:M gradient pruning (a NaN/inf group is not an error: it propagates)
    P(lambda: sj.nm_prune(X, key=KEY, n=1, m=2, method="topk"), ValueError,
      "method must be one of ('mvue', 'mvue_approx', 'greedy'), got 'topk'", id="prune-method"),
    P(lambda: sj.nm_prune(X, key=KEY, n=1, m=4, method="mvue"), ValueError,
      "method 'mvue' supports 1:2, 2:4, got 1:4", id="prune-mvue-1-4"),
    P(lambda: sj.nm_prune(X, key=KEY, n=1, m=2, method="mvue_approx"), ValueError,
      "method 'mvue_approx' supports 2:4, got 1:2", id="prune-approx-1-2"),
    P(lambda: sj.nm_prune(X, n=2, m=2, method="greedy"), ValueError,
      "greedy N:M pruning needs integers 1 <= n < m, got n=2, m=2", id="prune-greedy-n-m"),
    P(lambda: sj.nm_prune(X, n=1, m=2, method="mvue"), ValueError,
      "this N:M method is random: pass a PRNG key", id="prune-no-key"),
    P(lambda: sj.nm_prune(jnp.ones((2, 6)), key=KEY, n=2, m=4, method="mvue"), ValueError,
      "divisible by 4", id="prune-not-divisible"),
    P(lambda: sj.nm_prune(X.astype(jnp.int32), key=KEY, n=1, m=2, method="mvue"), ValueError,
      "x must be a floating-point array", id="prune-int"),
    P(lambda: sj.prune_grad(jnp.ones((4, 6)), key=KEY, n=2, m=4, method="mvue", axis=1),
      ValueError, "divisible by 4", id="prune-grad-at-the-call"),
    P(lambda: sj.pruned_linear(X, jnp.ones((3, 2)), key=KEY, n=1, m=2, method="mvue"),
      ValueError, "pruned_linear needs x (..., in) and kernel (in, out)", id="pruned-linear-shape"),
    P(lambda: sj.pruned_linear(jnp.ones((3, 4)), jnp.ones((4, 2)), key=KEY, n=1, m=2,
                               method="mvue"),
      ValueError, "divisible by 2", id="pruned-linear-tokens"),
    P(lambda: prune_groups(jnp.ones((2, 4)), jnp.zeros((2, 1)), n=2, method="greedy"),
      ValueError, "prune_groups implements the random methods", id="prune-groups-greedy"),
    P(lambda: group_uniforms(2**32, 1, key=KEY), ValueError,
      "at most 2^32 - 1 groups per call", id="group-uniforms-too-many"),
    P(lambda: sj.nn.PrunedGrad(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), n=1, m=2, method="mvue",
                               axis="batch", rngs=nnx.Rngs(0)),
      ValueError, "axis must be 'tokens' or 'features', got 'batch'", id="pruned-grad-axis"),
    P(lambda: sj.resolve_impl("cuda"), ValueError, "must be one of", id="resolve-impl"),
    # -- set_topology / static_topology
    P(lambda: _set(interval=0), ValueError, "interval must be a positive integer, got 0",
      id="set-interval"),
    P(lambda: _set(end_step=-1), ValueError, "end_step must be a non-negative integer",
      id="set-end-step"),
    P(lambda: _set(prune_threshold=0.1), ValueError,
      "give exactly one of prune_fraction and prune_threshold", id="set-two-rules"),
    P(lambda: _set(prune_fraction=1.5), ValueError, "prune_fraction must be in [0, 1], got 1.5",
      id="set-fraction-range"),
    P(lambda: _set(prune_fraction=None, prune_threshold=-1.0), ValueError,
      "prune_threshold must be a non-negative number or a schedule", id="set-threshold"),
    P(lambda: _set(regrowth="magic"), ValueError, "regrowth must be 'random' or 'rigl'",
      id="set-regrowth"),
    P(lambda: _set(mesh=Mesh(np.array(jax.devices()), ("rows",))), ValueError, "with a 'labels' axis (row_axis)",
      id="set-mesh-axis"),
    P(lambda: _set().init({"kernel": jnp.ones((3, 2))}), ValueError,
      "the params hold no fixed fan-in layer", id="set-no-layer"),
    P(_nnx_optimizer_without_indices, ValueError,
      "pass wrt=(nnx.Param, sparsejax.nn.Indices) to nnx.Optimizer", id="set-nnx-wrt-param"),
    P(lambda: _set().update({}, _set().init({"a": _layer()})), ValueError,
      "set_topology needs params", id="set-update-no-params"),
    P(lambda: _set_update({"a": _layer()}, grads={"a": {"values": VALUES}}), ValueError,
      "differentiate with allow_int=True", id="set-grads-structure"),
    P(lambda: _set_update({"a": _layer()}, rewire=True), ValueError,
      "rewire must be None (decided inside jit) or False", id="set-rewire-flag"),
    P(lambda: _set_update({"a": {"values": VALUES, "indices": INDICES}}), ValueError,
      "pass in_features={'a': ...}", id="set-in-features"),
    P(lambda: _set_update({"a": _layer()}, tx=_set(regrowth="rigl")), ValueError,
      "regrowth='rigl' needs layer_io", id="set-rigl-no-io"),
    P(lambda: _set_update({"a": _layer()}, tx=_set(regrowth="rigl"),
                          layer_io={"a": (X, jnp.ones((2, 3)))},
                          regrowth_candidates={"a": sj.RegrowthCandidates(INDICES, VALUES)}),
      ValueError, "give layer_io or regrowth_candidates, not both", id="set-rigl-both"),
    P(lambda: _set_update({"a": _layer()}, tx=_set(regrowth="rigl"),
                          layer_io={"b": (X, jnp.ones((2, 3)))}),
      ValueError, "layer_io has no entry for sparse layer 'a'", id="set-rigl-io-name"),
    P(lambda: _set_update({"a": _layer()}, tx=_set(regrowth="rigl", prune_fraction=1.0),
                          regrowth_candidates={"a": sj.RegrowthCandidates(
                              INDICES[:, :1], VALUES[:, :1])}),
      ValueError, "has 1 candidates per row, but a row can prune up to 2", id="set-rigl-few"),
    P(lambda: sj.static_topology(optax.sgd(0.1)).update({}, None), ValueError,
      "static_topology needs params", id="static-no-params"),
    P(lambda: rewiring.rewire_layer(INDICES, VALUES, key=KEY, in_features=4), ValueError,
      "give exactly one of prune_fraction and prune_threshold", id="rewire-no-rule"),
    P(lambda: rewiring.rewire_layer(INDICES, VALUES, prune_fraction=0.5), ValueError,
      "give exactly one regrowth source", id="rewire-no-source"),
    P(lambda: rewiring.rewire_layer(INDICES, VALUES, prune_fraction=0.5, key=KEY), ValueError,
      "random regrowth (key=) needs in_features=", id="rewire-no-in"),
    P(lambda: sj.draw_columns(INDICES, jnp.ones((3, 2)), 8, key=KEY), ValueError,
      "free must be a bool array", id="draw-columns-free"),
    # -- SμPar
    P(lambda: sj.SuPar("adam"), ValueError, "parameterization must be one of", id="supar-name"),
    P(lambda: sj.SuPar(width=0), ValueError, "width must be a positive integer, got 0",
      id="supar-width"),
    P(lambda: sj.SuPar(init_std=0.0), ValueError, "init_std must be positive",
      id="supar-init-std"),
    P(lambda: supar.spec_table({"w": sj.ParamSpec("middle")}), ValueError,
      "w: role must be one of", id="supar-role"),
    P(lambda: supar.spec_table({"w": sj.ParamSpec("hidden", 1.5)}), ValueError,
      "w: density must be in (0, 1], got 1.5", id="supar-density"),
    P(lambda: supar.spec_table({"w": sj.ParamSpec("output", 0.5)}), ValueError,
      "w: only hidden weights may be sparse", id="supar-sparse-output"),
    P(lambda: supar.spec_table({"w": 3}), ValueError,
      "spec of 'w' must be a ParamSpec or a role string", id="supar-spec-type"),
    P(lambda: supar.infer_specs({"a": {"values": VALUES, "indices": INDICES}}), ValueError,
      "cannot tell the density of 'a/values'", id="supar-infer-density"),
    P(lambda: supar.initialize({"w": jnp.ones((2, 2))}, {"v": "hidden"}, sj.SuPar(), key=KEY),
      ValueError, "no SμPar spec for parameter 'w'", id="supar-missing-spec"),
    P(lambda: sj.scale_by_supar({"w": "hidden"}, sj.SuPar(), decay_coupling="both"), ValueError,
      "decay_coupling must be 'lr' or 'independent'", id="supar-decay-coupling"),
    P(lambda: sj.scale_by_supar({"w": "hidden"}, sj.SuPar(), weight_decay=-1.0), ValueError,
      "weight_decay must be >= 0", id="supar-weight-decay"),
    P(lambda: sj.SuPar().lr_multiplier(sj.ParamSpec("hidden"), optimizer="lion"), ValueError,
      "optimizer must be 'adam' (any Adam-family) or 'sgd'", id="supar-optimizer"),
    # -- EmbeddingBag
    P(lambda: _embed(jnp.array([[1, 10]])), ValueError,
      "ids[0, 1] = 10 is out of range for num_embeddings=10", id="embed-id-range"),
    P(lambda: _embed(jnp.ones((1, 2))), ValueError, "ids must be an integer array",
      id="embed-ids-float"),
    P(lambda: _embed(jnp.int32(1)), ValueError, "ids must have shape (..., F), got a scalar",
      id="embed-ids-scalar"),
    P(lambda: _embed(jnp.array([[1, 2]]), weights=jnp.ones(3)), ValueError,
      "weights must have the shape of ids (1, 2)", id="embed-weights-shape"),
    P(lambda: _embed(jnp.array([[1, 2]]), mask=jnp.ones((1, 2))), ValueError,
      "mask must be a bool array", id="embed-mask-dtype"),
    # -- XMC: chunked losses and top-k, label ids, sharding, metrics, clusters
    P(lambda: _loss(label_ids=LABEL_IDS + 1), ValueError,
      "label_ids[0, 1] = 5 is out of range for L=5", id="loss-label-id-range"),
    P(lambda: _loss(label_ids=LABEL_IDS - 1), ValueError,
      "label_ids[0, 0] = -1 is out of range for L=5", id="loss-label-id-negative"),
    P(lambda: _candidates(label_ids=LABEL_IDS * 3), ValueError,
      "label_ids[0, 1] = 12 is out of range for L=5", id="candidates-label-id-range"),
    P(lambda: _sharded_loss(label_ids=LABEL_IDS + 1), ValueError,
      "label_ids[0, 1] = 5 is out of range for L=5", id="sharded-label-id-range"),
    P(lambda: _checked_labels(LABEL_IDS.copy() + [[0, 0], [4, 0]]), checkify.JaxRuntimeError,
      "label_ids[1, 0] = 6 is out of range for L=5", id="checkify-label-ids"),
    P(lambda: _loss(chunk_size=0), ValueError, "chunk_size must be a positive integer, got 0",
      id="loss-chunk-zero"),
    P(lambda: _loss(chunk_size=2.5), ValueError, "chunk_size must be a positive integer",
      id="loss-chunk-float"),
    P(lambda: _loss(loss="hinge"), ValueError, "loss must be one of", id="loss-name"),
    P(lambda: _loss(h=jnp.ones(4)), ValueError, "h must have shape (B, d)", id="loss-h-1d"),
    P(lambda: _loss(label_ids=LABEL_IDS[:1]), ValueError,
      "label_ids must have shape (2, Lmax) to match h", id="loss-label-ids-shape"),
    P(lambda: _loss(label_mask=LABEL_MASK.astype(int)), ValueError,
      "label_mask must be a bool array of shape (2, 2)", id="loss-label-mask"),
    P(lambda: _loss(classifier={"kernel_t": jnp.ones((5, 4)), "bias": jnp.ones(6)}), ValueError,
      "same leading (label) axis", id="loss-classifier-leaves"),
    P(lambda: _loss(logits_fn=lambda p, h: xmc.dense_logits(p, h)[:, :1]), ValueError,
      "logits_fn must return (B, chunk)", id="loss-logits-fn"),
    P(lambda: xmc.chunked_topk(xmc.dense_logits, DENSE, H, k=6, chunk_size=2), ValueError,
      "k must be an integer in [1, L=5], got 6", id="topk-k"),
    P(lambda: xmc.chunked_topk(xmc.dense_logits, DENSE, H, k=2, chunk_size=0), ValueError,
      "chunk_size must be a positive integer", id="topk-chunk"),
    P(lambda: _candidates(num_candidates=0), ValueError,
      "num_candidates must be an integer in [1, in=4]", id="candidates-count"),
    P(lambda: _candidates(classifier=DENSE), ValueError,
      "a fixed fan-in classifier must be a FixedFanIn or a mapping", id="candidates-dense"),
    P(lambda: xmc.mesh_from_spec(""), ValueError, "mesh spec must be a non-empty string",
      id="mesh-empty"),
    P(lambda: xmc.mesh_from_spec("data"), ValueError, "item 'data' is not 'name:size'",
      id="mesh-malformed"),
    P(lambda: xmc.mesh_from_spec("model:8"), ValueError, "unknown axis 'model'",
      id="mesh-unknown-axis"),
    P(lambda: xmc.mesh_from_spec("labels:4,labels:2"), ValueError,
      "axis 'labels' is given twice", id="mesh-twice"),
    P(lambda: xmc.mesh_from_spec("labels:0"), ValueError,
      "axis 'labels' must have a positive size, got 0", id="mesh-size-zero"),
    P(lambda: xmc.mesh_from_spec("labels:3"), ValueError,
      "asks for 1 x 3 = 3 devices, but 8 are given", id="mesh-device-count"),
    P(lambda: xmc.padded_num_labels(5, 0), ValueError, "shards must be a positive integer",
      id="padded-shards"),
    P(lambda: xmc.pad_labels(DENSE, 4), ValueError, "num_padded must be an integer >= L=5",
      id="pad-labels-fewer"),
    P(lambda: _sharded_loss(classifier=DENSE), ValueError,
      "the classifier's 5 rows do not split over the 8 devices", id="sharded-rows"),
    P(lambda: _sharded_loss(mesh="labels:8"), ValueError,
      "mesh must be a jax.sharding.Mesh", id="sharded-mesh-type"),
    P(lambda: _sharded_loss(num_labels=9), ValueError,
      "num_labels must be an integer in [1, 8]", id="sharded-num-labels"),
    P(lambda: _sharded_loss(label_axis="data"), ValueError,
      "label_axis and data_axis must differ", id="sharded-same-axes"),
    P(lambda: xmc.sharded_chunked_topk(xmc.dense_logits, xmc.pad_labels(DENSE, 8), H,
                                       mesh=_mesh(), num_labels=5, k=6, chunk_size=2),
      ValueError, "k must be an integer in [1, num_labels=5]", id="sharded-topk-k"),
    P(lambda: xmc.ranking_metrics(np.array([[0, 7]]), LABEL_IDS[:1], LABEL_MASK[:1],
                                  inv_propensity=np.ones(5), ks=(1, 2)),
      ValueError, "topk_ids must lie in [0, 5)", id="metrics-topk-range"),
    P(lambda: xmc.ranking_metrics(np.array([[0, 0]]), LABEL_IDS[:1], LABEL_MASK[:1], ks=(1, 2)),
      ValueError, "topk_ids row 0 repeats a label id", id="metrics-topk-repeat"),
    P(lambda: xmc.RankingMetrics(ks=(0,)), ValueError,
      "ks must be a non-empty sequence of positive integers", id="metrics-ks"),
    P(lambda: xmc.RankingMetrics().result(), ValueError,
      "result() called before any update with points", id="metrics-empty"),
    P(lambda: xmc.inverse_propensity(np.array([1.0, -1.0]), 10), ValueError,
      "label_counts must be finite and >= 0", id="propensity-counts"),
    P(lambda: xmc.format_table({}), ValueError, "results is empty", id="format-table-empty"),
    P(lambda: xmc.balanced_kmeans(np.ones((4, 2), np.float32), 5, key=KEY), ValueError,
      "num_clusters must be an integer in [1, L=4], got 5", id="kmeans-clusters"),
    P(lambda: xmc.balanced_kmeans(np.full((4, 2), np.nan, np.float32), 2, key=KEY), ValueError,
      "points holds a non-finite value", id="kmeans-nan"),
    P(lambda: xmc.label_centroids([0, 1], [0], [1.0], [0, 1], [0], num_features=2, num_labels=1,
                                  dim=0, key=KEY),
      ValueError, "dim must be a positive integer, got 0", id="centroids-dim"),
    # -- data (the readers' own format errors are tested in tests/test_xmc_data.py)
    P(lambda: data.XMCDataset(np.array([0, 1]), np.array([0], np.int32),
                              np.array([1.0], np.float32), np.array([0, 1]),
                              np.array([5], np.int32), 2, 3),
      ValueError, "id 5 in row 0 is outside [0, 3)", id="dataset-label-range"),
]


# -- Data ---------------------------------------------------------------------------------------

GOOD = "0,1 0:1.5 3:2\n"
CUT_SHORT = "last line has no trailing newline, so the file looks cut short"


def _bow(text: str | bytes, read=read_bow):
  """Writes ``text`` to ``data.txt`` and reads it with ``read``."""
  def setup(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    read(path)
  return setup


def _raw(text: bytes, labels: bytes, **kwargs):
  """Writes the raw-text pair ``x.txt`` (documents) and ``y.txt`` (labels) and reads it."""
  def setup(tmp_path):
    (tmp_path / "x.txt").write_bytes(text)
    (tmp_path / "y.txt").write_bytes(labels)
    read_raw_text(tmp_path / "x.txt", tmp_path / "y.txt", **kwargs)
  return setup


def _pair(train_text: str, test_text: str):
  """Writes ``train.txt`` and ``test.txt``, reads both and checks them as a pair."""
  def setup(tmp_path):
    paths = [tmp_path / "train.txt", tmp_path / "test.txt"]
    for path, text in zip(paths, (train_text, test_text)):
      path.write_text(text)
    check_train_test(*map(read_bow, paths), train_name="train.txt", test_name="test.txt")
  return setup


def _call(fn, *args, **kwargs):
  """Calls ``fn(*args, **kwargs)``; the arguments are built lazily when they are callables."""
  def setup(tmp_path):
    fn(*(a() if callable(a) else a for a in args),
       **{k: v() if callable(v) else v for k, v in kwargs.items()})
  return setup


def _data(points, num_features: int = 5, num_labels: int = 3):
  """A dataset builder from ``[(label_ids, feature_ids), ...]``, all values 1."""
  return lambda: XMCDataset.from_rows(
    ((np.array(labels, np.int32), np.array(features, np.int32),
      np.ones(len(features), np.float32)) for labels, features in points),
    num_features, num_labels)


def _fields(**changes):
  """The arguments of a valid 2-point ``XMCDataset``, with ``changes``."""
  fields = dict(feature_indptr=np.array([0, 2, 3]), feature_ids=np.array([1, 4, 0]),
                feature_values=np.array([0.5, 2.0, 1.0], np.float32),
                label_indptr=np.array([0, 2, 3]), label_ids=np.array([0, 2, 1]),
                num_features=5, num_labels=3)
  return fields | changes


TRAIN = _data([([0, 1], [0, 3]), ([2], [1])])
NO_POINTS = _data([])
NO_LABELS = _data([([], [0, 3]), ([], [1])])
NO_FEATURES = _data([([0, 1], []), ([2], [])])

DATA_ROWS = [
  # -- BoW files cut short: the last line lacks its newline, or whole lines are missing.
  pytest.param(_bow("2 5 3\n" + GOOD + "0 3:0."), XMCFormatError, f"data.txt:3: {CUT_SHORT}",
               id="cut-mid-value"),
  pytest.param(_bow("2 5 3\n" + GOOD + "0 3:"), XMCFormatError, f"data.txt:3: {CUT_SHORT}",
               id="cut-after-colon"),
  pytest.param(_bow("2 5 3\n" + GOOD + "1,2,"), XMCFormatError, f"data.txt:3: {CUT_SHORT}",
               id="cut-in-label-list"),
  pytest.param(_bow("2 5 3\n" + GOOD + "0 1:1.5 3:2"), XMCFormatError,
               "if it is complete, add the final newline", id="cut-at-a-valid-prefix"),
  pytest.param(_bow("2 5 3\n" + GOOD + "0 3:0.", read=lambda p: list(iter_bow(p))),
               XMCFormatError, f"data.txt:3: {CUT_SHORT}", id="cut-while-streaming"),
  pytest.param(_bow("2 5", read=bow_header), XMCFormatError, f"data.txt:1: {CUT_SHORT}",
               id="cut-in-header"),
  pytest.param(_bow(b"1 5 3\r\n0 1:1\r"), XMCFormatError, f"data.txt:2: {CUT_SHORT}",
               id="cut-between-cr-and-lf"),
  pytest.param(_bow("3 5 3\n" + GOOD), XMCFormatError,
               "data.txt:3: header says N = 3 points, but the file ends after 1",
               id="fewer-lines-than-header-n"),
  # -- BoW header.
  pytest.param(_bow("0 5 3\n"), XMCFormatError,
               "data.txt:1: header N = 0: the file must hold at least one point",
               id="header-n-zero"),
  pytest.param(_bow("0 5 3\n" + GOOD), XMCFormatError, "data.txt:1: header N = 0",
               id="header-n-zero-with-points"),
  pytest.param(_bow("1 0 3\n" + GOOD), XMCFormatError,
               "data.txt:1: header D = 0 must be in [1, 2**31)", id="header-d-zero"),
  pytest.param(_bow("1 5 2147483648\n" + GOOD), XMCFormatError,
               "header L = 2147483648 must be in [1, 2**31)", id="header-l-beyond-int32"),
  pytest.param(_bow("3 5\n"), XMCFormatError,
               "data.txt:1: header must be 'N D L' (3 integers), got 2", id="header-two-fields"),
  pytest.param(_bow("1 5.0 3\n" + GOOD), XMCFormatError,
               "header D is not a non-negative integer: '5.0'", id="header-float"),
  pytest.param(_bow(""), XMCFormatError, "data.txt:1: empty file, expected the header 'N D L'",
               id="empty-file"),
  # -- BoW point lines.
  pytest.param(_bow("1 5 3\n1,2,\n"), XMCFormatError, "data.txt:2: empty label id",
               id="label-list-trailing-comma"),
  pytest.param(_bow("1 5 3\n0 3:\n"), XMCFormatError,
               "data.txt:2: feature value '' of feature 3 is not a number", id="value-missing"),
  pytest.param(_bow("1 5 3\n0 3\n"), XMCFormatError, "feature '3' has no ':' (expected id:value)",
               id="feature-without-colon"),
  pytest.param(_bow("1 5 3\n0 1:abc\n"), XMCFormatError, "value 'abc' of feature 1 is not a number",
               id="value-not-numeric"),
  pytest.param(_bow("1 5 3\n0 1:nan\n"), XMCFormatError, "value 'nan' of feature 1 is not finite",
               id="value-nan"),
  pytest.param(_bow("1 5 3\n0 1:-inf\n"), XMCFormatError, "value '-inf' of feature 1 is not finite",
               id="value-inf"),
  pytest.param(_bow("1 5 3\n0 1:1e39\n"), XMCFormatError,
               "data.txt:2: feature value 1e+39 of feature 1 overflows float32",
               id="value-overflow"),
  pytest.param(_bow("1 5 3\n0 5:1\n"), XMCFormatError,
               "data.txt:2: feature id 5 is out of range [0, 5)", id="feature-id-out-of-range"),
  pytest.param(_bow("1 5 3\n3 0:1\n"), XMCFormatError,
               "data.txt:2: label id 3 is out of range [0, 3)", id="label-id-out-of-range"),
  pytest.param(_bow("1 5 3\n0 -1:1\n"), XMCFormatError, "negative feature id -1",
               id="feature-id-negative"),
  pytest.param(_bow("1 5 3\na,1 0:1\n"), XMCFormatError,
               "label id 'a' is not a non-negative integer", id="label-id-not-numeric"),
  pytest.param(_bow("1 5 3\n1,1 0:1\n"), XMCFormatError, "data.txt:2: label id 1 is repeated",
               id="label-id-repeated"),
  pytest.param(_bow("1 5 3\n1 2:1 2:3\n"), XMCFormatError, "data.txt:2: feature id 2 is repeated",
               id="feature-id-repeated"),
  pytest.param(_bow("1 5 3\n0 1:1\u00e9\n"), XMCFormatError,
               "data.txt:2: non-ASCII byte at column 6", id="non-ascii"),
  pytest.param(_bow("1 5 3\n" + GOOD + GOOD), XMCFormatError,
               "data.txt:3: header says N = 1 points, but the file has more lines",
               id="more-lines-than-header-n"),
  # -- Raw text.
  pytest.param(_raw(b"a\nb wo", b"0\n1\n"), XMCFormatError, f"x.txt:2: {CUT_SHORT}",
               id="raw-text-cut-short"),
  pytest.param(_raw(b"a\nb\n", b"0\n1,2"), XMCFormatError, f"y.txt:2: {CUT_SHORT}",
               id="raw-labels-cut-short"),
  pytest.param(_raw(b"", b""), XMCFormatError,
               "x.txt:1: empty file, expected at least one document", id="raw-empty"),
  pytest.param(_raw(b"a\nb\nc\n", b"1\n2\n"), XMCFormatError, "x.txt has 3 lines but ",
               id="raw-fewer-label-lines"),
  pytest.param(_raw(b"a\n", b"1\n2\n"), XMCFormatError,
               "x.txt has 1 lines but ", id="raw-fewer-docs"),
  pytest.param(_raw(b"ok\n\xff\n", b"1\n2\n"), XMCFormatError, "x.txt:2: invalid UTF-8 at byte 1",
               id="raw-bad-utf8"),
  pytest.param(_raw(b"a\n", b"8\n", num_labels=8), XMCFormatError,
               "y.txt:1: label id 8 is out of range [0, 8)", id="raw-label-out-of-range"),
  pytest.param(_raw(b"a\n", b"3,3\n"), XMCFormatError, "y.txt:1: label id 3 is repeated",
               id="raw-label-repeated"),
  pytest.param(_raw(b"a\n", b"1,\n"), XMCFormatError, "y.txt:1: empty label id",
               id="raw-label-trailing-comma"),
  pytest.param(_raw(b"a\n", b"1\n", num_labels=0), ValueError,
               "num_labels must be an integer in [1, 2147483647], got 0", id="raw-num-labels-zero"),
  # -- Train/test pairs (check_train_test).
  pytest.param(_pair("2 5 3\n 0:1\n1:2\n", "1 5 3\n" + GOOD), ValueError,
               "train.txt has no positive label at all", id="train-without-labels"),
  pytest.param(_pair("1 5 3\n" + GOOD, "1 5 3\n 0:1\n"), ValueError,
               "test.txt has no positive label at all", id="test-without-labels"),
  pytest.param(_pair("1 5 3\n" + GOOD, "1 6 3\n" + GOOD), ValueError,
               "test.txt has num_features = 6 (more than train.txt's 5); the model's sizes are the "
               "training set's, so the headers' D and L must agree", id="test-more-features"),
  pytest.param(_pair("1 5 3\n" + GOOD, "1 5 4\n" + GOOD), ValueError,
               "test.txt has num_labels = 4 (more than train.txt's 3)", id="test-more-labels"),
  pytest.param(_pair("1 5 3\n" + GOOD, "1 5 2\n" + GOOD), ValueError,
               "test.txt has num_labels = 2 (fewer than train.txt's 3)", id="test-fewer-labels"),
  pytest.param(_call(check_train_test, NO_POINTS, TRAIN), ValueError, "train has no points",
               id="train-without-points"),
  pytest.param(_call(check_train_test, TRAIN, NO_POINTS), ValueError, "test has no points",
               id="test-without-points"),
  pytest.param(_call(check_train_test, NO_LABELS, TRAIN), ValueError,
               "train has no positive label at all: every point's label list is empty",
               id="train-without-labels-in-memory"),
  pytest.param(_call(check_train_test, NO_FEATURES, TRAIN), ValueError,
               "train has no feature at all", id="train-without-features"),
  # -- XMCDataset and synthetic_xmc arguments.
  pytest.param(_call(XMCDataset, **_fields(num_labels=0)), ValueError,
               "num_labels must be an integer in [1, 2147483647], got 0",
               id="dataset-num-labels-zero"),
  pytest.param(_call(XMCDataset, **_fields(num_features=-5)), ValueError,
               "num_features must be an integer in [1, 2147483647], got -5",
               id="dataset-num-features-negative"),
  pytest.param(_call(XMCDataset, **_fields(num_labels=3.0)), ValueError,
               "num_labels must be an integer, got 3.0", id="dataset-num-labels-float"),
  pytest.param(_call(XMCDataset, **_fields(label_ids=np.array([0, 3, 1]))), ValueError,
               "label_ids: id 3 in row 0 is outside [0, 3)", id="dataset-label-out-of-range"),
  pytest.param(_call(XMCDataset, **_fields(feature_ids=np.array([4, 1, 0]))), ValueError,
               "feature_ids: ids in row 0 are not strictly increasing (4 then 1)",
               id="dataset-ids-unsorted"),
  pytest.param(_call(XMCDataset, **_fields(feature_values=np.array([0.5, np.inf, 1.0]))),
               ValueError, "feature_values: value inf in row 0 is not finite",
               id="dataset-value-inf"),
  pytest.param(_call(synthetic_xmc, seed=0, num_labels=0), ValueError,
               "num_labels must be an integer in [1, 2147483647], got 0",
               id="synthetic-num-labels-zero"),
  pytest.param(_call(synthetic_xmc, seed=0, num_labels=2**31), ValueError,
               "num_labels must be an integer in [1, 2147483647], got 2147483648",
               id="synthetic-num-labels-beyond-int32"),
  pytest.param(_call(synthetic_xmc, seed=0, num_train=-1), ValueError,
               "num_train must be an integer >= 1, got -1", id="synthetic-num-train-negative"),
  pytest.param(_call(synthetic_xmc, seed=0, signature_size=2.5), ValueError,
               "signature_size must be an integer, got 2.5", id="synthetic-signature-size-float"),
  pytest.param(_call(synthetic_xmc, seed=0, zipf_exponent=float("nan")), ValueError,
               "zipf_exponent must be finite and >= 0, got nan", id="synthetic-zipf-nan"),
  # -- Writers.
  pytest.param(lambda tmp_path: write_bow(tmp_path / "data.txt", NO_POINTS()), ValueError,
               "dataset has no points; a BoW file must hold at least one", id="write-bow-empty"),
  pytest.param(lambda tmp_path: write_raw_text(tmp_path / "x.txt", tmp_path / "y.txt", [],
                                               np.zeros(1, np.int64), np.zeros(0, np.int32)),
               ValueError, "no documents", id="write-raw-text-empty"),
  pytest.param(lambda tmp_path: write_raw_text(tmp_path / "x.txt", tmp_path / "y.txt", ["a\nb"],
                                               np.zeros(2, np.int64), np.zeros(0, np.int32)),
               ValueError, "document 0 contains a line break", id="write-raw-text-line-break"),
  # -- Padding caps and batching arguments.
  pytest.param(_call(pad_points, TRAIN, np.array([0]), max_features=1, max_labels=2), ValueError,
               "point 0 has 2 features, more than the cap 1 (raise the cap; nothing is truncated)",
               id="pad-features-over-cap"),
  pytest.param(_call(pad_points, TRAIN, np.array([1, 0]), max_features=2, max_labels=1),
               ValueError, "point 0 has 2 labels, more than the cap 1", id="pad-labels-over-cap"),
  pytest.param(_call(pad_points, TRAIN, np.array([0]), max_features=-1, max_labels=2), ValueError,
               "max_features must be an integer >= 0, got -1", id="pad-negative-cap"),
  pytest.param(_call(pad_points, TRAIN, np.array([2]), max_features=2, max_labels=2), ValueError,
               "row 2 is outside [0, 2)", id="pad-row-out-of-range"),
  pytest.param(_call(lambda d: next(batches(d, batch_size=0, seed=0, epoch=0)), TRAIN), ValueError,
               "batch_size must be an integer >= 1, got 0", id="batches-batch-size-zero"),
  pytest.param(_call(lambda d: next(batches(d, batch_size=1, seed=0, epoch=0, start_step=3)),
                     TRAIN), ValueError, "start_step must be in [0, 2] (batches per epoch), got 3",
               id="batches-start-step-past-epoch"),
  pytest.param(_call(lambda d: next(batches(d, batch_size=2, seed=0, epoch=0, max_labels=1)),
                     TRAIN), ValueError, "2 labels, more than the cap 1",
               id="batches-cap-too-small"),
  pytest.param(_call(epoch_order, 10, seed=-1, epoch=0), ValueError,
               "seed must be an integer >= 0, got -1", id="epoch-order-negative-seed"),
  pytest.param(_call(steps_per_epoch, -3, batch_size=2), ValueError,
               "num_points must be an integer >= 0, got -3", id="steps-negative-points"),
  pytest.param(_call(pad_tokens, ["a b c"], np.array([0]), max_len=2, vocab=10), ValueError,
               "document 0 has 3 words > max_len 2 (pass truncate=True to cut it)",
               id="tokens-over-max-len"),
  pytest.param(_call(pad_tokens, ["a"], np.array([0]), max_len=0, vocab=10), ValueError,
               "max_len must be an integer >= 1, got 0", id="tokens-max-len-zero"),
  pytest.param(_call(hash_tokenize, "a b", 1), ValueError, "vocab must be >= 2 (id 0 is padding)",
               id="tokens-vocab-one"),
]


# -- The XMC trainer ------------------------------------------------------------------------------

_TINY = dict(num_train=200, num_test=50, num_labels=16, num_features=64, embed_dim=8, fan_in=4,
             batch_size=20, epochs=1, warmup_steps=2, label_chunk=16, eval_every=0)


def _flags(**overrides):
  """``check_config`` of the default config with ``overrides``: no data, no JAX work."""
  return lambda: train.check_config(train.Config(**overrides))


def _run(tmp_path, **overrides):
  """A whole (tiny) run, for the checks that need the data's size."""
  train.run(train.Config(output_dir=str(tmp_path / "run"), **{**_TINY, **overrides}),
            report=lambda line: None)


TRAINER_ROWS = [
    pytest.param(_flags(epochs=0), ValueError, "--epochs must be >= 1, got 0", id="epochs-0"),
    pytest.param(_flags(warmup_steps=-10), ValueError, "--warmup_steps must be >= 0, got -10",
                 id="warmup-negative"),
    pytest.param(_flags(hidden_layers=-1), ValueError, "--hidden_layers must be >= 0",
                 id="hidden-layers-negative"),
    pytest.param(_flags(intermediate=-1), ValueError, "--intermediate must be >= 0",
                 id="intermediate-negative"),
    pytest.param(_flags(embed_dim=-1), ValueError, "--embed_dim must be >= 0",
                 id="embed-dim-negative"),
    pytest.param(_flags(cluster_size=0), ValueError, "--cluster_size must be >= 1",
                 id="cluster-size-0"),
    pytest.param(_flags(eval_batch_size=0), ValueError, "--eval_batch_size must be >= 1",
                 id="eval-batch-0"),
    pytest.param(_flags(aux_weight=2.0), ValueError, "--aux_weight must be in [0, 1], got 2.0",
                 id="aux-weight-2"),
    pytest.param(_flags(aux_weight=-0.1), ValueError, "--aux_weight must be in [0, 1]",
                 id="aux-weight-negative"),
    pytest.param(_flags(aux_epochs=0.0), ValueError, "--aux_epochs must be > 0", id="aux-epochs-0"),
    pytest.param(_flags(set_until=3.0), ValueError, "--set_until must be in (0, 1], got 3.0",
                 id="set-until-3"),
    pytest.param(_flags(set_until=0.0), ValueError, "--set_until must be in (0, 1], got 0.0",
                 id="set-until-0"),
    pytest.param(_flags(set_fraction=1.5), ValueError, "--set_fraction must be in [0, 1]",
                 id="set-fraction-1.5"),
    pytest.param(_flags(set_interval=-1), ValueError, "--set_interval must be >= 0",
                 id="set-interval-negative"),
    pytest.param(_flags(propensity_a=-1.0), ValueError, "--propensity_a must be > 0, got -1.0",
                 id="propensity-a-negative"),
    pytest.param(_flags(propensity_a=0.0), ValueError, "--propensity_a must be > 0",
                 id="propensity-a-0"),
    pytest.param(_flags(propensity_b=-1.0), ValueError, "--propensity_b must be >= 0",
                 id="propensity-b-negative"),
    pytest.param(_flags(encoder_lr=float("nan")), ValueError,
                 "--encoder_lr must be a finite number, got nan", id="encoder-lr-nan"),
    pytest.param(_flags(classifier_lr=float("inf")), ValueError,
                 "--classifier_lr must be a finite number, got inf", id="classifier-lr-inf"),
    pytest.param(_flags(encoder_lr=0.0), ValueError, "--encoder_lr must be > 0", id="encoder-lr-0"),
    pytest.param(_flags(classifier_lr=-1e-3), ValueError, "--classifier_lr must be > 0",
                 id="classifier-lr-negative"),
    pytest.param(_flags(label_chunk=-1), ValueError, "--label_chunk must be >= 0",
                 id="label-chunk-negative"),
    pytest.param(_flags(batch_size=0), ValueError, "--batch_size must be >= 1", id="batch-0"),
    pytest.param(_flags(num_labels=0), ValueError, "--num_labels must be >= 1", id="labels-0"),
    pytest.param(_flags(num_train=0), ValueError, "--num_train must be >= 1", id="train-0"),
    pytest.param(_flags(num_test=0), ValueError, "--num_test must be >= 1", id="test-0"),
    pytest.param(_flags(num_features=0), ValueError, "--num_features must be >= 1",
                 id="features-0"),
    pytest.param(_flags(data_seed=-1), ValueError, "--data_seed must be >= 0", id="data-seed"),
    pytest.param(_flags(seed=-1), ValueError, "--seed must be >= 0", id="seed-negative"),
    pytest.param(_flags(epochs=3, eval_every=-1), ValueError, "--eval_every must be >= 0",
                 id="eval-every-negative"),
    pytest.param(_flags(checkpoint_every=-5), ValueError, "--checkpoint_every must be >= 0",
                 id="checkpoint-every-negative"),
    pytest.param(_flags(fan_in=-1), ValueError, "--fan_in must be >= 0", id="fan-in-negative"),
    pytest.param(_flags(fan_in=500, embed_dim=128), ValueError,
                 "--fan_in=500 exceeds the classifier's input width 128 (--embed_dim)",
                 id="fan-in-above-embed"),
    pytest.param(_flags(intermediate=16, fan_in=32), ValueError,
                 "--fan_in=32 exceeds the classifier's input width 16 (--intermediate)",
                 id="fan-in-above-intermediate"),
    pytest.param(_flags(loss="hinge"), ValueError, "--loss must be one of squared_hinge, bce",
                 id="loss-unknown"),
    pytest.param(_flags(compute_dtype="float16"), ValueError,
                 "--compute_dtype must be one of auto, float32, bfloat16", id="dtype-unknown"),
    pytest.param(_flags(regrowth="grow"), ValueError, "--regrowth must be one of random, rigl",
                 id="regrowth-unknown"),
    pytest.param(_flags(regrowth="rigl", set_interval=0), ValueError,
                 "--regrowth=rigl rewires the fixed fan-in classifier", id="rigl-static"),
    pytest.param(_flags(supar=True, fan_in=0), ValueError,
                 "--supar scales the fixed fan-in classifier: it needs --fan_in > 0",
                 id="supar-dense"),
    pytest.param(_flags(grad_prune="mvue:2:4", batch_size=130), ValueError,
                 "--batch_size=130 must be a multiple of 4", id="grad-prune-batch"),
    pytest.param(_flags(grad_prune="mvue:1:2", hidden_layers=0), ValueError,
                 "it needs --hidden_layers > 0", id="grad-prune-no-mlp"),
    pytest.param(_flags(grad_prune="mvue:1:4"), ValueError, "--grad_prune must be one of",
                 id="grad-prune-unknown"),
    pytest.param(_flags(dataset="/no/such/dir"), ValueError,
                 "--dataset=/no/such/dir: the directory does not exist", id="dataset-missing"),
    pytest.param(_flags(output_dir=""), ValueError, "--output_dir must not be empty",
                 id="output-dir-empty"),
]


def _run_case(overrides, *, dataset_files=None):
  def call(tmp_path):
    if dataset_files is not None:
      for name, text in dataset_files.items():
        (tmp_path / name).write_text(text)
      overrides["dataset"] = str(tmp_path)
    _run(tmp_path, **overrides)
  return call


RUN_ROWS = [
    pytest.param(_run_case(dict(batch_size=500)), ValueError,
                 "--batch_size=500 exceeds the 183 training points", id="batch-above-points"),
    pytest.param(_run_case(dict(warmup_steps=10)), ValueError,
                 "--warmup_steps=10 must be below the run's 9 steps", id="warmup-above-run"),
    pytest.param(_run_case(dict(mesh="labels:3")), ValueError, "--mesh=labels:3:",
                 id="mesh-size"),
    pytest.param(_run_case(dict(mesh="data:2,labels:4", batch_size=21)), ValueError,
                 "--batch_size=21 is not a multiple of the 2 data shards", id="mesh-batch"),
    pytest.param(_run_case({}, dataset_files={"train.txt": "1 4 3\n0 1:0.5\n"}), ValueError,
                 "has no test.txt", id="dataset-no-test"),
    pytest.param(_run_case({}, dataset_files={"train.txt": "2 4 3\n0 1:0.5\n1 2:1.0",
                                              "test.txt": "1 4 3\n0 1:0.5\n"}), ValueError,
                 "train.txt:3", id="dataset-cut-short"),
    pytest.param(_run_case({}, dataset_files={"train.txt": "1 4 3\n0 1:0.5\n",
                                              "test.txt": "1 9 3\n0 7:0.5\n"}), ValueError,
                 "test.txt", id="dataset-test-more-features"),
]


@pytest.mark.parametrize("call, error, fragment", API_ROWS + TRAINER_ROWS)
def test_bad_input_raises_a_clear_error(call, error, fragment):
  with pytest.raises(Exception, match=re.escape(fragment)) as raised:
    call()
  assert isinstance(raised.value, error), (type(raised.value), raised.value)


@pytest.mark.parametrize("setup, error, fragment", DATA_ROWS)
def test_bad_data_is_refused(tmp_path, setup, error, fragment):
  with pytest.raises(error, match=re.escape(fragment)):
    setup(tmp_path)


@pytest.mark.parametrize("call, error, fragment", RUN_ROWS)
def test_bad_run_is_refused_before_training(tmp_path, call, error, fragment):
  with pytest.raises(error, match=re.escape(fragment)):
    call(tmp_path)
  assert not (tmp_path / "run" / "config.json").exists()


def test_the_tables_cover_every_case_once():
  rows = API_ROWS + DATA_ROWS + TRAINER_ROWS + RUN_ROWS
  assert len({row.id for row in rows}) == len(rows)
  assert len(API_ROWS) >= 60 and len(DATA_ROWS) >= 35 and len(TRAINER_ROWS) >= 35
