"""Input validation shared by the layers and ops (README: "What the API guarantees").

Shape and dtype checks are static and always run. Checks that need values
(index range, repeated indices, NaN) run only on concrete arrays: eagerly, or
on constants closed over inside ``jit``. Traced values are unknown and trusted;
``sparsejax.check_fixed_fanin`` and ``sparsejax.xmc.check_label_ids`` check them
under ``jax.experimental.checkify`` with the predicates defined here. Each
value check reduces on the device first and goes to the host only to name the
offending entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
  """True when ``x`` is a tracer (inside jit/grad/vmap), so its values are unknown."""
  return isinstance(x, jax.core.Tracer)


def dtype_of(x):
  """The dtype of an array or array-like, without copying an array."""
  return x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype


def _holds(predicate, *arrays) -> bool:
  """Evaluates ``predicate(*arrays)`` now, also on constants captured while tracing."""
  with jax.ensure_compile_time_eval():
    return bool(predicate(*(jnp.asarray(a) for a in arrays)))


def check_key(key, name: str = "key") -> None:
  """Raises ``ValueError`` unless ``key`` is one PRNG key (static: works on tracers).

  Accepts a typed key (``jax.random.key(seed)``, shape ``()``) and a legacy raw
  ``uint32`` key (``jax.random.PRNGKey(seed)``, shape ``(2,)`` for threefry).
  A plain integer seed, a key array or any other array is refused.
  """
  dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  if dtype is None or shape is None:
    got = "None" if key is None else f"{type(key).__name__} {key!r}"[:80]
  elif jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if shape == ():
      return
    got = f"a key array of shape {shape}"
  elif dtype == jnp.uint32 and len(shape) == 1:
    return
  else:
    got = f"an array of dtype {dtype} and shape {shape}"
  raise ValueError(f"{name} must be a PRNG key from jax.random.key(seed) (a single key; a "
                   f"uint32 jax.random.PRNGKey works too), got {got}")


def check_float(x, name: str) -> None:
  if not jnp.issubdtype(dtype_of(x), jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {dtype_of(x)}")


def check_int(x, name: str) -> None:
  if not jnp.issubdtype(dtype_of(x), jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {dtype_of(x)}")


def check_values_indices(values, indices) -> None:
  """Static checks: float ``values`` and integer ``indices``, both of shape (out, K)."""
  check_float(values, "values")
  check_int(indices, "indices")
  if jnp.ndim(values) != 2:
    raise ValueError(f"values must have shape (out, K), got {jnp.shape(values)}")
  if jnp.shape(indices) != jnp.shape(values):
    raise ValueError(
        f"indices shape {jnp.shape(indices)} must equal values shape {jnp.shape(values)}")


def check_bias(bias, out_features: int) -> None:
  """A float ``(out_features,)`` bias with finite values (when concrete)."""
  check_float(bias, "bias")
  if jnp.shape(bias) != (out_features,):
    raise ValueError(f"bias must have shape ({out_features},), got {jnp.shape(bias)}")
  check_finite(bias, "bias")


def check_sizes(in_features: int, out_features: int, fan_in: int) -> None:
  """Positive integer sizes of a fixed fan-in layer with ``fan_in <= in_features``."""
  for name, size in (("in_features", in_features), ("out_features", out_features),
                     ("fan_in", fan_in)):
    if not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"{name} must be a positive integer, got {size!r}")
  if fan_in > in_features:
    raise ValueError(f"fan_in={fan_in} exceeds in_features={in_features}")


def check_fanin_operands(x, values, indices) -> None:
  """Static checks for ``fixed_fanin_matmul(x, values, indices)``."""
  check_float(x, "x")
  if jnp.ndim(x) < 1:
    raise ValueError("x must have shape (..., in), got a scalar")
  check_values_indices(values, indices)
  fan_in, in_features = jnp.shape(values)[1], jnp.shape(x)[-1]
  if fan_in > in_features:
    raise ValueError(f"fan-in K={fan_in} exceeds the input size in={in_features}")


def in_range(indices, size: int):
  """Elementwise ``0 <= indices < size``, exact for every integer dtype (``size`` may not fit it)."""
  top = min(int(size) - 1, int(jnp.iinfo(indices.dtype).max))
  return (indices >= 0) & (indices <= top)


def check_index_range(indices, size: int, name: str, *, size_name: str = "in_features",
                      mask=None) -> None:
  """Raises ``ValueError`` naming the first entry outside ``[0, size)`` (concrete only).

  Arguments:
    indices: ``(rows, K)`` integer array.
    size: the exclusive upper bound, called ``size_name`` in the message.
    name: the argument's name, for the message.
    mask: optional bool array of ``indices``' shape; only entries where it
      holds are checked (padding may hold any id).
  """
  def all_valid(i, *m):
    ok = in_range(i, size)
    return jnp.all((ok | ~m[0]) if m else ok)

  held = (indices,) if mask is None else (indices, mask)
  if any(is_traced(a) for a in held) or _holds(all_valid, *held):
    return
  host = np.asarray(indices).astype(np.int64)
  bad = (host < 0) | (host >= size)
  row, slot = np.argwhere(bad if mask is None else bad & np.asarray(mask))[0]
  raise ValueError(
      f"{name}[{row}, {slot}] = {host[row, slot]} is out of range for "
      f"{size_name}={size} (row {row})")


def repeats_per_row(indices):
  """``(rows,)`` bool: whether each row of ``(rows, K)`` ``indices`` repeats an entry."""
  ordered = jnp.sort(indices, axis=1)
  return jnp.any(ordered[:, 1:] == ordered[:, :-1], axis=1)


def check_distinct_rows(indices, name: str) -> None:
  """Raises ``ValueError`` naming the first row that repeats an index (concrete only)."""
  if is_traced(indices) or not _holds(lambda i: jnp.any(repeats_per_row(i)), indices):
    return
  with jax.ensure_compile_time_eval():
    row = int(jnp.argmax(repeats_per_row(jnp.asarray(indices))))
  values, counts = np.unique(np.asarray(indices)[row], return_counts=True)
  raise ValueError(
      f"{name} row {row} repeats column(s) {values[counts > 1].tolist()}; "
      "the indices within a row must be distinct")


def check_finite(x, name: str) -> None:
  """Raises ``ValueError`` naming the first NaN or infinity in ``x`` (concrete only)."""
  if is_traced(x) or _holds(lambda a: jnp.all(jnp.isfinite(a)), x):
    return
  host = np.asarray(x, dtype=np.float32)
  where = tuple(int(i) for i in np.argwhere(~np.isfinite(host))[0])
  raise ValueError(f"{name} holds a non-finite value {host[where]} at index {where}")


def check_topology(values, indices, in_features: int) -> None:
  """The value checks of a fixed fan-in layer, each on a concrete array only.

  Every index in ``[0, in_features)``, no column repeated within a row, and
  finite ``values``: ``ValueError`` naming the first offending row or entry.
  ``FixedFanIn(...)`` and ``fixed_fanin_matmul`` both run exactly these;
  ``sparsejax.check_fixed_fanin`` is their ``checkify`` form for traced arrays.
  """
  check_index_range(indices, in_features, "indices")
  check_distinct_rows(indices, "indices")
  check_finite(values, "values")
