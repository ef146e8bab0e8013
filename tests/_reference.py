"""float64 references that several test modules check against (one home for each)."""

import numpy as np


def rel_err(a, b):
  """``|a - b| / |b|`` in float64 (Frobenius norms)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def finite_rel_err(a, b):
  """``rel_err`` of a kernel's output, which must be finite (interpret mode poisons what
  a kernel does not write with NaN)."""
  a = np.asarray(a, np.float64)
  assert np.isfinite(a).all(), "non-finite output: an element was not written (or overflow)"
  return rel_err(a, b)


def dense_reference(x, layer):
  """``x @ layer.to_dense() + bias`` in float64 numpy."""
  w = np.asarray(layer.to_dense(), np.float64)
  y = np.asarray(x, np.float64) @ w
  return y if layer.bias is None else y + np.asarray(layer.bias, np.float64)


def fanin_reference(x, values, indices, g):
  """A fixed fan-in layer's ``(y, dvalues, dx)`` in float64, through the dense (in, out) matrix.

  ``x`` ``(B, in)``, ``values`` and ``indices`` ``(out, K)``, ``g`` ``(B, out)``
  the output's cotangent. A column repeated in a row counts twice.
  """
  x, values, g = (np.asarray(a, np.float64) for a in (x, values, g))
  idx = np.asarray(indices).astype(np.int64)
  rows = np.arange(values.shape[0])[:, None]
  w = np.zeros((x.shape[1], values.shape[0]))
  np.add.at(w, (idx, rows), values)
  return x @ w, (x.T @ g)[idx, rows], g @ w.T


def mvue_probabilities(x, n):
  """Inclusion probabilities of the MVUE for one group ``x`` (1:2 for n = 1, 2:4 for n = 2)."""
  a = np.abs(x)
  total = a.sum()
  if total == 0:
    return np.zeros_like(a)
  if n == 1:
    return a / total
  p = 2 * a / total
  if p.max() > 1:
    i = int(np.argmax(a))
    rest = np.delete(a, i).sum()  # not total - a[i], which cancels
    p = a / rest if rest > 0 else np.zeros_like(a)
    p[i] = 1.0
  return p


def approx_probabilities(x):
  """Inclusion probabilities of drawing 2 of 4 without replacement with p ~ |x|."""
  a = np.abs(x)
  t = a / a.sum()
  rest = np.array([np.delete(a, j).sum() for j in range(len(a))])
  ratio = np.where(rest > 0, t / np.where(rest > 0, rest, 1), 0)
  return t + a * (ratio.sum() - ratio)


def z_scores(x, samples, p):
  """``|mean - x|`` in units of the exact standard error, ``var = x^2 (1/p - 1)`` per draw."""
  variance = np.where(p > 0, x**2 * (1 / np.where(p > 0, p, 1) - 1), 0.0)
  diff = samples.mean(0) - x
  se = np.sqrt(variance / len(samples))
  return np.where(se > 0, np.abs(diff) / np.where(se > 0, se, 1), np.where(diff == 0, 0, np.inf))
