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

The rewiring of one layer's rows (pruning, random and RigL regrowth) is
``sparsejax.rewiring.rewire_layer``; this module is the optax wrapper around
it: when to rewire, the params and optimizer state around it, the mesh.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax import _checks, _tree
from sparsejax.rewiring import max_pruned_per_row, rewire_layer

__all__ = ["RegrowthCandidates", "SetTopologyState", "set_topology", "static_topology",
           "is_rewire_step", "sparse_layer_names"]

sparse_layer_names = _tree.sparse_layer_names


class RegrowthCandidates(NamedTuple):
  """Per row, the best columns to regrow by RigL's score, found without the dense gradient.

  For a fixed fan-in layer of ``out`` rows, e.g. from
  ``sparsejax.xmc.chunked_loss_and_candidates``; ``set_topology`` merges them
  with the pruned slots.

  Attributes:
    columns: ``(out, R)`` int32, per row the ``R`` columns not among its
      current indices with the largest ``|dense gradient|``, best first (equal
      scores: lower column first, as ``lax.top_k``).
    scores: ``(out, R)`` float32, their ``|dense gradient|``; ``-inf`` where the
      row has fewer than ``R`` absent columns (and on rows that do not count,
      such as padding).
  """
  columns: jax.Array
  scores: jax.Array


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


