"""SET (and RigL) topology updates for fixed fan-in layers, as an optax wrapper.

``set_topology(inner, ...)`` wraps any optax optimizer. On most steps it is the
inner optimizer. Every ``interval`` steps up to ``end_step`` it also rewires
each fixed fan-in layer: per row it prunes the smallest ``|w|`` (a scheduled
fraction of the row, or every weight under a scheduled threshold) and regrows
as many new input columns, at random (SET) or by the largest dense gradient
(RigL). Rows keep exactly ``K`` distinct columns.

How the new topology reaches the parameters: the returned updates hold, for
each layer, ``values`` updates that set the rewired slots to exactly zero and
``indices`` updates that are integer deltas (in the indices' own dtype, so the
modular sum is exact). ``optax.apply_updates`` therefore applies a whole step,
for a plain pytree and for ``nnx.Optimizer`` alike. The gradients passed in
must mirror the params, indices included; differentiate with ``allow_int=True``
(their ``float0`` gradients are ignored)::

  grads = jax.grad(loss, allow_int=True)(params)               # plain pytree
  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)

  wrt = (nnx.Param, sparsejax.nn.Indices)                       # Flax NNX
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt), allow_int=True)(model, batch)
  optimizer.update(model, grads)

With ``mesh=``, each device rewires only the rows of every layer that it holds
(``jax.shard_map`` over the rows), and the random draws of a row depend only
on the key, the step, the layer and the row's global index, so the topology
is the same bit for bit whatever the mesh (or none).
"""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax import _tree
from sparsejax._vma import varying_like
from sparsejax.fanin_matmul import _over_row_chunks
from sparsejax.fixed_fanin import _draw_columns, fill_free_slots

__all__ = ["SetTopologyState", "set_topology", "static_topology", "rigl_regrowth_columns",
           "sparse_layer_names"]

sparse_layer_names = _tree.sparse_layer_names

# RigL scores (rows, in) dense-gradient blocks; rows per block keep a block near 16 MiB.
_RIGL_BLOCK_ELEMENTS = 1 << 22
# SET rewires (rows, K) blocks of about this many slots (a few MiB of scratch each).
_REWIRE_BLOCK_ELEMENTS = 1 << 18


class SetTopologyState(NamedTuple):
  """State of ``set_topology``.

  Attributes:
    count: number of updates applied so far (int32 scalar).
    inner_state: state of the wrapped optimizer, over the params without indices.
  """
  count: jax.Array
  inner_state: optax.OptState


def _as_schedule(value, end_step: int, name: str) -> Callable[[jax.Array], jax.Array] | None:
  """A constant becomes ``value * (1 + cos(pi t / end_step)) / 2``; a callable is kept."""
  if value is None or callable(value):
    return value
  if not isinstance(value, numbers.Real) or value < 0:
    raise ValueError(f"{name} must be a non-negative number or a schedule, got {value!r}")
  return optax.cosine_decay_schedule(float(value), max(end_step, 1))


