"""Which implementation runs: the pure-XLA path or the Pallas kernels.

Every op with a kernel (``fixed_fanin_matmul``, ``prune_grad``,
``prune_weight_grad``, ``pruned_linear``) takes ``impl``; ``None`` reads the
environment variable ``SPARSEJAX_KERNELS``, the one documented override.
"""

from __future__ import annotations

import os

import jax

__all__ = ["IMPLS", "resolve_impl"]

IMPLS = ("auto", "xla", "pallas", "interpret")
_ENV = "SPARSEJAX_KERNELS"


def resolve_impl(impl: str | None = None) -> str:
  """Which path runs: ``"xla"``, ``"pallas"`` (compiled kernels) or ``"interpret"``.

  Arguments:
    impl: ``"auto"``, ``"xla"``, ``"pallas"``, ``"interpret"`` (the kernels in
      Pallas interpret mode, any backend, slow: for tests) or ``None``, which
      reads ``$SPARSEJAX_KERNELS`` (default ``"auto"``). ``"auto"`` picks the
      Pallas kernels on GPU and XLA elsewhere.

  Returns:
    ``"xla"``, ``"pallas"`` or ``"interpret"``.
  """
  impl = os.environ.get(_ENV, "auto") if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f"impl (or ${_ENV}) must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl
