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

from sparsejax import _checks, _tree
from sparsejax.fixed_fanin import FixedFanIn
from sparsejax.mvue.modules import PrunedGrad
from sparsejax.masked import MaskedDense

__all__ = ["Indices", "Mask", "EmbeddingBag", "FixedFanInLinear", "MaskedLinear", "PrunedGrad",
           "fixed_fanin_sizes"]


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
    layer = FixedFanIn.init(in_features, out_features, fan_in, key=rngs.params(), dtype=dtype,
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
    layer = MaskedDense.init(in_features, out_features, fan_in, key=rngs.params(), dtype=dtype,
                             bias=use_bias)
    self.in_features, self.out_features, self.fan_in = in_features, out_features, fan_in
    self.weight = nnx.Param(layer.weight)
    self.mask = Mask(layer.mask)
    self.bias = _param_or_none(layer.bias)

  def as_masked_dense(self) -> MaskedDense:
    """The current state as a functional ``sparsejax.MaskedDense`` pytree."""
    return MaskedDense.tree_unflatten(
        None, (self.weight[...], self.mask[...], _value_or_none(self.bias)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(..., in) -> (..., out)``."""
    return self.as_masked_dense()(x)


def fixed_fanin_sizes(model: nnx.Module) -> dict[str, int]:
  """``{name: in_features}`` of every ``FixedFanInLinear`` in ``model``.

  Names are state paths joined by ``/`` (``"encoder/layers/0"``), as used by
  ``sparsejax.set_topology(..., in_features=...)``, which needs the input size
  that the NNX state's arrays do not record.
  """
  return {_tree.path_name(path): node.in_features
          for path, node in nnx.iter_graph(model) if isinstance(node, FixedFanInLinear)}


# nnx.Embed's default: normal with variance 1 / features.
_EMBED_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


class EmbeddingBag(nnx.Module):
  """Weighted sum of embedding rows: a linear layer over sparse inputs.

  Each input is a bag of ``F`` (id, weight) pairs, padded: the output is
  ``sum_f mask[f] * weights[f] * embedding[ids[f]]``, that is ``x @ embedding``
  for the sparse row ``x`` with ``x[ids[f]] = weights[f]``. A sum, not a mean,
  so that it is exactly that linear map: normalise the weights (e.g. L2 tf-idf)
  for a mean-like scale. Work and memory scale with ``F``, not with
  ``num_embeddings``; the gradient of the table is a scatter-add.

  Arguments:
    num_embeddings: size of the vocabulary (the sparse input dimension).
    features: embedding size ``d``.
    dtype: float dtype of the table.
    embedding_init: initializer of the ``(num_embeddings, d)`` table (default
      as ``nnx.Embed``: normal with variance ``1 / d``).
    rngs: draws the table from ``rngs.params()``.

  Attributes:
    embedding: ``nnx.Param`` of shape ``(num_embeddings, features)``.
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32,
               embedding_init=_EMBED_INIT, rngs: nnx.Rngs):
    self.num_embeddings, self.features = num_embeddings, features
    self.embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features), dtype))

  def __call__(self, ids: jax.Array, weights: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """``(..., F)`` ids, weights and mask -> ``(..., features)``.

    Arguments:
      ids: integer ids in ``[0, num_embeddings)`` where ``mask`` holds (padding
        may hold any id). Checked when concrete, trusted under ``jit``.
      weights: float weights of the ids, or None for all ones.
      mask: bool, True for real entries, or None for all real.
    """
    _checks.check_int(ids, "ids")
    if jnp.ndim(ids) < 1:
      raise ValueError("ids must have shape (..., F), got a scalar")
    for name, array in (("weights", weights), ("mask", mask)):
      if array is not None and jnp.shape(array) != jnp.shape(ids):
        raise ValueError(f"{name} must have the shape of ids {jnp.shape(ids)}, "
                         f"got {jnp.shape(array)}")
    if weights is not None:
      _checks.check_float(weights, "weights")
    if mask is not None and _checks.dtype_of(mask) != jnp.bool_:
      raise ValueError(f"mask must be a bool array, got dtype {_checks.dtype_of(mask)}")
    rows = lambda a: None if a is None else jnp.reshape(a, (-1, jnp.shape(ids)[-1]))
    _checks.check_index_range(rows(ids), self.num_embeddings, "ids",
                              size_name="num_embeddings", mask=rows(mask))
    table = self.embedding[...]
    scale = jnp.ones(jnp.shape(ids), table.dtype) if weights is None else weights
    if mask is not None:
      scale = jnp.where(mask, scale, 0)
    # "clip" keeps padded ids harmless: their rows are read and weighted by 0.
    rows = jnp.take(table, ids, axis=0, mode="clip")  # (..., F, d)
    return jnp.einsum("...f,...fd->...d", scale.astype(table.dtype), rows)
