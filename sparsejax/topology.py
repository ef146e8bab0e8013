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
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax import _tree
from sparsejax.kernels.vma import varying_like
from sparsejax.fanin_matmul import _over_row_chunks
from sparsejax.fixed_fanin import _draw_columns, fill_free_slots

__all__ = ["RegrowthCandidates", "SetTopologyState", "set_topology", "static_topology",
           "is_rewire_step", "max_pruned_per_row", "rigl_regrowth_columns", "sparse_layer_names"]

sparse_layer_names = _tree.sparse_layer_names

# RigL scores (rows, in) dense-gradient blocks; rows per block keep a block near 16 MiB.
_RIGL_BLOCK_ELEMENTS = 1 << 22
# SET rewires (rows, K) blocks of about this many slots: on CPU a few MiB of scratch
# each (about 30 bytes a slot); on GPU/TPU about 1 GiB, since there each block costs a
# dozen while-loop rounds of kernel launches and host syncs, whatever its size.
_REWIRE_BLOCK_ELEMENTS = 1 << 18
_REWIRE_BLOCK_ELEMENTS_ACCELERATOR = 1 << 25


def _rewire_block_elements() -> int:
  """Slots per SET rewiring block on the default backend (read when tracing)."""
  if jax.default_backend() == "cpu":
    return _REWIRE_BLOCK_ELEMENTS
  return _REWIRE_BLOCK_ELEMENTS_ACCELERATOR


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