def is_rewire_step(step, *, interval: int, end_step: int):
  """Whether update ``step`` of ``set_topology`` rewires: ``step % interval == 0``, ``<= end_step``.

  ``set_topology`` decides with this very rule inside ``jit``; a caller that
  picks an executable on the host (``update(..., rewire=False)`` on the other
  steps) uses it with the same ``interval`` and ``end_step``.

  Arguments:
    step: the 1-based update count ``t`` (the optimizer's count before the
      update, plus one): a Python int, or an integer array under ``jit``.
    interval, end_step: those given to ``set_topology``.

  Returns:
    A bool (a bool array for an array ``step``).
  """
  return (step % interval == 0) & (step <= end_step)


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
  ``init`` raises ``ValueError`` when the params hold none: with Flax NNX, the
  optimizer must see the indices, ``nnx.Optimizer(model, tx, wrt=(nnx.Param,
  sparsejax.nn.Indices))``; with ``wrt=nnx.Param`` there would be nothing to
  rewire.

  On update ``t = 1, 2, ...`` with ``t % interval == 0`` and ``t <= end_step``,
  after ``inner`` has computed the step, for each row of each layer:

  1. prune: the ``floor(f_t * K)`` smallest ``|w|`` of the row (fraction mode),
     or every ``|w| < h_t`` (threshold mode), where ``w`` are the weights this
     step would produce; ties prune the lower slot first;
  2. regrow as many columns not among the row's kept columns (a just-pruned
     column may come back, as a new zero weight): uniformly at random
     (``"random"``, SET) or the largest ``|x^T g|`` of the dense gradient
     (``"rigl"``, which needs ``layer_io`` or ``regrowth_candidates``);
  3. the rewired slots get weight 0, and every leaf of the inner optimizer's
     state whose path ends with that layer's ``values`` path and has its shape
     (Adam ``mu``/``nu``, momentum traces, per-parameter schedules, ...) gets
     0 there. Untouched slots are bit-identical to the plain inner step.

  Arguments:
    inner: any optax transformation for the weights (e.g. ``optax.adamw``).
    key: PRNG key for the random regrowth; update ``t`` uses
      ``fold_in(key, t)``, so the same key gives the same topology.
    interval: rewire every ``interval`` updates.
    end_step: last update that may rewire (about 2/3 of training: ``docs/methods.md``,
      "SET and RigL rewiring").
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
      ``sparsejax.xmc.pad_labels``). RigL needs ``regrowth_candidates`` here
      (split by rows like the values), not ``layer_io``.
    row_axis: the mesh axis that holds the rows.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update(grads, state,
    params, *, rewire=None, layer_io=None, regrowth_candidates=None, ...)``
    needs ``params``; other extra arguments go to ``inner``.

    ``rewire`` (static, a Python value): ``None`` decides inside ``jit``
    whether this update rewires (``is_rewire_step`` of the update count).
    ``False`` states that it does not: nothing of the rewiring is traced (a
    smaller, faster executable), and the update is the inner step with
    unchanged indices. If ``False`` is given on an update that is due to
    rewire, that rewiring is skipped (the count still advances): pick it on
    the host with ``is_rewire_step(count + 1, interval=..., end_step=...)``.

    With RigL, on every update that may rewire (``rewire=None``), give one of:

    - ``layer_io={name: (x, g)}``: for each layer, named as by
      ``sparse_layer_names(params)``, its input ``x`` of shape ``(..., in)``
      and the loss gradient ``g`` w.r.t. its output, ``(..., out)``; the
      dense gradient ``x^T g`` is formed in blocks of rows. No mesh.
    - ``regrowth_candidates={name: RegrowthCandidates(columns, scores)}``:
      for each layer, ``(out, R)`` int columns and float scores, per row the
      ``R`` columns not among the row's current indices with the largest
      ``|dense gradient|`` (best first, ``-inf`` scores for unused entries;
      e.g. from ``sparsejax.xmc.chunked_loss_and_candidates``). Each pruned
      slot is scored by ``|gradient of its value|`` from ``grads``, the
      union ordered by (score descending, column ascending), and the j-th
      pruned slot (in slot order) takes the j-th best: exactly
      ``sparsejax.rigl_regrowth_columns`` as long as ``R`` is at least the
      slots a row prunes, so ``R >= sparsejax.rewiring.max_pruned_per_row(K,
      prune_fraction)`` is checked
      (``K`` for a schedule or threshold mode). The scores must be on the
      scale of ``grads``: for a loss mixed as ``(1 - a) main + a aux``, where
      the candidates come from the main loss's gradient, scale them by
      ``1 - a``. Work and memory ``O(out (K + R))``; works with ``mesh``.
  """
  _checks.check_key(key)
  _check_arguments(interval, end_step, prune_fraction, prune_threshold, regrowth, mesh, row_axis)
  fraction = _as_schedule(prune_fraction, end_step, "prune_fraction")
  threshold = _as_schedule(prune_threshold, end_step, "prune_threshold")
  inner = optax.with_extra_args_support(inner)
  shard_rows = functools.partial(_shard_rows, mesh=mesh, row_axis=row_axis)
  regrowth_key = key if regrowth == "random" else None

  def prune(step):  # rewire_layer's pruning rule at update ``step``
    if fraction is not None:
      return {"prune_fraction": fraction(step)}
    return {"prune_threshold": threshold(step)}

  def init_fn(params):
    layers = _tree.sparse_layers(params)
    if not layers:
      _no_layers_error(params)
    _check_rows(layers, mesh, row_axis)
    inner_state = inner.init(_strip_indices(*_tree.flatten_layers(params)))
    return SetTopologyState(count=jnp.zeros((), jnp.int32),
                            inner_state=_shard_moments(inner_state, layers, mesh, row_axis))

  def update_fn(updates, state, params=None, *, rewire=None, layer_io=None,
                regrowth_candidates=None, **extra_args):
    if not (rewire is None or rewire is False):
      raise ValueError("set_topology: rewire must be None (decided inside jit) or False (not "
                       f"a rewiring step; see is_rewire_step), got {rewire!r}")
    leaves, grad_leaves, treedef = _flatten_params_and_grads(params, updates, "set_topology")
    inner_updates, inner_state = inner.update(
        _strip_indices(grad_leaves, treedef), state.inner_state,
        _strip_indices(leaves, treedef), **extra_args)
    update_leaves = treedef.flatten_up_to(inner_updates)

    layers = _tree.sparse_layers(params)
    _check_rows(layers, mesh, row_axis)
    positions = [i for i, leaf in enumerate(leaves) if _tree.is_sparse_layer(leaf)]
    old_indices = [_tree.field(leaves[i], "indices") for i in positions]
    step = state.count + 1
    if rewire is False:
      new_indices, pruned_slots = old_indices, None
    else:
      regrow = _regrowth_inputs(regrowth, layers, [grad_leaves[i] for i in positions], layer_io,
                                regrowth_candidates, in_features, prune_fraction, mesh)
      # Pruning ranks the weights this step would produce.
      stepped = [_tree.field(leaves[i], "values") + _tree.field(update_leaves[i], "values")
                 for i in positions]
      new_indices, pruned_slots = lax.cond(
          is_rewire_step(step, interval=interval, end_step=end_step),
          lambda stepped: _rewire_layers(old_indices, stepped, step, *regrow, prune=prune,
                                         key=regrowth_key, mesh=mesh, row_axis=row_axis),
          lambda stepped: (old_indices, [jnp.zeros(w.shape, bool) for w in stepped]), stepped)

    out_leaves, resets = list(update_leaves), {}
    for n, (i, (path, layer), indices) in enumerate(zip(positions, layers, old_indices)):
      value_update = _tree.field(update_leaves[i], "values")
      index_update = jnp.zeros_like(indices)
      if pruned_slots is not None:
        values = _tree.field(layer, "values").astype(value_update.dtype)
        # values + (-values) is exactly 0; indices + (new - old) wraps back to new.
        value_update = jnp.where(pruned_slots[n], -values, value_update)
        index_update = new_indices[n] - indices
        resets[(*path, _tree.values_key(layer))] = pruned_slots[n]
      out_leaves[i] = _tree.replace_fields(update_leaves[i], values=shard_rows(value_update),
                                           indices=shard_rows(index_update))
    inner_state = _map_moments(inner_state, resets,
                               lambda leaf, mask: jnp.where(mask, jnp.zeros((), leaf.dtype), leaf))
    inner_state = _shard_moments(inner_state, layers, mesh, row_axis)
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


def _check_arguments(interval, end_step, prune_fraction, prune_threshold, regrowth, mesh,
                     row_axis) -> None:
  """Raises ``ValueError`` for ``set_topology`` arguments out of their range."""
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


def _no_layers_error(params):
  """Raises the ``ValueError`` of ``set_topology`` on params without a fixed fan-in layer."""
  orphans = _tree.values_without_indices(params)
  if orphans:
    raise ValueError(
        f"set_topology: the params hold 'values' without their 'indices' (at {orphans}), so "
        "there is no topology to rewire. With Flax NNX, let the optimizer see the indices: "
        "pass wrt=(nnx.Param, sparsejax.nn.Indices) to nnx.Optimizer, and differentiate with "
        "nnx.grad(loss, argnums=nnx.DiffState(0, wrt), allow_int=True) for that wrt")
  raise ValueError(
      "set_topology: the params hold no fixed fan-in layer (a FixedFanIn or a mapping with "
      "'values' and 'indices'), so there is nothing to rewire; use the inner optimizer alone")


def _shard_rows(x, *, mesh, row_axis):
  """``x`` constrained to ``PartitionSpec(row_axis)`` of ``mesh``; as it is without a mesh."""
  if mesh is None:
    return x
  return lax.with_sharding_constraint(x, NamedSharding(mesh, P(row_axis)))


def _shard_moments(inner_state, layers, mesh, row_axis):
  """The inner state with each leaf that mirrors a layer's values split by rows like them."""
  if mesh is None:
    return inner_state
  values = {(*path, _tree.values_key(layer)): _tree.field(layer, "values")
            for path, layer in layers}
  return _map_moments(inner_state, values,
                      lambda leaf, _: _shard_rows(leaf, mesh=mesh, row_axis=row_axis))


