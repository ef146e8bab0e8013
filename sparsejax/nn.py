"""Flax NNX modules over the functional layers.

Trainable arrays are ``nnx.Param``; integer topology and boolean masks are
their own ``nnx.Variable`` types, so ``nnx.grad`` and
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` leave them alone while
``nnx.split``/orbax still save and restore them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.fixed_fanin import FixedFanIn
from sparsejax.grad_prune import prune_grad, prune_weight_grad
from sparsejax.masked import MaskedLinear as _MaskedLinearFn

__all__ = ["Indices", "Mask", "FixedFanInLinear", "MaskedLinear", "PrunedGrad", "fixed_fanin_sizes"]


class Indices(nnx.Variable):
  """Integer input columns of a sparse layer (its topology), not a parameter."""


class Mask(nnx.Variable):
  """Boolean mask of a masked layer, not a parameter."""


def _param_or_none(array):
  return None if array is None else nnx.Param(array)


def _value_or_none(variable):
  return None if variable is None else variable[...]


class FixedFanInLinear(nnx.Module):
  """Fixed fan-in sparse linear layer: every output reads ``fan_in`` inputs.

  Arguments:
    in_features, out_features: the dense shape ``(in, out)``.
    fan_in: ``K``, inputs per output.
    use_bias: add a zero-initialised ``(out,)`` bias.
    dtype: float dtype of the values and bias.
    index_dtype: integer dtype of the indices (default uint16 when
      ``in <= 65536``, else int32).
    rngs: draws the topology and values from ``rngs.params()``.

  Attributes:
    values: ``nnx.Param`` of shape ``(out, K)``.
    indices: ``Indices`` of shape ``(out, K)``.
    bias: ``nnx.Param`` of shape ``(out,)`` or ``None``.
  """

  def __init__(self, in_features: int, out_features: int, fan_in: int, *,
               use_bias: bool = True, dtype=jnp.float32, index_dtype=None, rngs: nnx.Rngs):
    layer = FixedFanIn.init(rngs.params(), in_features, out_features, fan_in, dtype=dtype,
                            index_dtype=index_dtype, bias=use_bias)
    self.in_features, self.out_features, self.fan_in = in_features, out_features, fan_in
    self.values = nnx.Param(layer.values)
    self.indices = Indices(layer.indices)
    self.bias = _param_or_none(layer.bias)

  def as_fixed_fanin(self) -> FixedFanIn:
    """The current state as a functional ``FixedFanIn`` pytree (no copy, no validation)."""
    return FixedFanIn._unchecked(self.values[...], self.indices[...],
                                 _value_or_none(self.bias), self.in_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(..., in) -> (..., out)``."""
    return self.as_fixed_fanin()(x)


class MaskedLinear(nnx.Module):
  """Dense linear layer times a static random mask with ``fan_in`` inputs per output.

  Same arguments as ``FixedFanInLinear``; the same ``rngs`` seed gives the same
  topology and initial values, so the two are interchangeable in experiments.

  Attributes:
    weight: ``nnx.Param`` of shape ``(in, out)``.
    mask: ``Mask`` of shape ``(in, out)``, bool.
    bias: ``nnx.Param`` of shape ``(out,)`` or ``None``.
  """

  def __init__(self, in_features: int, out_features: int, fan_in: int, *,
               use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    layer = _MaskedLinearFn.init(rngs.params(), in_features, out_features, fan_in, dtype=dtype,
                                 bias=use_bias)
    self.in_features, self.out_features, self.fan_in = in_features, out_features, fan_in
    self.weight = nnx.Param(layer.weight)
    self.mask = Mask(layer.mask)
    self.bias = _param_or_none(layer.bias)

  def as_masked_linear(self) -> _MaskedLinearFn:
    """The current state as a functional ``sparsejax.MaskedLinear`` pytree."""
    return _MaskedLinearFn.tree_unflatten(
        None, (self.weight[...], self.mask[...], _value_or_none(self.bias)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(..., in) -> (..., out)``."""
    return self.as_masked_linear()(x)


def fixed_fanin_sizes(model: nnx.Module) -> dict[str, int]:
  """``{name: in_features}`` of every ``FixedFanInLinear`` in ``model``.

  Names are state paths joined by ``/`` (``"encoder/layers/0"``), as used by
  ``sparsejax.set_topology(..., in_features=...)``, which needs the input size
  that the NNX state's arrays do not record.
  """
  return {"/".join(map(str, path)): node.in_features
          for path, node in nnx.iter_graph(model) if isinstance(node, FixedFanInLinear)}


class PrunedGrad(nnx.Module):
  """Wraps a layer so that the gradient w.r.t. its output, dY, is N:M-pruned.

  Works with any module called as ``layer(x)`` with output ``(..., out)``:
  ``nnx.Linear``, ``FixedFanInLinear``, ``MaskedLinear``. Every call draws a
  fresh key from ``rngs`` (stream ``grad_prune``, else ``default``), so every
  step prunes differently and the same seed repeats exactly.

  Arguments:
    layer: the wrapped module.
    n, m, method: as in ``sparsejax.nm_prune`` (``"mvue"``, ``"mvue_approx"``,
      ``"greedy"``).
    weight_grad_only: if True (the 2:4 training recipe), only the layer's
      own parameters see the pruned dY, pruned along the token axis (the
      contraction axis of ``dW = dY^T X``), and its input gets the dense
      gradient. If False, dY itself is pruned for every consumer.
    axis: with ``weight_grad_only=False``: ``"tokens"`` (all leading axes
      flattened) or ``"features"`` (the last axis, the contraction axis of
      ``dX = dY W^T``).
    rngs: source of the keys.
  """

  def __init__(self, layer: nnx.Module, *, n: int, m: int, method: str,
               weight_grad_only: bool = True, axis: str = "tokens", rngs: nnx.Rngs):
    if axis not in ("tokens", "features"):
      raise ValueError(f"axis must be 'tokens' or 'features', got {axis!r}")
    self.layer, self.rngs = layer, rngs
    self.n, self.m, self.method = n, m, method
    self.weight_grad_only, self.axis = weight_grad_only, axis

  def __call__(self, x: jax.Array) -> jax.Array:
    key = None if self.method == "greedy" else self.rngs.grad_prune()
    prune = dict(n=self.n, m=self.m, method=self.method)
    if self.weight_grad_only:
      graphdef, state = nnx.split(self.layer)
      return prune_weight_grad(lambda x, state: nnx.merge(graphdef, state)(x), x, state, key,
                               **prune)
    y = self.layer(x)
    tokens = y.reshape(-1, y.shape[-1])
    axis = 0 if self.axis == "tokens" else 1
    return prune_grad(tokens, key, axis=axis, **prune).reshape(y.shape)
