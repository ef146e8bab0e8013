"""Shared helpers for the test suite."""

import numpy as np
import pytest


def dense_reference(x, layer):
  """float64 numpy reference ``x @ to_dense() + bias``."""
  w = np.asarray(layer.to_dense(), np.float64)
  y = np.asarray(x, np.float64) @ w
  return y if layer.bias is None else y + np.asarray(layer.bias, np.float64)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture
def small_chunks(monkeypatch):
  """Forces the matmul's row chunking (full chunks + a ragged tail) at test sizes."""
  from sparsejax import fanin_matmul
  monkeypatch.setattr(fanin_matmul, "_CHUNK_ELEMENTS", 64)
