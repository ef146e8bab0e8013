"""The MVUE N:M estimators on a group's entries held as separate arrays, elementwise.

``prune_columns`` is the whole rule of ``sparsejax.mvue.nm_prune`` for the random
methods, written with elementwise operations in a fixed order, so that the XLA path
(``sparsejax.mvue``) and the Pallas kernels (``sparsejax.kernels.nm``, which hold entry
``j`` of a tile's groups as one array) run this one function and agree bit for bit.
It lives on the kernels side so that ``kernels/`` imports nothing of the core. The maths
is in ``docs/methods.md``, "MVUE N:M gradient pruning".
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

__all__ = ["DRAWS", "keep_non_finite", "prune_columns"]

# Uniforms per group of each random (method, n, m).
DRAWS = {("mvue", 1, 2): 1, ("mvue", 2, 4): 1, ("mvue_approx", 2, 4): 2}


def prune_columns(columns: list, uniforms: list, *, method: str) -> list:
  """The MVUE rule on a group's entries held as ``m`` separate arrays.

  Only elementwise operations, in a fixed order (module docstring).

  Arguments:
    columns: ``m`` float arrays of one shape, entry ``j`` of every group (m = 2 or 4).
    uniforms: ``d`` arrays of that shape in ``[0, 1)`` (``d = 2`` for ``"mvue_approx"``).
    method: ``"mvue"`` (1:2 when ``m = 2``, 2:4 when ``m = 4``) or ``"mvue_approx"``.

  Returns:
    ``m`` arrays: the kept entries ``x_j / p_j``, zeros elsewhere; a group
    holding a NaN or inf (or whose ``sum |x|`` overflows) comes out unchanged.
  """
  a = [jnp.abs(x) for x in columns]
  total = _running_sums(a)[-1]
  if method == "mvue_approx":
    p, kept = _two_without_replacement(a, total, uniforms[0], uniforms[1])
    scaled = [x / jnp.where(k, pj, 1) for x, pj, k in zip(columns, p, kept)]
  else:
    # x / p in closed form (sign(x) S for 1:2, sign(x) S / 2 for 2:4, ...): exact, and
    # free of divisions that a compiler could reassociate differently in a kernel.
    rule = _mvue_pair if len(columns) == 2 else _mvue_systematic
    magnitude, kept = rule(a, total, uniforms[0])
    scaled = [jnp.where(x < 0, -s, s) for x, s in zip(columns, magnitude)]
  zero = jnp.zeros_like(columns[0])
  # One test on the sum instead of one per entry: a NaN or inf anywhere makes it non-finite.
  bad = ~jnp.isfinite(total)
  return [jnp.where(bad, x, jnp.where(k, v, zero)) for x, v, k in zip(columns, scaled, kept)]


def keep_non_finite(columns: list, pruned: list) -> list:
  """``pruned``, except that every group holding a NaN or inf is ``columns``, unchanged.

  Pruning must not hide a diverging gradient: zeroing a group's NaN would.

  Arguments:
    columns: ``m`` arrays of one shape, entry ``j`` of every group, as given.
    pruned: ``m`` arrays of that shape, the pruned entries.

  Returns:
    ``m`` arrays.
  """
  bad = functools.reduce(jnp.logical_or, [~jnp.isfinite(x) for x in columns])
  return [jnp.where(bad, x, p) for x, p in zip(columns, pruned)]


def _running_sums(weights):
  """Inclusive prefix sums, added left to right (the one summation order used here)."""
  sums = [weights[0]]
  for w in weights[1:]:
    sums.append(sums[-1] + w)
  return sums


def _safe(total):
  return jnp.where(total > 0, total, 1)


def _pick(weights, point):
  """The entry whose slot on the cumulative ``weights`` holds ``point * total``.

  Returns ``m`` bool arrays, one-hot across them (all False when the total is
  0). The last positive entry's slot is closed above, so rounding cannot push a
  point past it.
  """
  cumulative = _running_sums(weights)
  t = point * cumulative[-1]
  picked, later_positive = [None] * len(weights), jnp.zeros(t.shape, bool)
  for j in reversed(range(len(weights))):
    positive = weights[j] > 0
    lower = cumulative[j - 1] if j else jnp.zeros_like(t)
    upper_ok = (t < cumulative[j]) | ~later_positive  # last positive entry: closed above
    picked[j] = positive & (lower <= t) & upper_ok
    later_positive = later_positive | positive
  return picked


def _mvue_pair(a, total, u):
  """Kept magnitude ``|x| / p = S`` for either entry, and the kept entry.

  Entry 0 is kept when ``u S < |x_0|``, or when entry 1 is zero (so a group with one
  non-zero keeps it, whatever the rounding of ``u S``): two compares, the fewest the
  GPU kernel can run.
  """
  first = (u * total < a[0]) | (a[1] == 0)
  return [total, total], [first, ~first]


def _mvue_systematic(a, total, u):
  """Kept magnitudes ``|x| / p`` and kept entries of 2:4 systematic sampling."""
  a_max = functools.reduce(jnp.maximum, a)
  # Only one entry can exceed half the total; first index on an exact tie.
  dominant, seen = [], jnp.zeros(u.shape, bool)
  for aj in a:
    dominant.append((2 * a_max > total) & (aj == a_max) & ~seen)
    seen = seen | dominant[-1]
  has_dominant = seen
  rest = [jnp.where(d, 0, aj) for d, aj in zip(dominant, a)]
  rest_total = _running_sums(rest)[-1]
  # p = 1 for a dominant entry, a / rest_total for the others; else p = 2 a / S.
  magnitude = [jnp.where(has_dominant, jnp.where(d, aj, rest_total), total / 2)
               for d, aj in zip(dominant, a)]
  # No dominant entry: points u and u + 1 on [0, 2), i.e. u/2 and (u+1)/2 of the total.
  spread = [x | y for x, y in zip(_pick(a, u / 2), _pick(a, (u + 1) / 2))]
  # A dominant entry is kept surely; one more is drawn from the rest with p = a / rest_total.
  with_dominant = [d | r for d, r in zip(dominant, _pick(rest, u))]
  return magnitude, [jnp.where(has_dominant, x, y) for x, y in zip(with_dominant, spread)]


def _two_without_replacement(a, total, u1, u2):
  first = _pick(a, u1)
  second = _pick([jnp.where(f, 0, aj) for f, aj in zip(first, a)], u2)
  t = [aj / _safe(total) for aj in a]
  # t_j / (S - a_j) as one division: chained divisions get reassociated differently by
  # XLA and by a kernel's compiler, which would break bit-equality between them.
  ratio = [jnp.where(total - aj > 0, aj / _safe(total * (total - aj)), 0) for aj in a]
  ratio_sum = _running_sums(ratio)[-1]
  p = [tj + aj * (ratio_sum - rj) for tj, aj, rj in zip(t, a, ratio)]
  return p, [f | s for f, s in zip(first, second)]
