"""Which implementation runs: the pure-XLA paths or the Pallas kernels.

Every op with a kernel (``fixed_fanin_matmul``, ``prune_grad``,
``prune_weight_grad``, ``pruned_linear``) takes ``impl``; ``None`` reads the
environment variable ``SPARSEJAX_KERNELS``, the one documented override.

An impl names where the code runs (``xla``, ``pallas`` compiled kernels, or
``interpret``: the kernels in Pallas interpret mode, any backend, for tests)
and, for the fixed fan-in matmul only, which algorithm: the gather path
(``"xla"``, ``"pallas"``, ``"interpret"``) or the label-tile path that builds
a dense tile per block of rows for the tensor cores (``"xla_tile"``,
``"pallas_tile"``, ``"interpret_tile"``). The N:M ops have no tile
algorithm and read only the backend part of a ``*_tile`` name.

``"auto"`` picks per backend and, for the fixed fan-in matmul, per shape, from
measurements (``fanin_choice``; the table and the runs behind it are in
BENCHMARKS.md, section "Fixed fan-in dispatch").
"""

from __future__ import annotations

import os

import jax

__all__ = ["FANIN_IMPLS", "IMPLS", "fanin_choice", "resolve_fanin_impl", "resolve_impl"]

IMPLS = ("auto", "xla", "pallas", "interpret")
FANIN_IMPLS = ("auto", "xla", "xla_tile", "pallas", "pallas_tile", "interpret", "interpret_tile")
_ENV = "SPARSEJAX_KERNELS"


def _requested(impl: str | None) -> str:
  impl = os.environ.get(_ENV, "auto") if impl is None else impl
  if impl not in FANIN_IMPLS:
    raise ValueError(f"impl (or ${_ENV}) must be one of {FANIN_IMPLS}, got {impl!r}")
  return impl


def resolve_impl(impl: str | None = None) -> str:
  """Which path an N:M op runs: ``"xla"``, ``"pallas"`` or ``"interpret"``.

  Arguments:
    impl: one of ``FANIN_IMPLS`` or ``None``, which reads ``$SPARSEJAX_KERNELS``
      (default ``"auto"``). ``"auto"`` picks the Pallas kernels on GPU and XLA
      elsewhere; a ``*_tile`` name means its backend part here.

  Returns:
    ``"xla"``, ``"pallas"`` or ``"interpret"``.
  """
  impl = _requested(impl)
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl.removesuffix("_tile")


def resolve_fanin_impl(impl: str | None = None, *, batch: int, in_features: int, out: int,
                       fan_in: int) -> str:
  """Which path ``fixed_fanin_matmul`` runs for a problem of this shape.

  Arguments:
    impl: one of ``FANIN_IMPLS`` or ``None`` (``$SPARSEJAX_KERNELS``, default
      ``"auto"``).
    batch, in_features, out, fan_in: the problem, ``(batch, in) x (in, out)``
      with ``fan_in`` non-zeros per output.

  Returns:
    One of ``FANIN_IMPLS`` other than ``"auto"``: ``fanin_choice`` for
    ``"auto"``, the argument itself otherwise.
  """
  impl = _requested(impl)
  if impl != "auto":
    return impl
  return fanin_choice(jax.default_backend(), batch=batch, in_features=in_features, out=out,
                      fan_in=fan_in)


def fanin_choice(backend: str, *, batch: int, in_features: int, out: int, fan_in: int) -> str:
  """The fastest correct fixed fan-in path measured on ``backend`` for this shape.

  The rules restate the measured tables in BENCHMARKS.md (sections "Fixed
  fan-in kernels", "Fixed fan-in dispatch"); only paths that run compiled on
  ``backend`` are ever chosen.

  - GPU (H200): the tile path in XLA, which beat both kernels at batch 256 for
    every (out, K) measured and at every batch for 65,536 outputs. The gather
    kernels only for small batches (<= 16) with K <= 64 over many outputs
    (>= 2^19), where a tile's matmuls are mostly bandwidth and the gathers
    move less. The fused tile kernels (``"pallas_tile"``) were slower than
    the XLA tile path at every size measured, so "auto" never picks them.
  - CPU (and any other backend): the tile path in XLA (BLAS) when the tile's
    matmuls do at most ``in / K`` = 8 times the gather's FLOPs and the batch
    is at least 16 (BLAS then runs them more than 8 times faster per FLOP); the
    gather path otherwise, batch 1 included.
  """
  if backend == "gpu":
    small = batch <= _GPU_GATHER_MAX_BATCH and fan_in <= 64 and out >= 1 << 19
    return "pallas" if small else "xla_tile"
  if batch >= 16 and in_features <= 8 * fan_in:
    return "xla_tile"
  return "xla"


# Up to this batch the GPU gather kernels can win (BENCHMARKS.md, "Fixed fan-in dispatch").
_GPU_GATHER_MAX_BATCH = 16
