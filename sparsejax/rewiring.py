"""Rewiring of one fixed fan-in layer: SET's and RigL's prune and regrow, row by row.

A rewiring replaces some slots of every row of a layer's ``(out, K)``
``indices`` with new columns, keeping ``K`` distinct columns per row
(``docs/methods.md``, "SET and RigL rewiring"):

1. prune: ``prune_smallest`` marks the ``floor(f K)`` smallest ``|w|`` of each
   row (or, in threshold mode, every ``|w| < h``);
2. regrow as many columns that the row does not keep: uniformly at random
   (SET, ``draw_columns``), or the largest ``|x^T g|`` of the dense gradient
   (RigL, ``rigl_regrowth_columns``, or from per-row candidates found without
   the dense gradient, ``sparsejax.RegrowthCandidates``).

``rewire_layer`` does both for one layer (or one shard of its rows), block by
block of rows so that the scratch memory stays bounded; ``set_topology`` calls
it for every layer on a rewiring step. ``draw_all_columns`` is the initial
random topology (every slot drawn), ``max_pruned_per_row`` the most slots one
rewiring can prune.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import _checks
from sparsejax._rows import over_row_chunks
from sparsejax.kernels.vma import varying_like

__all__ = ["draw_all_columns", "draw_columns", "fill_free_slots", "max_pruned_per_row",
           "prune_smallest", "rewire_layer", "rigl_regrowth_columns"]

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


def rewire_layer(
    indices: jax.Array,
    weights: jax.Array,
    *,
    prune_fraction: float | jax.Array | None = None,
    prune_threshold: float | jax.Array | None = None,
    key: jax.Array | None = None,
    in_features: int | None = None,
    first_row: int | jax.Array = 0,
    layer_io: tuple[jax.Array, jax.Array] | None = None,
    candidates: tuple[jax.Array, jax.Array] | None = None,
    value_grads: jax.Array | None = None,
    block_elements: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Prunes and regrows the rows of one fixed fan-in layer (SET or RigL).

  Give one pruning rule and one regrowth source:

  - ``prune_fraction=f``: the ``floor(f K)`` smallest ``|w|`` of each row
    (``prune_smallest``); or ``prune_threshold=h``: every ``|w| < h``.
  - ``key=`` with ``in_features=``: random regrowth (SET, ``draw_columns``);
    ``layer_io=(x, g)``: RigL from the dense gradient
    (``rigl_regrowth_columns``); or ``candidates=(columns, scores)`` with
    ``value_grads=``: RigL from per-row candidates (``sparsejax.RegrowthCandidates``):
    each pruned slot, scored by ``|value_grads|``, competes with the
    candidates by (score descending, column ascending) and the j-th pruned
    slot (in slot order) takes the j-th best, which equals
    ``rigl_regrowth_columns`` when ``R`` is at least the slots a row prunes.

  The rows are rewired in blocks of about ``block_elements`` slots, so the
  sorts and draws need scratch for one block, not for the layer. Random draws
  depend only on ``key`` and each row's global index ``first_row + u``, so the
  blocks, or shards of the rows rewired elsewhere (``jax.shard_map``), give the
  same bits as the whole layer at once.

  Arguments:
    indices: ``(rows, K)`` integer columns, distinct per row.
    weights: ``(rows, K)`` float weights that pruning ranks (``set_topology``
      passes those the step would produce).
    prune_fraction: ``f``, a number or a scalar array (e.g. a schedule's value).
    prune_threshold: ``h``, a number or a scalar array.
    key: PRNG key of the random regrowth.
    in_features: the layer's input size ``in`` (random regrowth).
    first_row: the global index of row 0 here (a shard's offset; random regrowth).
    layer_io: the layer's input ``x`` ``(..., in)`` and the loss gradient ``g``
      w.r.t. its output ``(..., rows)``.
    candidates: ``(rows, R)`` int columns and float scores, per row the ``R``
      best columns not among its current indices, best first, ``-inf`` scores
      for unused entries.
    value_grads: ``(rows, K)`` gradient of the loss w.r.t. the weights (with
      ``candidates``).
    block_elements: slots per block; default ``2^18`` on CPU, ``2^25`` on
      GPU/TPU (where each block costs a dozen while-loop rounds of kernel
      launches, whatever its size).

  Returns:
    ``(new_indices, pruned)``: ``(rows, K)`` in ``indices``' dtype, equal to
    ``indices`` where not pruned, and the ``(rows, K)`` bool mask of the pruned
    (refilled) slots.
  """
  if (prune_fraction is None) == (prune_threshold is None):
    raise ValueError("rewire_layer: give exactly one of prune_fraction and prune_threshold")
  if sum(source is not None for source in (key, layer_io, candidates)) != 1:
    raise ValueError("rewire_layer: give exactly one regrowth source: key= (random, SET), "
                     "layer_io= or candidates= (RigL)")
  if jnp.ndim(indices) != 2 or jnp.shape(weights) != jnp.shape(indices):
    raise ValueError(f"rewire_layer: indices and weights must both have shape (rows, K), got "
                     f"{jnp.shape(indices)} and {jnp.shape(weights)}")
  if prune_fraction is not None:
    select = lambda w: prune_smallest(w, prune_fraction)
  else:
    select = lambda w: jnp.abs(w.astype(jnp.float32)) < prune_threshold
  if key is not None:
    _checks.check_key(key)
    if in_features is None:
      raise ValueError("rewire_layer: random regrowth (key=) needs in_features=")
    regrow = lambda start, idx, pruned: _draw_columns(
        key, idx, pruned, in_features, first_row + start, all_free=False)
  elif candidates is not None:
    if value_grads is None:
      raise ValueError("rewire_layer: candidates= needs value_grads=")
    per_row = (value_grads, *candidates)
    regrow = lambda start, idx, pruned: _rigl_from_candidates(
        idx, pruned, *(lax.dynamic_slice_in_dim(a, start, idx.shape[0]) for a in per_row))
  else:
    x, g = layer_io
    g = jnp.reshape(g, (-1, indices.shape[0]))
    regrow = lambda start, idx, pruned: rigl_regrowth_columns(
        idx, pruned, x, lax.dynamic_slice_in_dim(g, start, idx.shape[0], axis=1))
  return _rewire_rows(select, regrow, indices, weights, block_elements)


