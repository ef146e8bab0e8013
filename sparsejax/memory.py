"""Memory accounting: what XLA plans for a compiled function, and the peaks a run reached."""

from __future__ import annotations

import resource
from collections.abc import Callable

import jax

__all__ = ["compiled_bytes", "compiled_memory", "peak_memory"]


def compiled_bytes(compiled) -> dict[str, int]:
  """The memory XLA planned for a compiled executable (``jax.jit(f).lower(...).compile()``).

  Returns:
    ``{"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
    "total_bytes"}``: ``temp_bytes`` is the executable's scratch memory
    (intermediates) and ``total_bytes = argument + output + temp - alias``
    (outputs that reuse donated argument buffers are counted once).
  """
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
  out = {"argument_bytes": int(stats.argument_size_in_bytes),
         "output_bytes": int(stats.output_size_in_bytes),
         "temp_bytes": int(stats.temp_size_in_bytes),
         "alias_bytes": int(stats.alias_size_in_bytes)}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out


def compiled_memory(fn: Callable, *args) -> dict[str, int]:
  """``compiled_bytes`` of ``jax.jit(fn)`` for ``args``, from compiling it only.

  Nothing runs: ``args`` may be arrays or ``jax.ShapeDtypeStruct``s. Static
  arguments go in through ``functools.partial``.
  """
  return compiled_bytes(jax.jit(fn).lower(*args).compile())


def peak_memory() -> dict[str, int]:
  """The process's peak resident memory and, where the backend reports it, the device's peak.

  Returns:
    ``{"max_rss_bytes": ...}``, plus ``"device_peak_bytes"`` for the first
    local device when it reports ``peak_bytes_in_use`` (GPUs do, CPUs do not).
  """
  report = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    report["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  return report