def max_pruned_per_row(fan_in: int, prune_fraction: float | optax.Schedule | None) -> int:
  """The most slots of a row that one rewiring can prune.

  ``floor(f_0 * K)`` for a number ``prune_fraction`` (cosine-decayed, so never
  above ``f_0``), else ``K`` (a schedule may return anything up to 1, and
  threshold mode, ``prune_fraction=None``, may prune a whole row). RigL with
  ``regrowth_candidates`` needs at least this many candidates per row.

  Arguments:
    fan_in: ``K``.
    prune_fraction: as given to ``set_topology``.

  Returns:
    An int in ``[0, K]``.
  """
  if not isinstance(fan_in, numbers.Integral) or fan_in < 1:
    raise ValueError(f"fan_in must be a positive integer, got {fan_in!r}")
  if isinstance(prune_fraction, numbers.Real):
    # In float32, as prune_smallest counts.
    return int(np.floor(np.float32(prune_fraction) * np.float32(fan_in)))
  return int(fan_in)


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
      ``rigl_regrowth_columns`` as long as ``R`` is at least the slots a row
      prunes, so ``R >= max_pruned_per_row(K, prune_fraction)`` is checked
      (``K`` for a schedule or threshold mode). The scores must be on the
      scale of ``grads``: for a loss mixed as ``(1 - a) main + a aux``, where
      the candidates come from the main loss's gradient, scale them by
      ``1 - a``. Work and memory ``O(out (K + R))``; works with ``mesh``.
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
      new_indices, pruned_slots = rewire_all(
          layers, old_indices, [leaves[i] for i in positions],
          [update_leaves[i] for i in positions], [grad_leaves[i] for i in positions], step,
          layer_io, regrowth_candidates)

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
    inner_state = shard_moments(inner_state, layers)
    return treedef.unflatten(out_leaves), SetTopologyState(step, inner_state)

  def rewire_all(layers, old_indices, layer_params, layer_updates, layer_grads, step, layer_io,
                 regrowth_candidates):
    """``(new indices, pruned)`` of every layer, under ``lax.cond(is_rewire_step(step))``."""
    names = [_tree.path_name(path) for path, _ in layers]
    # Per-row RigL inputs, split by rows with the layer: (value grads, columns, scores).
    rows_in = [()] * len(layers)
    if regrowth == "random":
      sizes = [_in_features(layer, name, in_features) for (_, layer), name in zip(layers, names)]
    elif regrowth_candidates is not None:
      if layer_io is not None:
        raise ValueError("set_topology: give layer_io or regrowth_candidates, not both")
      candidates = _check_candidates(regrowth_candidates, layers, names, prune_fraction)
      rows_in = [(_tree.field(grads, "values"), *c) for grads, c in zip(layer_grads, candidates)]
    elif mesh is not None:
      raise ValueError("set_topology: regrowth='rigl' with a mesh needs regrowth_candidates= "
                       "(split by rows like the values) in update(); layer_io's dense-gradient "
                       "scores would need every row's gradient on each device")
    else:
      io = _check_layer_io(layer_io, layers, names)
    # Pruning ranks the weights this step would produce.
    stepped = [_tree.field(p, "values") + _tree.field(u, "values")
               for p, u in zip(layer_params, layer_updates)]

    def rewire_layer(n, indices, w, step, first_row, rows_in):
      """Layer ``n``'s ``(new indices, pruned)`` for its rows from global row ``first_row``."""
      if fraction is not None:
        select = lambda w: prune_smallest(w, fraction(step))
      else:
        select = lambda w: jnp.abs(w.astype(jnp.float32)) < threshold(step)
      if regrowth == "random":
        layer_key = jax.random.fold_in(jax.random.fold_in(key, step), n)
        regrow = lambda start, idx, pruned: _draw_columns(
            layer_key, idx, pruned, sizes[n], first_row + start, all_free=False)
      elif rows_in:
        regrow = lambda start, idx, pruned: _rigl_from_candidates(
            idx, pruned, *(lax.dynamic_slice_in_dim(a, start, idx.shape[0]) for a in rows_in))
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
          new, pruned = rewire_layer(n, indices, w, step, 0, rows_in[n])
        else:
          # Each device rewires its own rows; the step enters replicated.
          def local(indices, w, step, rows_in, n=n):
            first_row = lax.axis_index(row_axis) * indices.shape[0]
            return rewire_layer(n, indices, w, step, first_row, rows_in)
          new, pruned = jax.shard_map(
              local, mesh=mesh, in_specs=(P(row_axis), P(row_axis), P(), P(row_axis)),
              out_specs=(P(row_axis), P(row_axis)))(indices, w, step, rows_in[n])
        new_indices.append(new)
        pruned_slots.append(pruned)
      return new_indices, pruned_slots

    def keep(stepped):
      return old_indices, [jnp.zeros(w.shape, bool) for w in stepped]

    return lax.cond(is_rewire_step(step, interval=interval, end_step=end_step), rewire, keep,
                    stepped)

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
  fan_in = w.shape[1]
  magnitude = jnp.abs(w.astype(jnp.float32))
  # Non-negative floats order as their bits (NaN, made canonical, last as in a sort),
  # so one integer sort per row gives the count-th smallest, ``kth``; the stable
  # order prunes every smaller |w|, then the first slots equal to ``kth``.
  bits = lax.bitcast_convert_type(jnp.where(jnp.isnan(magnitude), jnp.nan, magnitude),
                                  jnp.int32)
  count = jnp.floor(jnp.asarray(fraction, jnp.float32) * fan_in).astype(jnp.int32)
  kth = lax.dynamic_index_in_dim(jnp.sort(bits, axis=1), jnp.clip(count - 1, 0, fan_in - 1),
                                 axis=1)
  less, tie = bits < kth, bits == kth
  ties_pruned = count - jnp.sum(less, axis=1, keepdims=True)
  return (count > 0) & (less | (tie & (jnp.cumsum(tie, axis=1) <= ties_pruned)))


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
  pruned_block) -> columns`` see ``_rewire_block_elements()`` slots at a time,
  so on CPU the per-row sorts and draws need scratch for one block, not a dozen
  ``(out, K)`` arrays (which, at 500k labels, outweighed the classifier itself);
  on GPU/TPU the few large blocks keep that bounded too.
  """
  out, fan_in = indices.shape

  def block(start, size, carry):
    new, pruned = carry
    idx = lax.dynamic_slice_in_dim(indices, start, size)
    dropped = select(lax.dynamic_slice_in_dim(w, start, size))
    cols = regrow(start, idx, dropped).astype(indices.dtype)
    return (lax.dynamic_update_slice_in_dim(new, cols, start, 0),
            lax.dynamic_update_slice_in_dim(pruned, dropped, start, 0))

  rows = max(1, min(out, _rewire_block_elements() // fan_in))
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
  """The ``(x, g)`` of each layer, checked against its shape."""
  if layer_io is None:
    raise ValueError("regrowth='rigl' needs layer_io={name: (x, g)} or regrowth_candidates="
                     "{name: RegrowthCandidates(columns, scores)} in update() on every update "
                     f"that may rewire (rewire=None); layers: {names}")
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


def _check_candidates(regrowth_candidates, layers, names, prune_fraction):
  """The ``(columns, scores)`` of each layer: ``(out, R)`` each, enough of them per row."""
  candidates = []
  for (_, layer), name in zip(layers, names):
    if name not in regrowth_candidates:
      raise ValueError(f"regrowth_candidates has no entry for sparse layer '{name}' "
                       f"(has {sorted(regrowth_candidates)})")
    columns, scores = regrowth_candidates[name]
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


def _rigl_from_candidates(indices, pruned, value_grads, columns, scores):
  """RigL's new ``(rows, K)`` int32 columns from per-row candidates (see ``set_topology``).

  The pruned slots, scored by ``|value_grads|``, and the candidates with a
  finite score compete by (score descending, column ascending); the j-th
  pruned slot takes the j-th. The kept slots and unused (``-inf``) candidates
  sort last, behind at least as many eligible entries as there are pruned
  slots, so no kept column is ever chosen twice.
  """
  eligible = jnp.concatenate([pruned, scores > -jnp.inf], axis=1)
  score = jnp.concatenate([jnp.abs(value_grads.astype(jnp.float32)),
                           scores.astype(jnp.float32)], axis=1)
  cols = jnp.concatenate([indices.astype(jnp.int32), columns.astype(jnp.int32)], axis=1)
  _, _, ranked = lax.sort((~eligible, -score, cols), dimension=1, num_keys=3)
  return fill_free_slots(indices, pruned, ranked)
