"""A small byte-level GPT-style decoder in Flax NNX for the language-modelling experiments.

Every linear layer (attention q/k/v and output, MLP, and the output head) is
built by a ``linear(in, out, rngs)`` factory, so an experiment can swap in a
wrapped or sparse layer without touching the model. The attention layers and
the head may have their own factories (a sparse model keeps its head dense).
An optional ``sparsejax.SuPar`` sets the forward multipliers of SP, μP or
SμPar (embedding ``alpha_in``, logits ``alpha_out / m_d``, attention
``1/d_head``); init and learning rates are the optimizer's business
(``sparsejax.supar.initialize``, ``sparsejax.scale_by_supar``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import sparsejax as sj

LinearFactory = Callable[[int, int, nnx.Rngs], nnx.Module]


def dense_linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Module:
  return nnx.Linear(in_features, out_features, rngs=rngs)


class Block(nnx.Module):
  """Pre-norm causal self-attention + MLP block.

  Arguments:
    width, heads: model width and number of heads (``d_head = width / heads``).
    linear: factory of the MLP layers (and of the attention layers unless
      ``attention_linear`` is given).
    attention_linear: factory of the fused q/k/v layer and the attention output.
    attention_scale: multiplies ``q.k``; ``None`` is ``1/sqrt(d_head)``.
    rngs: initialisation keys.
  """

  def __init__(self, width: int, heads: int, linear: LinearFactory, *,
               attention_linear: LinearFactory | None = None,
               attention_scale: float | None = None, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width {width} must be divisible by heads {heads}")
    attention_linear = attention_linear or linear
    self.heads, self.attention_scale = heads, attention_scale
    self.norm1, self.norm2 = nnx.LayerNorm(width, rngs=rngs), nnx.LayerNorm(width, rngs=rngs)
    self.qkv = attention_linear(width, 3 * width, rngs)
    self.proj = attention_linear(width, width, rngs)
    self.fc = linear(width, 4 * width, rngs)
    self.out = linear(4 * width, width, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    split = lambda t: t.reshape(batch, length, self.heads, width // self.heads)
    attended = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=True,
                                            scale=self.attention_scale)
    x = x + self.proj(attended.reshape(batch, length, width))
    return x + self.out(jax.nn.gelu(self.fc(self.norm2(x))))


class ByteLM(nnx.Module):
  """Bytes ``(batch, length)`` -> next-byte logits ``(batch, length, 256)``.

  Arguments:
    width, depth, heads, context: model size and maximum length.
    linear: factory for every linear layer unless overridden below.
    attention_linear: factory of the attention layers (default ``linear``).
    head: factory of the output head (default ``linear``).
    parameterization: a ``sparsejax.SuPar`` of this ``width`` whose forward
      multipliers the model applies: ``embedding_multiplier`` on the token +
      position embedding, ``output_multiplier`` on the logits and
      ``attention_scale(d_head)`` on ``q.k``. ``None``: plain SP (1, 1,
      ``1/sqrt(d_head)``).
    rngs: initialisation keys (and whatever the linear layers draw).
  """

  def __init__(self, *, width: int = 128, depth: int = 2, heads: int = 4, context: int = 64,
               linear: LinearFactory = dense_linear,
               attention_linear: LinearFactory | None = None,
               head: LinearFactory | None = None,
               parameterization: sj.SuPar | None = None, rngs: nnx.Rngs):
    parameterization = parameterization or sj.SuPar("sp", width=width, base_width=width)
    if parameterization.width != width:
      raise ValueError(f"parameterization width {parameterization.width} != model width {width}")
    self.embedding_multiplier = parameterization.embedding_multiplier
    self.output_multiplier = parameterization.output_multiplier
    self.embed = nnx.Embed(256, width, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, width)))
    self.blocks = nnx.List([
        Block(width, heads, linear, attention_linear=attention_linear,
              attention_scale=parameterization.attention_scale(width // heads), rngs=rngs)
        for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = (head or linear)(width, 256, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # nnx.Embed returns its param_dtype (float32) whatever the table holds; back to the
    # table's dtype (exact), or a bfloat16 copy of the params would run in float32.
    x = self.embed(tokens).astype(self.embed.embedding.dtype)
    x = x + self.position[...][: tokens.shape[1]]
    x = self.embedding_multiplier * x
    for block in self.blocks:
      x = block(x)
    return self.output_multiplier * self.head(self.norm(x))
