"""``MaskedDense``: a dense weight times a static 0/1 mask.

The reference for low sparsity and for SμPar comparisons: memory is that of a
dense layer, but the maths is the same as ``FixedFanIn`` with the same
topology (``MaskedDense.from_fixed_fanin``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax import _checks
from sparsejax.fixed_fanin import FixedFanIn

__all__ = ["MaskedDense"]


@jax.tree_util.register_pytree_with_keys_class
class MaskedDense:
  """``y = x @ (weight * mask) + bias`` with a fixed boolean ``mask``.

  The gradient of ``weight`` is zero wherever ``mask`` is False, so masked
  entries stay at their initial value (zero from ``init``) under any optimizer
  without weight decay. A pytree with leaves ``weight``, ``mask``, ``bias``.

  Attributes:
    weight: ``(in, out)`` float weights.
    mask: ``(in, out)`` bool, True where a weight is used.
    bias: ``(out,)`` or ``None``.
  """

  def __init__(self, weight, mask, bias=None):
    weight, mask = jnp.asarray(weight), jnp.asarray(mask)
    _checks.check_float(weight, "weight")
    if weight.ndim != 2:
      raise ValueError(f"weight must have shape (in, out), got {weight.shape}")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
    if mask.shape != weight.shape:
      raise ValueError(f"mask shape {mask.shape} must equal weight shape {weight.shape}")
    if bias is not None:
      _checks.check_bias(bias, weight.shape[1])
    _checks.check_finite(weight, "weight")
    self.weight, self.mask = weight, mask
    self.bias = None if bias is None else jnp.asarray(bias)

  def tree_flatten_with_keys(self):
    GetAttrKey = jax.tree_util.GetAttrKey
    return ((GetAttrKey("weight"), self.weight), (GetAttrKey("mask"), self.mask),
            (GetAttrKey("bias"), self.bias)), None

  def tree_flatten(self):
    return (self.weight, self.mask, self.bias), None

  @classmethod
  def tree_unflatten(cls, _, leaves):
    layer = object.__new__(cls)
    layer.weight, layer.mask, layer.bias = leaves
    return layer

  @property
  def density(self) -> jax.Array:
    """Fraction of entries the mask keeps."""
    return jnp.mean(self.mask)

  @property
  def in_features(self) -> int:
    """Inputs ``in``: the weight's rows."""
    return self.weight.shape[0]

  @property
  def out_features(self) -> int:
    """Outputs ``out``: the weight's columns."""
    return self.weight.shape[1]

  @classmethod
  def init(cls, in_features: int, out_features: int, fan_in: int, *, key: jax.Array,
           dtype=jnp.float32, bias: bool = True) -> "MaskedDense":
    """A random mask with ``fan_in`` inputs per output, as ``FixedFanIn.init``.

    The same key gives exactly the topology and values of
    ``FixedFanIn.init(in_features, out_features, fan_in, key=key, dtype=dtype)``.

    Returns:
      A ``MaskedDense`` with ``weight``/``mask`` of shape ``(in, out)``.
    """
    layer = FixedFanIn.init(in_features, out_features, fan_in, key=key, dtype=dtype, bias=bias)
    return cls.from_fixed_fanin(layer)

  @classmethod
  def from_fixed_fanin(cls, layer: FixedFanIn) -> "MaskedDense":
    """The dense-plus-mask equivalent of a ``FixedFanIn`` layer."""
    return cls.tree_unflatten(None, (layer.to_dense(), layer.to_mask(), layer.bias))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(..., in) -> (..., out)``."""
    if jnp.shape(x)[-1:] != (self.in_features,):
      raise ValueError(f"x must have shape (..., {self.in_features}), got {jnp.shape(x)}")
    y = x @ self.masked_weight()
    return y if self.bias is None else y + self.bias.astype(y.dtype)

  def masked_weight(self) -> jax.Array:
    """``weight`` with the masked entries zeroed, ``(in, out)``."""
    return jnp.where(self.mask, self.weight, jnp.zeros((), self.weight.dtype))

  def __repr__(self) -> str:
    return (f"MaskedDense(in={self.in_features}, out={self.out_features}, "
            f"weight={self.weight.dtype}, bias={self.bias is not None})")