def _regrowth_inputs(regrowth, layers, layer_grads, layer_io, regrowth_candidates, in_features,
                     prune_fraction, mesh):
  """Per layer, the regrowth arguments of ``rewire_layer``, checked: ``(by_rows, fixed)``.

  ``by_rows[n]`` holds layer ``n``'s arrays with a row per layer row (split
  over the mesh with the layer), ``fixed[n]`` the rest.
  """
  names = [_tree.path_name(path) for path, _ in layers]
  none = [{} for _ in layers]
  if regrowth == "random":
    return none, [{"in_features": _in_features(layer, name, in_features)}
                  for (_, layer), name in zip(layers, names)]
  if regrowth_candidates is not None:
    if layer_io is not None:
      raise ValueError("set_topology: give layer_io or regrowth_candidates, not both")
    candidates = _check_candidates(regrowth_candidates, layers, names, prune_fraction)
    return [{"value_grads": _tree.field(grads, "values"), "candidates": c}
            for grads, c in zip(layer_grads, candidates)], none
  if mesh is not None:
    raise ValueError("set_topology: regrowth='rigl' with a mesh needs regrowth_candidates= "
                     "(split by rows like the values) in update(); layer_io's dense-gradient "
                     "scores would need every row's gradient on each device")
  return none, [{"layer_io": xg} for xg in _check_layer_io(layer_io, layers, names)]


