"""The variance that N:M pruning adds to real neural gradients, measured against its formula.

An unbiased estimator that keeps entry ``i`` of a group with probability
``p_i`` and rescales it to ``x_i / p_i`` has, summed over the group's
entries, the variance ``sum_i x_i^2 (1 / p_i - 1)``: ``2 |a| |b|`` for MVUE 1:2,
the systematic-sampling minimum for MVUE 2:4, and the same sum over the
inclusion probabilities of two draws without replacement for the approximate
2:4 (``docs/methods.md``). ``formula_variance`` evaluates it from the
probabilities alone (an implementation independent of ``sparsejax.nm_prune``);
``empirical_variance`` draws ``nm_prune`` with many keys and averages
``||prune(dY) - dY||^2``. Their ratio is 1 up to Monte-Carlo error when the
pruning is unbiased with the stated probabilities (a bias would add its square
to the empirical side). For greedy pruning (deterministic, biased) the
"empirical variance" is its squared error ``||greedy(dY) - dY||^2`` and there
is no formula.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import sparsejax as sj
from sparsejax.nm import to_groups

__all__ = ["inclusion_probabilities", "formula_variance", "empirical_variance"]


def inclusion_probabilities(groups: jax.Array, *, n: int, method: str) -> jax.Array:
  """``p_i``, the probability that each entry of each group is kept.

  Arguments:
    groups: ``(..., m)`` float groups (``m = 2 n``).
    n: 1 (1:2) or 2 (2:4).
    method: ``"mvue"`` (1:2 or 2:4) or ``"mvue_approx"`` (2:4).

  Returns:
    ``(..., m)`` probabilities; all 0 for an all-zero group.
  """
  a = jnp.abs(groups)
  total = a.sum(-1, keepdims=True)
  safe = lambda t: jnp.where(t > 0, t, 1)
  if method == "mvue" and n == 1:
    return a / safe(total)
  if method == "mvue" and n == 2:
    first_max = jax.nn.one_hot(jnp.argmax(a, -1), a.shape[-1], dtype=bool)
    rest = jnp.where(first_max, 0, a).sum(-1, keepdims=True)  # not total - max: no cancellation
    dominant = 2 * a.max(-1, keepdims=True) > total
    capped = jnp.where(first_max, 1.0, a / safe(rest))
    return jnp.where(total > 0, jnp.where(dominant, capped, 2 * a / safe(total)), 0.0)
  if method == "mvue_approx" and n == 2:
    t = a / safe(total)
    # Sums over j != i, not totals minus entry i, which cancel when entry i dominates.
    but_self = lambda v: jnp.where(jnp.eye(a.shape[-1], dtype=bool), 0, v[..., None, :]).sum(-1)
    others = but_self(a)  # S - a_j, the mass left after drawing j first
    return t + a * but_self(jnp.where(others > 0, t / safe(others), 0.0))
  raise ValueError(f"no inclusion probabilities for {method} {n}:{2 * n}")


def formula_variance(x: jax.Array, *, n: int, m: int, method: str, axis: int = 0) -> jax.Array:
  """``sum_i x_i^2 (1 / p_i - 1)`` over every entry of ``x``, groups of ``m`` along ``axis``.

  Arguments:
    x: the gradient that is pruned (float).
    n, m, method: the unbiased estimator (``"mvue"`` 1:2/2:4, ``"mvue_approx"`` 2:4).
    axis: the group axis (the contraction axis of the GEMM that consumes it).

  Returns:
    float32 scalar, the expected ``||prune(x) - x||^2``.
  """
  groups = to_groups(x.astype(jnp.float32), m, axis)
  p = inclusion_probabilities(groups, n=n, method=method)
  return jnp.where(p > 0, groups**2 * (1 / jnp.where(p > 0, p, 1) - 1), 0.0).sum()


@functools.partial(jax.jit, static_argnames=("n", "m", "method", "axis", "draws"))
def empirical_variance(x: jax.Array, *, key: jax.Array, n: int, m: int, method: str,
                       axis: int = 0, draws: int = 64) -> jax.Array:
  """Mean over ``draws`` keys of ``||nm_prune(x) - x||^2`` (summed over every entry).

  Arguments:
    x: the gradient (float); ``x.shape[axis]`` divisible by ``m``.
    key: PRNG key; draw ``k`` uses ``fold_in(key, k)``.
    n, m, method, axis: as in ``sparsejax.nm_prune`` (greedy: one deterministic draw).
    draws: number of prunings averaged.

  Returns:
    float32 scalar.
  """
  x = x.astype(jnp.float32)
  if method == "greedy":
    return jnp.sum((sj.nm_prune(x, n=n, m=m, method=method, axis=axis) - x) ** 2)

  def one(total, k):
    pruned = sj.nm_prune(x, key=jax.random.fold_in(key, k), n=n, m=m, method=method, axis=axis)
    return total + jnp.sum((pruned - x) ** 2), None

  total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), jnp.arange(draws))
  return total / draws