def max_pruned_per_row(fan_in: int, prune_fraction: float | Callable | None) -> int:
  """The most slots of a row that one rewiring can prune.

  ``floor(f_0 * K)`` for a number ``prune_fraction`` (cosine-decayed, so never
  above ``f_0``), else ``K`` (a schedule may return anything up to 1, and
  threshold mode, ``prune_fraction=None``, may prune a whole row). RigL with
  ``regrowth_candidates`` needs at least this many candidates per row.

  Arguments:
    fan_in: ``K``.
    prune_fraction: as given to ``set_topology`` (a number, a schedule or None).

  Returns:
    An int in ``[0, K]``.
  """
  if not isinstance(fan_in, numbers.Integral) or fan_in < 1:
    raise ValueError(f"fan_in must be a positive integer, got {fan_in!r}")
  if isinstance(prune_fraction, numbers.Real):
    # In float32, as prune_smallest counts.
    return int(np.floor(np.float32(prune_fraction) * np.float32(fan_in)))
  return int(fan_in)


def prune_smallest(w: jax.Array, fraction: jax.Array) -> jax.Array:
  """Marks the ``floor(fraction * K)`` smallest ``|w|`` of each row: SET's pruning.

  Ties prune the lower slot first; NaN counts as the largest magnitude.

  Arguments:
    w: ``(out, K)`` float weights.
    fraction: ``f``, a number or a scalar array (traced is fine); counted in
      float32, and ``f <= 0`` prunes nothing.

  Returns:
    ``(out, K)`` bool, the pruned slots.
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


def draw_columns(indices: jax.Array, free: jax.Array, in_features: int, *,
                 key: jax.Array, first_row: int | jax.Array = 0) -> jax.Array:
  """Redraws the ``free`` slots of every row with distinct random columns.

  The new columns of a row are a uniformly random set among the columns its
  kept (non-free) slots do not hold, so the row stays distinct: SET's random
  regrowth (the pruned slots free). With every slot free it is the initial
  draw, ``draw_all_columns``.

  Row ``u`` draws from its own key, ``fold_in(fold_in(key, round), u)`` in
  redraw round ``round``, so its new columns depend only on ``key``, ``u`` and
  that row's ``indices``/``free``: drawing the rows in blocks, or a shard of
  them elsewhere (with ``u`` the global row, ``first_row + i`` for row ``i``
  here), gives the same bits.

  Arguments:
    indices: ``(out, K)`` integer columns; the kept ones must be distinct per row.
    free: ``(out, K)`` bool, the slots to draw.
    in_features: number of input columns, ``>= K``.
    key: PRNG key; the same key gives the same bits.
    first_row: the global index of row 0 of ``indices`` (a traced value is fine).

  Returns:
    ``(out, K)`` int32: kept slots unchanged. Work and memory are ``O(out * K)``
    when ``2 K <= in``: draw with replacement, then redraw repeats until none is
    left. Each step treats all column labels alike, so the result is uniform;
    with ``K <= in / 2`` a draw repeats with p <= 1/2, so the loop ends after
    O(log(out * K)) steps. Otherwise, one ``(out, in)`` draw (at most twice
    the size of the result).
  """
  _checks.check_int(indices, "indices")
  if jnp.ndim(indices) != 2 or jnp.shape(free) != jnp.shape(indices):
    raise ValueError(f"indices and free must both have shape (out, K), got "
                     f"{jnp.shape(indices)} and {jnp.shape(free)}")
  if _checks.dtype_of(free) != jnp.bool_:
    raise ValueError(f"free must be a bool array, got dtype {_checks.dtype_of(free)}")
  _checks.check_sizes(in_features, *jnp.shape(indices))
  _checks.check_key(key)
  return _draw_columns(key, indices, free, in_features, first_row, all_free=False)


def draw_all_columns(in_features: int, out_features: int, fan_in: int, *,
                     key: jax.Array) -> jax.Array:
  """Draws ``fan_in`` distinct random columns for every row: ``draw_columns``, all slots free.

  Faster than ``draw_columns`` with an all-true ``free`` (no slot bookkeeping),
  with the same rows once sorted.

  Arguments:
    in_features, out_features, fan_in: sizes, ``1 <= fan_in <= in_features``.
    key: PRNG key; row ``u`` depends only on ``key`` and ``u``.

  Returns:
    ``(out_features, fan_in)`` int32, each row a uniformly random subset of
    ``range(in_features)``, sorted ascending.
  """
  _checks.check_sizes(in_features, out_features, fan_in)
  _checks.check_key(key)
  shape = (out_features, fan_in)
  cols = _draw_columns(key, jnp.zeros(shape, jnp.int32), jnp.ones(shape, bool), in_features,
                       all_free=True)
  return jnp.sort(cols, axis=1)


# The redraw rounds of _draw_columns run on all rows while more than 1 in
# _COMPACT_FRACTION of them still repeat a column, then on just those rows (gathered),
# and so on level by level, down to levels of _COMPACT_MIN_ROWS rows. A round leaves
# a repeat with p ~ K / in (1 in 12 for K 64, in 768): two full rounds, then a few
# ever smaller ones, instead of ~log(out K) full ones.
_COMPACT_FRACTION = 4
_COMPACT_MIN_ROWS = 1024


@functools.partial(jax.jit, static_argnames=("in_features", "all_free", "with_rounds"))
def _draw_columns(key, indices, free, in_features, row_offset=0, *, all_free: bool,
                  with_rounds: bool = False):
  """``draw_columns`` of rows ``row_offset + [0, out)`` (a traced offset is fine).

  ``all_free``: nothing is kept, so rows need no slot bookkeeping and come out
  sorted (a single-operand sort, several times faster on CPU). ``with_rounds``:
  also return the number of redraw rounds (for benchmarks).
  """
  out, fan_in = indices.shape
  indices = indices.astype(jnp.int32)
  rows = row_offset + jnp.arange(out, dtype=jnp.int32)

  def row_keys(step, rows):  # row u of round ``step`` sees only (key, step, u)
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, step), rows)

  if 2 * fan_in > in_features:
    # Uniform scores, kept columns last: the first K by score are a random order of
    # the columns a row may take; the j-th free slot takes the j-th of them.
    local = jnp.arange(out)[:, None]
    scores = jax.vmap(lambda k: jax.random.uniform(k, (in_features,)))(row_keys(0, rows))
    scores = scores.at[local, indices].set(jnp.where(free, scores[local, indices], jnp.inf))
    cols = fill_free_slots(indices, free, jnp.argsort(scores, axis=1)[:, :fan_in])
    return (cols, jnp.zeros((), jnp.int32)) if with_rounds else cols

  def draw(step, rows):
    return jax.vmap(lambda k: jax.random.randint(k, (fan_in,), 0, in_features))(
        row_keys(step, rows))

  # Rows are sorted by (column, free), stably: a repeat is always a free slot, since
  # kept ones are distinct, and which of two equal free slots is redrawn depends on
  # that row alone. The state is a tuple of (rows, K) arrays in that order.
  slot_bits = (fan_in - 1).bit_length()
  col_shift = 2 * slot_bits + 1
  # Where (column, free, position, slot) fit in 31 bits, one int32 key holds them:
  # a single-operand sort gives the stable (column, free) order and carries the slot.
  packed = not all_free and col_shift + (in_features - 1).bit_length() <= 31
  slot_mask = (1 << slot_bits) - 1
  free_and_slot = (1 << 2 * slot_bits) | slot_mask

  def columns(state):
    return state[0] >> col_shift if packed else state[0]

  def with_columns(state, cols):  # the state's rows, given these columns, sorted
    if all_free:
      return (jnp.sort(cols, axis=1),)
    if packed:
      position = lax.broadcasted_iota(jnp.int32, cols.shape, 1) << slot_bits
      return (jnp.sort((cols << col_shift) | position | (state[0] & free_and_slot), axis=1),)
    return lax.sort((cols, *state[1:]), dimension=1, num_keys=2, is_stable=True)

  def repeated(state, valid):  # (n, K): a column equal to its left neighbour's
    cols = columns(state)
    same = cols[:, 1:] == cols[:, :-1]
    return jnp.concatenate([jnp.zeros((cols.shape[0], 1), bool), same & valid[:, None]], axis=1)

  def resolve(state, rows, valid, step):
    """Redraws the repeats of ``state``'s rows (``valid`` ones) until none is left."""
    def redraw(carry):
      step, state = carry
      cols = jnp.where(repeated(state, valid), draw(step, rows), columns(state))
      return step + 1, with_columns(state, cols)

    n = rows.shape[0]
    cap = n // _COMPACT_FRACTION
    if cap < _COMPACT_MIN_ROWS:
      step, state = lax.while_loop(lambda c: jnp.any(repeated(c[1], valid)), redraw,
                                   (step, state))
      return state, step
    count = lambda state: jnp.sum(jnp.any(repeated(state, valid), axis=1))
    step, state = lax.while_loop(lambda c: count(c[1]) > cap, redraw, (step, state))
    # The rows that still repeat (at most cap; the rest pad with an index past the end,
    # which reads the last row, never redraws, and writes nothing back).
    chosen = jnp.nonzero(jnp.any(repeated(state, valid), axis=1), size=cap, fill_value=n)[0]
    take = jnp.minimum(chosen, n - 1)
    sub, step = resolve(tuple(a[take] for a in state), rows[take], chosen < n, step)
    return tuple(a.at[chosen].set(b, mode="drop") for a, b in zip(state, sub)), step

  slots = lax.broadcasted_iota(jnp.int32, (out, fan_in), 1)
  if all_free:
    state = ()
  elif packed:
    state = ((free.astype(jnp.int32) << 2 * slot_bits) | slots,)
  else:
    state = (slots, free.astype(jnp.int32), slots)  # the first entry: the columns' place
  state = with_columns(state, jnp.where(free, draw(0, rows), indices))
  state, step = resolve(state, rows, jnp.ones((out,), bool), 1)
  if all_free:
    cols = state[0]
  else:
    # Back from sorted order to slot order.
    sorted_slots = state[0] & slot_mask if packed else state[2]
    cols = jnp.zeros((out, fan_in), jnp.int32).at[jnp.arange(out)[:, None], sorted_slots].set(
        columns(state))
  return (cols, step - 1) if with_rounds else cols


