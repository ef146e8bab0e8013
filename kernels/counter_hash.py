"""The counter-based random map that MVUE pruning draws its uniforms from, elementwise.

Group ``g`` of an N:M-pruned array (numbered in memory order, see
``sparsejax.mvue.nm_prune``) gets the word ``hash_word(key, g)``; a method with
two uniforms per group takes the words of counters ``2 g`` and ``2 g + 1``.

``hash_word(key, c) = mix(mix(c + k0) ^ k1)``, where ``mix`` is a 32-bit
xorshift-multiply finalizer (C. Wellons' "lowbias32"): a bijection of uint32,
so for a uniformly random key every group's word is *exactly* uniform, whatever
the finalizer's quality. Unbiasedness of the estimators therefore needs nothing
of the hash; its mixing only has to make different groups' words look
independent (tested: uniformity, correlation between neighbours and across
keys). It costs about 18 integer operations per word, against about 50 for one
word of threefry-2x32-20, which is what the GPU mask kernel is bounded by.

Only uint32 adds, multiplies (low half), shifts and xors, so the Pallas kernels
(``sparsejax.kernels.nm``) and the XLA path (``sparsejax.mvue``) run the same
functions and agree bit for bit, however the work is split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["hash_word", "uniform_from_word", "group_words"]


def _mix(x: jax.Array) -> jax.Array:
  """lowbias32: a bijective avalanche finalizer of uint32 words."""
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def hash_word(key_words: tuple, counter: jax.Array) -> jax.Array:
  """The random word of each counter under the key, elementwise.

  Arguments:
    key_words: the key's two uint32 words (scalars).
    counter: uint32 array.

  Returns:
    uint32 array of ``counter``'s shape.
  """
  k0, k1 = key_words
  return _mix(_mix(counter + k0) ^ k1)


def uniform_from_word(word: jax.Array) -> jax.Array:
  """float32 in ``[0, 1)`` from the top 23 bits of a uint32 word (as ``jax.random.uniform``)."""
  return (word >> np.uint32(9)).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0**-23)


def group_words(key_words: tuple, group: jax.Array, draws: int) -> list:
  """The random words of each group, elementwise (the map of the module docstring).

  Arguments:
    key_words: the key's two uint32 words (scalars).
    group: uint32 array of group numbers (below ``2^31`` when ``draws = 2``).
    draws: words per group, 1 or 2.

  Returns:
    ``draws`` uint32 arrays of ``group``'s shape.
  """
  if draws == 1:
    return [hash_word(key_words, group)]
  first = group << np.uint32(1)
  return [hash_word(key_words, first), hash_word(key_words, first | np.uint32(1))]
