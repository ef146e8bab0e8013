"""``FixedFanIn``: a sparse linear layer stored as values + indices, never dense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from sparsejax import _checks
from sparsejax.fanin_matmul import fixed_fanin_matmul
from sparsejax.rewiring import draw_all_columns

__all__ = ["FixedFanIn", "check_fixed_fanin", "default_index_dtype", "random_topology"]


def default_index_dtype(in_features: int) -> jnp.dtype:
  """uint16 when every column id fits (in <= 65536), else int32."""
  return jnp.dtype(jnp.uint16) if in_features <= 2**16 else jnp.dtype(jnp.int32)


def _resolve_index_dtype(index_dtype, in_features: int) -> jnp.dtype:
  index_dtype = jnp.dtype(default_index_dtype(in_features) if index_dtype is None else index_dtype)
  if not jnp.issubdtype(index_dtype, jnp.integer):
    raise ValueError(f"index_dtype must be an integer dtype, got {index_dtype}")
  if in_features - 1 > jnp.iinfo(index_dtype).max:
    raise ValueError(
        f"index_dtype {index_dtype} cannot hold column ids up to {in_features - 1} "
        f"(in_features={in_features})")
  return index_dtype


def random_topology(in_features: int, out_features: int, fan_in: int, index_dtype=None, *,
                    key: jax.Array) -> jax.Array:
  """Draws ``fan_in`` distinct random input columns for every output row.

  Every row is an independent, uniformly random ``fan_in``-subset of
  ``range(in_features)``, drawn with work and memory proportional to
  ``out * fan_in`` (never ``out * in`` unless ``fan_in > in / 2``).

  Arguments:
    in_features, out_features, fan_in: sizes, ``1 <= fan_in <= in_features``.
    index_dtype: integer dtype of the result (default: ``default_index_dtype``).
    key: PRNG key; the same key gives the same bits. Row ``u`` depends only on
      ``key`` and ``u`` (``sparsejax.rewiring.draw_all_columns``): the first
      rows of a larger draw equal a smaller draw with the same key.

  Returns:
    ``(out_features, fan_in)`` indices; each row distinct and sorted ascending.
  """
  _checks.check_sizes(in_features, out_features, fan_in)
  index_dtype = _resolve_index_dtype(index_dtype, in_features)
  return draw_all_columns(in_features, out_features, fan_in, key=key).astype(index_dtype)


def _scatter_to_dense(indices, row_values, in_features: int) -> jax.Array:
  """(out, K) entries -> dense (in, out) with entry [indices[u, k], u] = row_values[u, k]."""
  out_features = indices.shape[0]
  rows = jnp.arange(out_features)[:, None]
  dense = jnp.zeros((in_features, out_features), row_values.dtype)
  return dense.at[indices.astype(jnp.int32), rows].set(row_values)


@jax.tree_util.register_pytree_with_keys_class
class FixedFanIn:
  """A linear map whose every output reads exactly ``K`` of the ``in`` inputs.

  ``layer(x)`` computes ``x @ W + bias`` where the (in, out) matrix ``W`` exists
  only as ``values`` and ``indices``:

    y[..., u] = sum_k x[..., indices[u, k]] * values[u, k] + bias[u]

  A pytree: ``values``, ``indices`` and ``bias`` are leaves, ``in_features`` is
  static metadata. Constructing it validates shapes and dtypes and, on
  concrete arrays, the index range, distinct indices within each row and
  finite values (``ValueError`` naming the offending row), the same checks as
  ``fixed_fanin_matmul``. JAX transformations rebuild it without
  re-validating; inside ``jit`` indices are trusted, so use
  :func:`check_fixed_fanin` under ``checkify`` where they may be corrupted.

  Attributes:
    values: ``(out, K)`` float weights.
    indices: ``(out, K)`` integer input columns.
    bias: ``(out,)`` or ``None``.
    in_features: the input size ``in`` (static).
  """

  def __init__(self, values, indices, bias=None, *, in_features: int):
    _checks.check_values_indices(values, indices)
    _checks.check_sizes(in_features, *jnp.shape(values))
    _resolve_index_dtype(_checks.dtype_of(indices), in_features)
    if bias is not None:
      _checks.check_bias(bias, jnp.shape(values)[0])
    # Value checks see the arrays as passed (they skip tracers), before asarray.
    _checks.check_topology(values, indices, in_features)
    self.values, self.indices = jnp.asarray(values), jnp.asarray(indices)
    self.bias = None if bias is None else jnp.asarray(bias)
    self.in_features = int(in_features)

  # -- pytree protocol: rebuilt without validation (leaves may be tracers or grads).
  # Named keys give leaf paths like ``layer/values``, the same as the NNX module's.
  def tree_flatten_with_keys(self):
    GetAttrKey = jax.tree_util.GetAttrKey
    children = ((GetAttrKey("values"), self.values), (GetAttrKey("indices"), self.indices),
                (GetAttrKey("bias"), self.bias))
    return children, self.in_features

  def tree_flatten(self):
    return (self.values, self.indices, self.bias), self.in_features

  @classmethod
  def tree_unflatten(cls, in_features, leaves):
    layer = object.__new__(cls)
    layer.values, layer.indices, layer.bias = leaves
    layer.in_features = in_features
    return layer

  @property
  def out_features(self) -> int:
    return self.values.shape[0]

  @property
  def fan_in(self) -> int:
    return self.values.shape[1]

  @property
  def density(self) -> float:
    """Fraction of the dense (in, out) matrix that is stored: K / in."""
    return self.fan_in / self.in_features

  @classmethod
  def init(cls, in_features: int, out_features: int, fan_in: int, *, key: jax.Array,
           dtype=jnp.float32, index_dtype=None, bias: bool = True) -> "FixedFanIn":
    """A layer with random topology and values ``U(-1/sqrt(K), 1/sqrt(K))``.

    Arguments:
      key: PRNG key; the same key gives the same layer, bit for bit.
      in_features, out_features: the dense shape ``(in, out)``.
      fan_in: ``K``, inputs per output, ``1 <= K <= in``.
      dtype: float dtype of ``values`` and ``bias``.
      index_dtype: integer dtype of ``indices``; default uint16 when
        ``in <= 65536``, else int32.
      bias: whether to add a zero-initialised bias of shape ``(out,)``.

    Returns:
      A ``FixedFanIn`` with ``values``/``indices`` of shape ``(out, K)``.
    """
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"dtype must be a floating-point dtype, got {jnp.dtype(dtype)}")
    _checks.check_key(key)
    topology_key, values_key = jax.random.split(key)
    indices = random_topology(in_features, out_features, fan_in, index_dtype, key=topology_key)
    bound = 1.0 / np.sqrt(fan_in)
    values = jax.random.uniform(values_key, (out_features, fan_in), dtype, -bound, bound)
    bias_array = jnp.zeros((out_features,), dtype) if bias else None
    return cls._unchecked(values, indices, bias_array, in_features)

  @classmethod
  def from_dense(cls, w, fan_in: int, *, bias=None, index_dtype=None) -> "FixedFanIn":
    """Keeps the ``fan_in`` largest ``|w|`` of every output column.

    Arguments:
      w: dense weights of shape ``(in, out)``, as in ``x @ w``.
      fan_in: ``K``, entries kept per output.
      bias: optional ``(out,)`` bias to carry over.
      index_dtype: integer dtype of ``indices`` (default as in ``init``).

    Returns:
      A ``FixedFanIn`` whose ``to_dense()`` is ``w`` with all but the top-K
      magnitudes of each column zeroed (ties keep the lower input index).
    """
    w = jnp.asarray(w)
    _checks.check_float(w, "w")
    if w.ndim != 2:
      raise ValueError(f"w must have shape (in, out), got {w.shape}")
    in_features, out_features = w.shape
    _checks.check_sizes(in_features, out_features, fan_in)
    _checks.check_finite(w, "w")
    index_dtype = _resolve_index_dtype(index_dtype, in_features)
    _, cols = lax.top_k(jnp.abs(w.T), fan_in)
    cols = jnp.sort(cols, axis=1)
    values = jnp.take_along_axis(w.T, cols, axis=1)
    return cls(values, cols.astype(index_dtype), bias, in_features=in_features)

  @classmethod
  def _unchecked(cls, values, indices, bias, in_features: int) -> "FixedFanIn":
    """Builds a layer from arrays known to be valid (skips the host-side checks)."""
    return cls.tree_unflatten(int(in_features), (values, indices, bias))

  def replace(self, **changes) -> "FixedFanIn":
    """A copy with some of ``values``, ``indices``, ``bias`` replaced (validated)."""
    fields = dict(values=self.values, indices=self.indices, bias=self.bias)
    unknown = set(changes) - set(fields)
    if unknown:
      raise ValueError(f"unknown FixedFanIn fields {sorted(unknown)}")
    fields.update(changes)
    return FixedFanIn(**fields, in_features=self.in_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(..., in) -> (..., out)``: the sparse product plus the bias."""
    if jnp.shape(x)[-1:] != (self.in_features,):
      raise ValueError(
          f"x must have shape (..., {self.in_features}), got {jnp.shape(x)}")
    y = fixed_fanin_matmul(x, self.values, self.indices)
    return y if self.bias is None else y + self.bias.astype(y.dtype)

  def to_dense(self) -> jax.Array:
    """The equivalent dense ``(in, out)`` weight matrix (for tests and small sizes)."""
    return _scatter_to_dense(self.indices, self.values, self.in_features)

  def to_mask(self) -> jax.Array:
    """The ``(in, out)`` boolean mask of stored entries (for tests and small sizes)."""
    return _scatter_to_dense(self.indices, jnp.ones(self.values.shape, bool), self.in_features)

  def check(self) -> None:
    """Same as ``check_fixed_fanin(self)``."""
    check_fixed_fanin(self)

  def __repr__(self) -> str:
    if not all(hasattr(leaf, "dtype") for leaf in (self.values, self.indices)):
      # A tree.map result (e.g. of shapes, or with indices stripped) holds other leaves.
      return f"FixedFanIn(in={self.in_features}, values={self.values!r}, " \
             f"indices={self.indices!r}, bias={self.bias!r})"
    return (f"FixedFanIn(in={self.in_features}, out={self.out_features}, K={self.fan_in}, "
            f"values={self.values.dtype}, indices={self.indices.dtype}, "
            f"bias={self.bias is not None})")


