"""A small byte-level GPT-style decoder in Flax NNX for the language-modelling experiments.

Every linear layer (attention q/k/v and output, MLP, and the output head) is
built by a ``linear(in, out, rngs)`` factory, so an experiment can swap in a
wrapped or sparse layer without touching the model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LinearFactory = Callable[[int, int, nnx.Rngs], nnx.Module]


def dense_linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Module:
  return nnx.Linear(in_features, out_features, rngs=rngs)


class Block(nnx.Module):
  """Pre-norm causal self-attention + MLP block."""

  def __init__(self, width: int, heads: int, linear: LinearFactory, *, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width {width} must be divisible by heads {heads}")
    self.heads = heads
    self.norm1, self.norm2 = nnx.LayerNorm(width, rngs=rngs), nnx.LayerNorm(width, rngs=rngs)
    self.qkv = linear(width, 3 * width, rngs)
    self.proj = linear(width, width, rngs)
    self.fc = linear(width, 4 * width, rngs)
    self.out = linear(4 * width, width, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    split = lambda t: t.reshape(batch, length, self.heads, width // self.heads)
    attended = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=True)
    x = x + self.proj(attended.reshape(batch, length, width))
    return x + self.out(jax.nn.gelu(self.fc(self.norm2(x))))


class ByteLM(nnx.Module):
  """Bytes ``(batch, length)`` -> next-byte logits ``(batch, length, 256)``.

  Arguments:
    width, depth, heads, context: model size and maximum length.
    linear: factory for every linear layer, including the output head.
    rngs: initialisation keys (and whatever the linear layers draw).
  """

  def __init__(self, *, width: int = 128, depth: int = 2, heads: int = 4, context: int = 64,
               linear: LinearFactory = dense_linear, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, width, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, width)))
    self.blocks = nnx.List([Block(width, heads, linear, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = linear(width, 256, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position[...][: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))
