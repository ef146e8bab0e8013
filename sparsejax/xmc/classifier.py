"""The XMC classifier contract: a label-major pytree and the logits of a chunk of its labels.

An XMC classifier scores every one of L labels, so the chunked loss and top-k
(``sparsejax.xmc.label_chunks``) slice it by labels. Both classifiers of the
recipe are therefore stored label-major, every leaf ``(L, ...)``:

- fixed fan-in: a ``sparsejax.FixedFanIn``, or a mapping ``{"values": (L, K),
  "indices": (L, K)[, "bias": (L,)]}`` (the state of
  ``sparsejax.nn.FixedFanInLinear``), scored by ``fixed_fanin_logits``;
- dense baseline: ``{"kernel_t": (L, d)[, "bias": (L,)]}``, the transposed
  kernel of ``LabelMajorLinear``, scored by ``dense_logits``.

Either ``logits_fn(params_chunk, h) -> (B, chunk)`` is what the chunked
functions call on each slice of labels.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax import _tree
from sparsejax.fanin_matmul import fixed_fanin_matmul

__all__ = ["LabelMajorLinear", "dense_logits", "fixed_fanin_logits"]


def fixed_fanin_logits(params, h: jax.Array) -> jax.Array:
  """Logits of a fixed fan-in classifier (or a chunk of its labels).

  Arguments:
    params: a ``FixedFanIn``, or a mapping with ``"values"`` (C, K) float,
      ``"indices"`` (C, K) int and optionally ``"bias"`` (C,).
    h: ``(B, d)`` features.

  Returns:
    ``(B, C)`` logits ``h @ W + bias`` (see ``sparsejax.fixed_fanin_matmul``).
  """
  values, indices, bias = _fixed_fanin_parts(params)
  y = fixed_fanin_matmul(h, values, indices)
  return y if bias is None else y + bias.astype(y.dtype)


def _fixed_fanin_parts(params):
  """``(values, indices, bias or None)`` of a fixed fan-in classifier."""
  if not _tree.is_sparse_layer(params):
    raise ValueError("a fixed fan-in classifier must be a FixedFanIn or a mapping with "
                     f"'values' and 'indices' (and optionally 'bias'), got {type(params)}")
  # A FixedFanIn always has the field (None without a bias); a mapping may leave it out.
  has_bias = not isinstance(params, Mapping) or "bias" in params
  return (_tree.field(params, "values"), _tree.field(params, "indices"),
          _tree.field(params, "bias") if has_bias else None)


def dense_logits(params, h: jax.Array) -> jax.Array:
  """Logits of a dense classifier (or a chunk of its labels).

  Arguments:
    params: a mapping with ``"kernel_t"`` (C, d), the transposed kernel, and
      optionally ``"bias"`` (C,).
    h: ``(B, d)`` features.

  Returns:
    ``(B, C)`` logits ``h @ kernel_t.T + bias``. The product runs in ``h``'s
    dtype (``kernel_t`` cast to it), accumulated and returned in at least
    float32, as ``fixed_fanin_logits`` on its tile path: a bfloat16 ``h`` means
    bfloat16 matmul inputs and float32 logits.
  """
  if not (isinstance(params, Mapping) and "kernel_t" in params):
    raise ValueError("a dense classifier must be a mapping with 'kernel_t' (L, d) "
                     f"(and optionally 'bias'), got {type(params)}")
  kernel_t, bias = params["kernel_t"], params.get("bias")
  if jnp.ndim(kernel_t) != 2 or jnp.shape(h)[-1] != jnp.shape(kernel_t)[1]:
    raise ValueError(f"kernel_t must have shape (L, {jnp.shape(h)[-1]}) for h of shape "
                     f"{jnp.shape(h)}, got {jnp.shape(kernel_t)}")
  acc = jnp.promote_types(jnp.result_type(h), jnp.float32)
  y = jnp.dot(h, kernel_t.astype(jnp.result_type(h)).T, preferred_element_type=acc)
  return y if bias is None else y + bias.astype(y.dtype)


class LabelMajorLinear(nnx.Module):
  """Dense linear layer stored as ``kernel_t`` ``(out, in)``: a label chunk is a row slice.

  Initialised like a fixed fan-in layer with ``K = in``: ``U(-1/sqrt(in),
  1/sqrt(in))`` weights and a zero bias.

  Attributes:
    kernel_t: ``nnx.Param`` of shape ``(out, in)``.
    bias: ``nnx.Param`` of shape ``(out,)``.
  """

  def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    bound = 1.0 / in_features ** 0.5
    self.kernel_t = nnx.Param(jax.random.uniform(rngs.params(), (out_features, in_features),
                                                 dtype, -bound, bound))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(B, in) -> (B, out)``: all logits at once (small layers, tests)."""
    return dense_logits({"kernel_t": self.kernel_t[...], "bias": self.bias[...]}, x)
