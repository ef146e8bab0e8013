"""Test process setup (8 CPU devices) and shared fixtures; float64 references are in
``_reference.py``."""

import os

# 8 CPU devices for the sharding tests: the flag must be set before jax starts.
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

import pytest  # noqa: E402


@pytest.fixture
def small_chunks(monkeypatch):
  """Forces the matmul's row chunking (full chunks + a ragged tail) at test sizes."""
  from sparsejax import fanin_matmul
  monkeypatch.setattr(fanin_matmul, "_CHUNK_ELEMENTS", 64)