def _rewire_layers(old_indices, stepped, step, by_rows, fixed, *, prune, key, mesh, row_axis):
  """``(new indices, pruned)`` of every layer: ``rewire_layer`` on each (device's) rows.

  ``stepped`` are the weights the step would produce, ``prune(step)`` the
  pruning argument of ``rewire_layer``, ``key`` that of the random regrowth
  (None for RigL), ``by_rows`` and ``fixed`` as from ``_regrowth_inputs``.
  """
  def rewire_one(n, indices, w, step, by_rows, first_row):
    if key is not None:  # row u of layer n draws from (key, step, n, u) alone
      by_rows = dict(key=jax.random.fold_in(jax.random.fold_in(key, step), n),
                     first_row=first_row)
    return rewire_layer(indices, w, **prune(step), **by_rows, **fixed[n])

  new_indices, pruned_slots = [], []
  for n, (indices, w) in enumerate(zip(old_indices, stepped)):
    if mesh is None:
      new, pruned = rewire_one(n, indices, w, step, by_rows[n], 0)
    else:
      # Each device rewires its own rows; the step enters replicated.
      def local(indices, w, step, rows_in, n=n):
        return rewire_one(n, indices, w, step, rows_in,
                          lax.axis_index(row_axis) * indices.shape[0])
      new, pruned = jax.shard_map(
          local, mesh=mesh, in_specs=(P(row_axis), P(row_axis), P(), P(row_axis)),
          out_specs=(P(row_axis), P(row_axis)))(indices, w, step, by_rows[n])
    new_indices.append(new)
    pruned_slots.append(pruned)
  return new_indices, pruned_slots


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
  """The ``(x, g)`` of each layer, checked against its shape."""
  if layer_io is None:
    raise ValueError("regrowth='rigl' needs layer_io={name: (x, g)} or regrowth_candidates="
                     "{name: RegrowthCandidates(columns, scores)} in update() on every update "
                     f"that may rewire (rewire=None); layers: {names}")
  io = []
  for layer, name, (x, g) in _entries(layer_io, "layer_io", layers, names):
    out = _tree.field(layer, "values").shape[0]
    if jnp.shape(g)[-1:] != (out,) or jnp.shape(x)[:-1] != jnp.shape(g)[:-1]:
      raise ValueError(f"layer_io['{name}']: x {jnp.shape(x)} and g {jnp.shape(g)} must be "
                       f"(..., in) and (..., {out}) with the same leading shape")
    if hasattr(layer, "in_features") and jnp.shape(x)[-1] != layer.in_features:
      raise ValueError(f"layer_io['{name}']: x has {jnp.shape(x)[-1]} features, the layer "
                       f"reads {layer.in_features}")
    io.append((x, g))
  return io


def _check_candidates(regrowth_candidates, layers, names, prune_fraction):
  """The ``(columns, scores)`` of each layer: ``(out, R)`` each, enough of them per row."""
  candidates = []
  for layer, name, (columns, scores) in _entries(regrowth_candidates, "regrowth_candidates",
                                                 layers, names):
    out, fan_in = _tree.field(layer, "values").shape
    if jnp.ndim(columns) != 2 or jnp.shape(columns)[0] != out or (
        jnp.shape(scores) != jnp.shape(columns)):
      raise ValueError(f"regrowth_candidates['{name}']: columns {jnp.shape(columns)} and scores "
                       f"{jnp.shape(scores)} must both be ({out}, R)")
    if not jnp.issubdtype(jnp.result_type(columns), jnp.integer) or not jnp.issubdtype(
        jnp.result_type(scores), jnp.floating):
      raise ValueError(f"regrowth_candidates['{name}']: columns must be integers and scores "
                       f"floats, got {jnp.result_type(columns)} and {jnp.result_type(scores)}")
    need = max_pruned_per_row(fan_in, prune_fraction)
    if jnp.shape(columns)[1] < need:
      raise ValueError(
          f"regrowth_candidates['{name}'] has {jnp.shape(columns)[1]} candidates per row, but a "
          f"row can prune up to {need} of its K={fan_in} slots (max_pruned_per_row: floor(f_0 "
          "K) for a number prune_fraction, else K); RigL needs at least that many")
    candidates.append((columns, scores))
  return candidates


def _entries(per_layer, argument, layers, names):
  """``(layer, name, per_layer[name])`` for each sparse layer, which must all have an entry."""
  for (_, layer), name in zip(layers, names):
    if name not in per_layer:
      raise ValueError(f"{argument} has no entry for sparse layer '{name}' "
                       f"(has {sorted(per_layer)})")
    yield layer, name, per_layer[name]
