"""Shared helpers for the test suite."""

import os

# 8 CPU devices for the sharding tests: the flag must be set before jax starts.
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


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