def check_fixed_fanin(layer: FixedFanIn) -> None:
  """Adds ``checkify`` checks: indices in range, distinct within each row, finite values.

  The checks that ``FixedFanIn(...)`` and ``fixed_fanin_matmul`` run on
  concrete arrays, for traced ones.

  Inside ``jit`` JAX cannot raise on data, and an out-of-range gather returns
  garbage rather than failing. Wrap the function that calls this with
  ``jax.experimental.checkify.checkify`` and call ``err.throw()``::

    def forward(layer, x):
      check_fixed_fanin(layer)
      return layer(x)

    err, y = checkify.checkify(jax.jit(forward))(layer, x)
    err.throw()  # raises JaxRuntimeError naming the first bad row

  Called eagerly (outside ``jit``) it raises at once.
  """
  out_of_range = ~jnp.all(_checks.in_range(layer.indices, layer.in_features), axis=1)
  checkify.check(
      ~jnp.any(out_of_range),
      f"FixedFanIn indices out of range [0, {layer.in_features}) in row {{row}}",
      row=jnp.argmax(out_of_range))
  repeated = _checks.repeats_per_row(layer.indices)
  checkify.check(
      ~jnp.any(repeated), "FixedFanIn row {row} repeats an input column",
      row=jnp.argmax(repeated))
  non_finite = ~jnp.all(jnp.isfinite(layer.values), axis=1)
  checkify.check(
      ~jnp.any(non_finite), "FixedFanIn values hold a NaN or inf in row {row}",
      row=jnp.argmax(non_finite))
