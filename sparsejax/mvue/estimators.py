"""Unbiased N:M pruning of neural gradients (Chmiel, Hubara, Banner, Soudry; ICLR 2023).

Pruning the gradient w.r.t. a layer's output (dY) to N:M lets the GEMM that
consumes it run on sparse tensor cores. Greedy top-N keeps the largest entries
and is biased, which breaks SGD on neural gradients; the minimum-variance
unbiased estimators (MVUE) here keep N of every M entries at random and rescale
them so that ``E[out] = x``:

* ``"mvue"`` 1:2: per pair ``(a, b)`` with ``S = |a| + |b|``, keep ``a`` as
  ``sign(a) S`` with probability ``|a| / S``, else ``b`` as ``sign(b) S``.
  Variance ``2 |a| |b|``.
* ``"mvue"`` 2:4: inclusion probabilities ``p_i = 2 |x_i| / S`` (capped at 1
  for a dominant entry, the rest renormalised), then systematic sampling with
  one uniform: keep the entries whose intervals on ``[0, 2)`` hold ``u`` and
  ``u + 1``; a kept entry becomes ``x_i / p_i``. This attains the minimum
  variance ``sum x_i^2 (1/p_i - 1)``.
* ``"mvue_approx"`` 2:4: draw two entries without replacement with probability
  proportional to ``|x|`` and rescale each by its exact inclusion probability
  ``p_i = t_i + a_i sum_{j != i} t_j / (S - a_j)``, ``t = a / S``. Unbiased,
  higher variance.
* ``"greedy"``: keep the ``n`` largest ``|x|`` unscaled (biased baseline).

Randomness: group ``g`` takes its uniform(s) from ``hash_word(key, g)`` (two
draws: counters ``2 g`` and ``2 g + 1``), a keyed bijective hash of a counter
(``sparsejax.kernels.counter_hash``). Groups are numbered in memory order: with
``x`` viewed as ``(P, A, Q)`` around the group axis (``A`` entries along it), the
group of entries ``(p, m a' .. m a' + m - 1, q)`` is ``(p A / m + a') Q + q``. The
result depends only on the key and each group's position, not on how the work
is split, and the number is one multiply-add of a kernel tile's row and column,
so the Pallas kernels reproduce it bit for bit: the map is
``sparsejax.kernels.counter_hash``'s and the rule
``sparsejax.kernels.mvue_columns``'s, elementwise functions that the kernels run too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import _checks
from sparsejax.kernels.mvue_columns import DRAWS, keep_non_finite, prune_columns
from sparsejax.kernels.counter_hash import group_words, uniform_from_word
from sparsejax.nm import _check_nm, from_groups, keep_largest, to_groups

__all__ = ["METHODS", "DRAWS", "nm_prune", "prune_groups", "group_uniforms", "key_data"]

METHODS = ("mvue", "mvue_approx", "greedy")


def _check_method(method: str, n: int, m: int) -> None:
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "greedy":
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
      raise ValueError(f"greedy N:M pruning needs integers 1 <= n < m, got n={n!r}, m={m!r}")
  elif (method, n, m) not in DRAWS:
    supported = sorted(f"{n}:{m}" for meth, n, m in DRAWS if meth == method)
    raise ValueError(f"method {method!r} supports {', '.join(supported)}, got {n}:{m}")


def key_data(key) -> jax.Array:
  """The ``uint32[2]`` words of a threefry2x32 key (a typed ``jax.random.key`` or raw data)."""
  if key is None:
    raise ValueError("this N:M method is random: pass a PRNG key (jax.random.key(...))")
  _checks.check_key(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  if key.shape != (2,) or key.dtype != jnp.uint32:
    raise ValueError("N:M pruning needs a single threefry2x32 key (jax.random.key or a "
                     f"uint32[2] raw key), got shape {key.shape} and dtype {key.dtype}")
  return key


def _check_group_count(num_groups: int, draws: int) -> None:
  bits = 33 - draws  # with two draws, counters 2g and 2g + 1 stay below 2^32
  if num_groups >= 2**bits:
    raise ValueError(f"at most 2^{bits} - 1 groups per call with {draws} uniform(s) per "
                     f"group, got {num_groups}")


def _uniforms_of(groups: jax.Array, draws: int, key: jax.Array) -> jax.Array:
  """float32 ``groups.shape + (draws,)``: the uniforms of the given group numbers."""
  key = key_data(key)
  words = group_words((key[0], key[1]), groups, draws)
  return jnp.stack([uniform_from_word(w) for w in words], axis=-1)


def group_uniforms(num_groups: int, draws: int, *, key: jax.Array) -> jax.Array:
  """Uniforms in ``[0, 1)`` of groups ``0 .. G - 1``, from ``group_words``.

  Arguments:
    num_groups: number of groups ``G`` (below ``2^32``, ``2^31`` with two draws).
    draws: uniforms per group, 1 or 2.
    key: a threefry2x32 PRNG key (its two words key the hash).

  Returns:
    float32 ``(G, draws)``, multiples of ``2^-23`` as in ``jax.random.uniform``.
  """
  _check_group_count(num_groups, draws)
  return _uniforms_of(jnp.arange(num_groups, dtype=jnp.uint32), draws, key)


def _group_numbers(shape: tuple, m: int, axis: int) -> jax.Array:
  """The memory-order number of every group, in the layout of ``to_groups(x, m, axis)``.

  Arguments:
    shape: the pruned array's shape; ``axis`` non-negative, ``shape[axis] % m == 0``.

  Returns:
    uint32 ``shape[:axis] + shape[axis + 1:] + (shape[axis] // m,)``: group ``(p, a',
    q)`` of the ``(P, A, Q)`` view is ``(p A / m + a') Q + q``.
  """
  before, after = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
  per_slice = shape[axis] // m
  p = jnp.arange(before, dtype=jnp.uint32)[:, None, None]
  q = jnp.arange(after, dtype=jnp.uint32)[None, :, None]
  a = jnp.arange(per_slice, dtype=jnp.uint32)[None, None, :]
  numbers = (p * np.uint32(per_slice) + a) * np.uint32(after) + q
  return numbers.reshape(*shape[:axis], *shape[axis + 1:], per_slice)


def nm_prune(x: jax.Array, *, key: jax.Array | None = None, n: int, m: int, method: str,
             axis: int = -1) -> jax.Array:
  """Prunes ``x`` to ``n`` non-zeros in every group of ``m`` consecutive entries along ``axis``.

  Arguments:
    x: float32/bfloat16/float64 array; ``x.shape[axis]`` divisible by ``m``.
    key: PRNG key (threefry2x32), required by ``"mvue"`` and ``"mvue_approx"``.
    n, m: ``1:2`` or ``2:4`` for the MVUE methods; any ``n < m`` for greedy.
    method: ``"mvue"``, ``"mvue_approx"`` (2:4) or ``"greedy"``.
    axis: the axis along which groups are formed (the contraction axis of the
      GEMM that consumes the result).

  Returns:
    Array of ``x.shape`` and dtype. Random methods: at most ``n`` non-zeros per
    group (fewer only where the group has fewer non-zero inputs), kept entries
    ``x_i / p_i``, ``E[out] = x``; probabilities are computed in float32
    (float64 for float64 input). Same key, same bits. Every method returns a
    group that holds a NaN or inf unchanged, so a diverging gradient stays
    visible (it is not pruned to zeros).
  """
  _checks.check_float(x, "x")
  _check_method(method, n, m)
  if key is not None:
    _checks.check_key(key)
  axis = _check_nm(jnp.shape(x), n, m, axis)
  groups = to_groups(jnp.asarray(x), m, axis)
  if method == "greedy":
    pruned = jnp.where(keep_largest(jnp.abs(groups), n), groups, jnp.zeros((), groups.dtype))
    out = jnp.stack(keep_non_finite(_columns(groups), _columns(pruned)), axis=-1)
  else:
    draws = DRAWS[method, n, m]
    _check_group_count(int(np.prod(groups.shape[:-1])), draws)
    uniforms = _uniforms_of(_group_numbers(jnp.shape(x), m, axis), draws, key)
    out = prune_groups(groups, uniforms, n=n, method=method)
  return from_groups(out, axis)


def _columns(groups):
  """The entries of ``(..., m)`` groups as ``m`` arrays, as ``prune_columns`` takes them."""
  return [groups[..., j] for j in range(groups.shape[-1])]


def prune_groups(groups: jax.Array, uniforms: jax.Array, *, n: int, method: str) -> jax.Array:
  """MVUE pruning of explicit groups with explicit uniforms (the core of ``nm_prune``).

  Arguments:
    groups: ``(..., m)`` float groups, ``m = 2 n``.
    uniforms: ``(..., d)`` values in ``[0, 1)``: ``d = 1`` for ``"mvue"``,
      ``2`` for ``"mvue_approx"``.
    n: 1 (1:2) or 2 (2:4).
    method: ``"mvue"`` or ``"mvue_approx"``.

  Returns:
    The pruned groups, same shape and dtype. Exposed so that tests can
    enumerate every outcome of ``u``.
  """
  _check_method(method, n, groups.shape[-1])
  if method == "greedy":
    raise ValueError("prune_groups implements the random methods; use nm_prune for greedy")
  acc = jnp.promote_types(groups.dtype, jnp.float32)
  columns = _columns(groups.astype(acc))
  draws = _columns(uniforms.astype(acc))
  return jnp.stack(prune_columns(columns, draws, method=method), axis=-1).astype(groups.dtype)
