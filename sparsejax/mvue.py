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

Randomness: group ``g`` (groups numbered in the order of ``x`` with the group
axis moved last) draws its uniforms from ``threefry2x32(key, (g, 0))``, one
32-bit word per uniform. The result therefore depends only on the key and the
group's position, not on how the work is split, which lets a fused kernel
reproduce it bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from sparsejax import _checks
from sparsejax.nm import _check_nm, from_groups, nm_mask, to_groups

__all__ = ["METHODS", "nm_prune", "prune_groups", "group_uniforms"]

METHODS = ("mvue", "mvue_approx", "greedy")
_RANDOM = {("mvue", 1, 2): 1, ("mvue", 2, 4): 1, ("mvue_approx", 2, 4): 2}  # uniforms/group


def _check_method(method: str, n: int, m: int) -> None:
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "greedy":
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
      raise ValueError(f"greedy N:M pruning needs integers 1 <= n < m, got n={n!r}, m={m!r}")
  elif (method, n, m) not in _RANDOM:
    supported = sorted(f"{n}:{m}" for meth, n, m in _RANDOM if meth == method)
    raise ValueError(f"method {method!r} supports {', '.join(supported)}, got {n}:{m}")


def _key_data(key) -> jax.Array:
  if key is None:
    raise ValueError("this N:M method is random: pass a PRNG key (jax.random.key(...))")
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  if key.shape != (2,) or key.dtype != jnp.uint32:
    raise ValueError("N:M pruning needs a single threefry2x32 key (jax.random.key or a "
                     f"uint32[2] raw key), got shape {key.shape} and dtype {key.dtype}")
  return key


def group_uniforms(key: jax.Array, num_groups: int, draws: int) -> jax.Array:
  """Uniforms in ``[0, 1)`` for each group: ``threefry2x32(key, (g, 0))``, word ``d``.

  Arguments:
    key: a threefry2x32 PRNG key.
    num_groups: number of groups ``G`` (< 2^32).
    draws: uniforms per group, 1 or 2.

  Returns:
    float32 ``(G, draws)``, multiples of ``2^-23`` as in ``jax.random.uniform``.
  """
  if num_groups >= 2**32:
    raise ValueError(f"at most 2^32 - 1 groups per call, got {num_groups}")
  counters = jnp.concatenate([jnp.arange(num_groups, dtype=jnp.uint32),
                              jnp.zeros(num_groups, jnp.uint32)])
  words = threefry_2x32(_key_data(key), counters).reshape(2, num_groups).T[:, :draws]
  mantissa = (words >> 9) | np.uint32(0x3F800000)  # 1.xxx in [1, 2)
  return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0


def nm_prune(x: jax.Array, key: jax.Array | None = None, *, n: int, m: int, method: str,
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
    (float64 for float64 input). Same key, same bits.
  """
  _checks.check_float(x, "x")
  _check_method(method, n, m)
  if method == "greedy":  # nm_mask runs the same checks
    return jnp.where(nm_mask(x, n, m, axis), x, jnp.zeros((), jnp.result_type(x)))
  axis = _check_nm(jnp.shape(x), n, m, axis)
  _checks.check_finite(x, "x")
  x = jnp.asarray(x)
  groups = to_groups(x, m, axis)
  uniforms = group_uniforms(key, int(np.prod(groups.shape[:-1])), _RANDOM[method, n, m])
  out = prune_groups(groups, uniforms.reshape(*groups.shape[:-1], -1), n=n, method=method)
  return from_groups(out, axis)


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
    enumerate every outcome of ``u`` and kernels can be checked against it.
  """
  _check_method(method, n, groups.shape[-1])
  if method == "greedy":
    raise ValueError("prune_groups implements the random methods; use nm_prune for greedy")
  acc = jnp.promote_types(groups.dtype, jnp.float32)
  x = groups.astype(acc)
  u = uniforms.astype(acc)
  a = jnp.abs(x)
  if method == "mvue_approx":
    p, kept = _two_without_replacement(a, u[..., 0], u[..., 1])
  elif n == 1:
    p, kept = _mvue_pair(a, u[..., 0])
  else:
    p, kept = _mvue_systematic(a, u[..., 0])
  safe_p = jnp.where(kept, p, 1)
  return jnp.where(kept, x / safe_p, 0).astype(groups.dtype)


def _pick(weights, point):
  """The entry whose slot on the cumulative ``weights`` holds ``point * total``.

  Returns a bool one-hot ``(..., m)`` (all False when the total is 0). The last
  positive entry's slot is closed above, so rounding cannot push a point past it.
  """
  cumulative = jnp.cumsum(weights, axis=-1)
  total = cumulative[..., -1:]
  t = point[..., None] * total
  # Exclusive cumsum (not cumulative - weights, which rounds): slots tile with no gap.
  lower = jnp.concatenate([jnp.zeros_like(total), cumulative[..., :-1]], axis=-1)
  positive = weights > 0
  m = weights.shape[-1]
  last_positive = (m - 1 - jnp.argmax(positive[..., ::-1], axis=-1))[..., None]
  is_last = jnp.arange(m) == last_positive
  upper_ok = (t < cumulative) | is_last
  return positive & (lower <= t) & upper_ok


def _mvue_pair(a, u):
  total = jnp.sum(a, axis=-1, keepdims=True)
  p = a / jnp.where(total > 0, total, 1)
  return p, _pick(a, u)


def _mvue_systematic(a, u):
  total = jnp.sum(a, axis=-1, keepdims=True)
  a_max = jnp.max(a, axis=-1, keepdims=True)
  dominant = (2 * a_max > total) & (a == a_max)
  # Only one entry can exceed half the total; first index on an exact tie.
  dominant = dominant & (jnp.cumsum(dominant, axis=-1) == 1)
  has_dominant = jnp.any(dominant, axis=-1, keepdims=True)
  rest = jnp.where(dominant, 0, a)
  rest_total = jnp.sum(rest, axis=-1, keepdims=True)
  p = jnp.where(has_dominant,
                jnp.where(dominant, 1, rest / jnp.where(rest_total > 0, rest_total, 1)),
                2 * a / jnp.where(total > 0, total, 1))
  # No dominant entry: points u and u + 1 on [0, 2), i.e. u/2 and (u+1)/2 of the total.
  kept_spread = _pick(a, u / 2) | _pick(a, (u + 1) / 2)
  # A dominant entry is kept surely; one more is drawn from the rest with p = a / rest_total.
  kept_dominant = dominant | _pick(rest, u)
  return p, jnp.where(has_dominant, kept_dominant, kept_spread)


def _two_without_replacement(a, u1, u2):
  total = jnp.sum(a, axis=-1, keepdims=True)
  first = _pick(a, u1)
  second = _pick(jnp.where(first, 0, a), u2)
  t = a / jnp.where(total > 0, total, 1)
  rest = total - a  # S - a_j
  ratio = jnp.where(rest > 0, t / jnp.where(rest > 0, rest, 1), 0)  # t_j / (S - a_j)
  p = t + a * (jnp.sum(ratio, axis=-1, keepdims=True) - ratio)
  return p, first | second