def set_topology(
    inner: optax.GradientTransformation,
    *,
    key: jax.Array,
    interval: int,
    end_step: int,
    prune_fraction: float | optax.Schedule | None = 0.3,
    prune_threshold: float | optax.Schedule | None = None,
    regrowth: str = "random",
    in_features: dict[str, int] | None = None,
    mesh: Mesh | None = None,
    row_axis: str = "labels",
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` with SET/RigL rewiring of every fixed fan-in layer.

  Fixed fan-in layers are found in the params as ``FixedFanIn`` nodes or as
  mappings with ``values`` and ``indices`` entries (``nnx.State`` of
  ``sparsejax.nn.FixedFanInLinear``). Every other leaf is left to ``inner``.

  On update ``t = 1, 2, ...`` with ``t % interval == 0`` and ``t <= end_step``,
  after ``inner`` has computed the step, for each row of each layer:

  1. prune: the ``floor(f_t * K)`` smallest ``|w|`` of the row (fraction mode),
     or every ``|w| < h_t`` (threshold mode), where ``w`` are the weights this
     step would produce; ties prune the lower slot first;
  2. regrow as many columns not among the row's kept columns (a just-pruned
     column may come back, as a new zero weight): uniformly at random
     (``"random"``, SET) or the largest ``|x^T g|`` of the dense gradient
     (``"rigl"``, which needs ``layer_io``);
  3. the rewired slots get weight 0, and every leaf of the inner optimizer's
     state whose path ends with that layer's ``values`` path and has its shape
     (Adam ``mu``/``nu``, momentum traces, per-parameter schedules, ...) gets
     0 there. Untouched slots are bit-identical to the plain inner step.

  Arguments:
    inner: any optax transformation for the weights (e.g. ``optax.adamw``).
    key: PRNG key for the random regrowth; update ``t`` uses
      ``fold_in(key, t)``, so the same key gives the same topology.
    interval: rewire every ``interval`` updates.
    end_step: last update that may rewire (the SPEC suggests ~2/3 of training).
    prune_fraction: ``f_0`` or a schedule ``t -> f_t``. A number is
      cosine-decayed, ``f_t = f_0 (1 + cos(pi t / end_step)) / 2``.
    prune_threshold: ``h_0`` or a schedule, cosine-decayed the same way. Give
      it with ``prune_fraction=None`` to prune by magnitude threshold instead.
    regrowth: ``"random"`` (SET) or ``"rigl"``.
    in_features: ``{layer name: in}`` for layers stored as plain mappings (NNX
      state), whose input size the arrays do not record;
      ``sparsejax.nn.fixed_fanin_sizes(model)`` builds it. ``FixedFanIn``
      nodes carry their own.
    mesh: a ``jax.sharding.Mesh`` to shard the rows of every fixed fan-in
      layer over: their ``values``/``indices`` (in the updates) and the inner
      state's leaves that mirror ``values`` (Adam moments, ...) are constrained
      to ``PartitionSpec(row_axis)``, and the rewiring runs in ``jax.shard_map``
      on each device's rows, with no gather of a layer. Every layer's row count
      must be a multiple of the ``row_axis`` size (pad it, e.g. with
      ``sparsejax.xmc.pad_labels``). Random regrowth only.
    row_axis: the mesh axis that holds the rows.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``params``.
    With RigL, pass ``layer_io={name: (x, g)}`` on rewiring steps (it is
    needed on every step under ``jit``): for each layer, named as by
    ``sparse_layer_names(params)``, its input ``x`` of shape ``(..., in)`` and
    the loss gradient ``g`` w.r.t. its output, ``(..., out)``. Other extra
    arguments go to ``inner``.
  """
  if not isinstance(interval, numbers.Integral) or interval < 1:
    raise ValueError(f"interval must be a positive integer, got {interval!r}")
  if not isinstance(end_step, numbers.Integral) or end_step < 0:
    raise ValueError(f"end_step must be a non-negative integer, got {end_step!r}")
  if (prune_fraction is None) == (prune_threshold is None):
    raise ValueError("give exactly one of prune_fraction and prune_threshold "
                     "(prune_threshold needs prune_fraction=None)")
  if isinstance(prune_fraction, numbers.Real) and not 0 <= prune_fraction <= 1:
    raise ValueError(f"prune_fraction must be in [0, 1], got {prune_fraction!r}")
  if regrowth not in ("random", "rigl"):
    raise ValueError(f"regrowth must be 'random' or 'rigl', got {regrowth!r}")
  if mesh is not None:
    if not isinstance(mesh, Mesh) or row_axis not in mesh.axis_names:
      raise ValueError(f"mesh must be a jax.sharding.Mesh with a '{row_axis}' axis (row_axis), "
                       f"got {mesh!r}")
    if regrowth == "rigl":
      raise ValueError("regrowth='rigl' with a mesh is not implemented (its dense-gradient "
                       "scores need every row's input); use regrowth='random' or mesh=None")
  fraction = _as_schedule(prune_fraction, end_step, "prune_fraction")
  threshold = _as_schedule(prune_threshold, end_step, "prune_threshold")
  inner = optax.with_extra_args_support(inner)

  row_sharding = None if mesh is None else NamedSharding(mesh, P(row_axis))

  def shard_rows(x):
    return x if mesh is None else lax.with_sharding_constraint(x, row_sharding)

  def shard_moments(inner_state, layers):
    if mesh is None:
      return inner_state
    values = {(*path, _tree.values_key(layer)): _tree.field(layer, "values")
              for path, layer in layers}
    return _map_moments(inner_state, values, lambda leaf, _: shard_rows(leaf))

  def init_fn(params):
    layers = _tree.sparse_layers(params)
    _check_rows(layers, mesh, row_axis)
    inner_state = inner.init(_strip_indices(*_tree.flatten_layers(params)))
    return SetTopologyState(count=jnp.zeros((), jnp.int32),
                            inner_state=shard_moments(inner_state, layers))

  def update_fn(updates, state, params=None, *, layer_io=None, **extra_args):
    leaves, grad_leaves, treedef = _flatten_params_and_grads(params, updates, "set_topology")
    inner_updates, inner_state = inner.update(
        _strip_indices(grad_leaves, treedef), state.inner_state,
        _strip_indices(leaves, treedef), **extra_args)
    update_leaves = treedef.flatten_up_to(inner_updates)

    layers = _tree.sparse_layers(params)
    _check_rows(layers, mesh, row_axis)
    names = [_tree.path_name(path) for path, _ in layers]
    positions = [i for i, leaf in enumerate(leaves) if _tree.is_sparse_layer(leaf)]
    old_indices = [_tree.field(leaves[i], "indices") for i in positions]
    # Pruning ranks the weights this step would produce.
    stepped = [_tree.field(leaves[i], "values") + _tree.field(update_leaves[i], "values")
               for i in positions]
    if regrowth == "rigl":
      io = _check_layer_io(layer_io, layers, names)
    else:
      sizes = [_in_features(layer, name, in_features) for (_, layer), name in zip(layers, names)]
    step = state.count + 1

    def rewire_layer(n, indices, w, step, first_row):
      """Layer ``n``'s ``(new indices, pruned)`` for its rows from global row ``first_row``."""
      if fraction is not None:
        select = lambda w: prune_smallest(w, fraction(step))
      else:
        select = lambda w: jnp.abs(w.astype(jnp.float32)) < threshold(step)
      if regrowth == "random":
        layer_key = jax.random.fold_in(jax.random.fold_in(key, step), n)
        regrow = lambda start, idx, pruned: _draw_columns(
            layer_key, idx, pruned, sizes[n], first_row + start, all_free=False)
      else:
        x, g = io[n]
        g = g.reshape(-1, indices.shape[0])
        regrow = lambda start, idx, pruned: rigl_regrowth_columns(
            idx, pruned, x, lax.dynamic_slice_in_dim(g, start, idx.shape[0], axis=1))
      return _rewire_rows(select, regrow, indices, w)

    def rewire(stepped):
      new_indices, pruned_slots = [], []
      for n, (indices, w) in enumerate(zip(old_indices, stepped)):
        if mesh is None:
          new, pruned = rewire_layer(n, indices, w, step, 0)
        else:
          # Each device rewires its own rows; the step enters replicated.
          def local(indices, w, step, n=n):
            first_row = lax.axis_index(row_axis) * indices.shape[0]
            return rewire_layer(n, indices, w, step, first_row)
          new, pruned = jax.shard_map(
              local, mesh=mesh, in_specs=(P(row_axis), P(row_axis), P()),
              out_specs=(P(row_axis), P(row_axis)))(indices, w, step)
        new_indices.append(new)
        pruned_slots.append(pruned)
      return new_indices, pruned_slots

    def keep(stepped):
      return old_indices, [jnp.zeros(w.shape, bool) for w in stepped]

    rewire_now = (step % interval == 0) & (step <= end_step)
    new_indices, pruned_slots = lax.cond(rewire_now, rewire, keep, stepped)

    out_leaves, resets = list(update_leaves), {}
    for i, (path, layer), indices, new, pruned in zip(
        positions, layers, old_indices, new_indices, pruned_slots):
      value_update = _tree.field(update_leaves[i], "values")
      values = _tree.field(layer, "values").astype(value_update.dtype)
      # values + (-values) is exactly 0; indices + (new - old) wraps back to new.
      out_leaves[i] = _tree.replace_fields(
          update_leaves[i], values=shard_rows(jnp.where(pruned, -values, value_update)),
          indices=shard_rows(new - indices))
      resets[(*path, _tree.values_key(layer))] = pruned
    inner_state = _map_moments(inner_state, resets,
                               lambda leaf, mask: jnp.where(mask, jnp.zeros((), leaf.dtype), leaf))
    inner_state = shard_moments(inner_state, layers)
    return treedef.unflatten(out_leaves), SetTopologyState(step, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def static_topology(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on params whose fixed fan-in layers keep their topology.

  ``inner`` sees the params and gradients with every sparse layer's
  ``indices`` removed (so any optax optimizer works on a pytree holding
  ``FixedFanIn`` layers); the returned updates add zero to the indices. Use it
  where ``set_topology`` would be, without rewiring. Gradients come from
  ``jax.grad(..., allow_int=True)`` as there.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(_strip_indices(*_tree.flatten_layers(params)))

  def update_fn(updates, state, params=None, **extra_args):
    leaves, grad_leaves, treedef = _flatten_params_and_grads(params, updates, "static_topology")
    inner_updates, state = inner.update(_strip_indices(grad_leaves, treedef), state,
                                        _strip_indices(leaves, treedef), **extra_args)
    out = [_tree.replace_fields(new, indices=jnp.zeros_like(_tree.field(old, "indices")))
           if _tree.is_sparse_layer(old) else new
           for old, new in zip(leaves, treedef.flatten_up_to(inner_updates))]
    return treedef.unflatten(out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _flatten_params_and_grads(params, grads, caller: str):
  """Flattens both with sparse layers whole, checking that the gradients mirror the params."""
  if params is None:
    raise ValueError(f"{caller} needs params: call update(grads, state, params)")
  leaves, treedef = _tree.flatten_layers(params)
  grad_leaves, grad_treedef = _tree.flatten_layers(grads)
  if grad_treedef != treedef:
    raise ValueError(
        f"{caller}: the gradients must have the structure of the params, including each "
        "sparse layer's indices; differentiate with allow_int=True (and, for NNX, "
        "argnums=nnx.DiffState(0, wrt) with the optimizer's wrt).\n"
        f"params: {treedef}\ngradients: {grad_treedef}")
  return leaves, grad_leaves, treedef


def prune_smallest(w: jax.Array, fraction: jax.Array) -> jax.Array:
  """Marks the ``floor(fraction * K)`` smallest ``|w|`` of each row of ``(out, K)`` ``w``.

  Ties prune the lower slot first. Returns a bool ``(out, K)`` mask.
  """
  magnitude = jnp.abs(w.astype(jnp.float32))
  count = jnp.floor(jnp.asarray(fraction, jnp.float32) * w.shape[1]).astype(jnp.int32)
  order = jnp.argsort(magnitude, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1, stable=True)
  return rank < count


def rigl_regrowth_columns(indices: jax.Array, pruned: jax.Array, x: jax.Array,
                          g: jax.Array) -> jax.Array:
  """RigL: refill pruned slots with the largest ``|dense gradient|`` columns of their row.

  The dense gradient of the loss w.r.t. the full ``(in, out)`` weight is
  ``x^T g``. It is formed in blocks of output rows, so no ``(in, out)`` array
  exists; within a row the kept columns are excluded and the j-th pruned slot
  (in slot order) gets the j-th largest remaining score.

  Arguments:
    indices: ``(out, K)`` current columns.
    pruned: ``(out, K)`` bool, the slots to refill.
    x: the layer's input, ``(..., in)``.
    g: the loss gradient w.r.t. the layer's output, ``(..., out)``.

  Returns:
    ``(out, K)`` int32 columns.
  """
  out, fan_in = indices.shape
  in_features = x.shape[-1]
  xt = x.reshape(-1, in_features).T.astype(jnp.float32)
  g = g.reshape(-1, out).astype(jnp.float32)
  indices = indices.astype(jnp.int32)
  block = max(1, min(out, _RIGL_BLOCK_ELEMENTS // in_features))

  def refill_block(start, size, cols):
    idx = lax.dynamic_slice_in_dim(indices, start, size)
    pr = lax.dynamic_slice_in_dim(pruned, start, size)
    rows = jnp.arange(size)[:, None]
    score = jnp.abs(xt @ lax.dynamic_slice_in_dim(g, start, size, axis=1)).T  # (size, in)
    score = score.at[rows, idx].set(jnp.where(pr, score[rows, idx], -jnp.inf))
    _, candidates = lax.top_k(score, fan_in)
    return lax.dynamic_update_slice_in_dim(cols, fill_free_slots(idx, pr, candidates), start, 0)

  return _over_row_chunks(refill_block, out, block, indices)


def _rewire_rows(select, regrow, indices, w):
  """``(new indices, pruned)`` of one layer, rewired block by block of rows.

  ``select(w_block) -> pruned_block`` and ``regrow(start, indices_block,
  pruned_block) -> columns`` see ``_REWIRE_BLOCK_ELEMENTS`` slots at a time, so
  the per-row sorts and draws need scratch for one block, not a dozen
  ``(out, K)`` arrays (which, at 500k labels, outweighed the classifier itself).
  """
  out, fan_in = indices.shape

  def block(start, size, carry):
    new, pruned = carry
    idx = lax.dynamic_slice_in_dim(indices, start, size)
    dropped = select(lax.dynamic_slice_in_dim(w, start, size))
    cols = regrow(start, idx, dropped).astype(indices.dtype)
    return (lax.dynamic_update_slice_in_dim(new, cols, start, 0),
            lax.dynamic_update_slice_in_dim(pruned, dropped, start, 0))

  rows = max(1, min(out, _REWIRE_BLOCK_ELEMENTS // fan_in))
  carry = varying_like((indices, jnp.zeros(indices.shape, bool)), indices, w)
  return _over_row_chunks(block, out, rows, carry)


def _strip_indices(leaves, treedef):
  """The params (or grads) with every sparse layer's indices set to None."""
  return treedef.unflatten([
      _tree.replace_fields(leaf, indices=None) if _tree.is_sparse_layer(leaf) else leaf
      for leaf in leaves])


def _map_moments(inner_state, per_layer, fn):
  """``fn(leaf, per_layer[path])`` on each state leaf whose path ends with a values path.

  ``per_layer`` maps a layer's values path to an array of the values' shape;
  only leaves of that shape are mapped (moments, not e.g. scalar counts).
  """
  by_length = {}
  for path, array in per_layer.items():
    by_length.setdefault(len(path), {})[path] = array

  def apply(path, leaf):
    for length, arrays in by_length.items():
      array = arrays.get(tuple(path[-length:])) if len(path) >= length else None
      if array is not None and jnp.shape(leaf) == jnp.shape(array):
        return fn(leaf, array)
    return leaf

  return jax.tree_util.tree_map_with_path(apply, inner_state)


def _check_rows(layers, mesh, row_axis):
  """Every layer's rows split evenly over the ``row_axis`` devices of ``mesh``."""
  if mesh is None:
    return
  for path, layer in layers:
    rows = _tree.field(layer, "values").shape[0]
    if rows % mesh.shape[row_axis]:
      raise ValueError(f"set_topology: layer '{_tree.path_name(path)}' has {rows} rows, not a "
                       f"multiple of the {mesh.shape[row_axis]} devices of mesh axis "
                       f"'{row_axis}'; pad its rows (e.g. sparsejax.xmc.pad_labels)")


def _in_features(layer, name, in_features):
  if hasattr(layer, "in_features"):
    return layer.in_features
  if not in_features or name not in in_features:
    raise ValueError(
        f"set_topology: layer '{name}' holds values/indices without its input size; pass "
        f"in_features={{'{name}': ...}} (sparsejax.nn.fixed_fanin_sizes(model) gives them "
        "for an NNX model)")
  return int(in_features[name])


def _check_layer_io(layer_io, layers, names):
  if layer_io is None:
    raise ValueError("regrowth='rigl' needs layer_io={name: (x, g)} in update(); layers: "
                     f"{names}")
  io = []
  for (_, layer), name in zip(layers, names):
    if name not in layer_io:
      raise ValueError(f"layer_io has no entry for sparse layer '{name}' "
                       f"(has {sorted(layer_io)})")
    x, g = layer_io[name]
    out = _tree.field(layer, "values").shape[0]
    if jnp.shape(g)[-1:] != (out,) or jnp.shape(x)[:-1] != jnp.shape(g)[:-1]:
      raise ValueError(f"layer_io['{name}']: x {jnp.shape(x)} and g {jnp.shape(g)} must be "
                       f"(..., in) and (..., {out}) with the same leading shape")
    if hasattr(layer, "in_features") and jnp.shape(x)[-1] != layer.in_features:
      raise ValueError(f"layer_io['{name}']: x has {jnp.shape(x)[-1]} features, the layer "
                       f"reads {layer.in_features}")
    io.append((x, g))
  return io
