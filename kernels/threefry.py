"""The counter-based random map that MVUE pruning draws its uniforms from, elementwise.

Group ``g`` of an N:M-pruned array (numbered as in ``sparsejax.mvue.nm_prune``)
gets its random words from threefry-2x32 of a counter that depends on ``g``
alone: with one word per group, groups ``2 c`` and ``2 c + 1`` take words 0 and
1 of ``threefry2x32(key, (c, 0))``; with two, group ``g`` takes both words of
``threefry2x32(key, (g, 0))``. Written with uint32 adds, shifts and xors only,
so that the Pallas kernels (``sparsejax.kernels.nm``) and the XLA path
(``sparsejax.mvue``) run the same functions and agree bit for bit, however the
work is split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["threefry_words", "uniform_from_word", "group_words"]


def threefry_words(key_words: tuple, counter0: jax.Array, counter1: jax.Array):
  """Threefry-2x32 (20 rounds) of the counter pair ``(counter0, counter1)``, elementwise.

  The same bits as ``jax.extend.random.threefry_2x32``, written with uint32
  adds, shifts and xors only, so Pallas kernels can run it on their tiles.

  Arguments:
    key_words: the key's two uint32 words (scalars).
    counter0, counter1: uint32 arrays of one shape.

  Returns:
    The two output words, uint32 arrays of the counters' shape.
  """
  k0, k1 = key_words
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = counter0 + ks[0], counter1 + ks[1]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
    x0 = x0 + ks[(block + 1) % 3]
    x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def uniform_from_word(word: jax.Array) -> jax.Array:
  """float32 in ``[0, 1)`` from the top 23 bits of a uint32 word (as ``jax.random.uniform``)."""
  return (word >> np.uint32(9)).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0**-23)


def group_words(key_words: tuple, group: jax.Array, draws: int) -> list:
  """The random words of each group, elementwise (the map of the module docstring).

  Arguments:
    key_words: the key's two uint32 words (scalars).
    group: uint32 array of group numbers.
    draws: words per group, 1 or 2.

  Returns:
    ``draws`` uint32 arrays of ``group``'s shape. With one draw, groups ``2 c``
    and ``2 c + 1`` get words 0 and 1 of ``threefry2x32(key, (c, 0))``.
  """
  if draws == 1:
    w0, w1 = threefry_words(key_words, group >> np.uint32(1), jnp.zeros(group.shape, jnp.uint32))
    return [jnp.where((group & np.uint32(1)) == 0, w0, w1)]
  return list(threefry_words(key_words, group, jnp.zeros(group.shape, jnp.uint32)))