def fill_free_slots(indices: jax.Array, free: jax.Array, candidates: jax.Array) -> jax.Array:
  """The j-th free slot of a row (in slot order) takes ``candidates[row, j]``.

  Arguments:
    indices, free: ``(out, K)`` columns and the bool slots to fill.
    candidates: ``(out, >= K)`` columns, in the order the free slots take them.

  Returns:
    ``(out, K)`` int32.
  """
  rank = jnp.cumsum(free, axis=1) - 1
  chosen = jnp.take_along_axis(candidates, jnp.maximum(rank, 0), axis=1)
  return jnp.where(free, chosen.astype(jnp.int32), indices.astype(jnp.int32))


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

  return over_row_chunks(refill_block, out, block, indices)


def _rigl_from_candidates(indices, pruned, value_grads, columns, scores):
  """RigL's new ``(rows, K)`` int32 columns from per-row candidates (see ``rewire_layer``).

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


def _rewire_rows(select, regrow, indices, w, block_elements=None):
  """``(new indices, pruned)`` of one layer, rewired block by block of rows.

  ``select(w_block) -> pruned_block`` and ``regrow(start, indices_block,
  pruned_block) -> columns`` see ``block_elements`` (default
  ``_rewire_block_elements()``) slots at a time, so on CPU the per-row sorts and
  draws need scratch for one block, not a dozen ``(out, K)`` arrays (which, at
  500k labels, outweighed the classifier itself); on GPU/TPU the few large
  blocks keep that bounded too.
  """
  out, fan_in = indices.shape

  def block(start, size, carry):
    new, pruned = carry
    idx = lax.dynamic_slice_in_dim(indices, start, size)
    dropped = select(lax.dynamic_slice_in_dim(w, start, size))
    cols = regrow(start, idx, dropped).astype(indices.dtype)
    return (lax.dynamic_update_slice_in_dim(new, cols, start, 0),
            lax.dynamic_update_slice_in_dim(pruned, dropped, start, 0))

  if block_elements is None:
    block_elements = _rewire_block_elements()
  rows = max(1, min(out, block_elements // fan_in))
  carry = varying_like((indices, jnp.zeros(indices.shape, bool)), indices, w)
  return over_row_chunks(block, out, rows, carry)
