"""What the benchmark scripts share: their sections of BENCHMARKS.md, the CPU's name, and
the timing, copy-bandwidth and matmul-rate measurements.

Imported as ``benchmarks._report`` (tests, or the repository root on the path) or
as ``_report`` (a script run as ``python benchmarks/<script>.py``, whose folder
is then on the path).
"""

from __future__ import annotations

import pathlib
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp


def markers(name: str) -> tuple[str, str]:
  """The start and end markers of section ``name`` of BENCHMARKS.md."""
  return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: pathlib.Path, section: str, *, name: str) -> None:
  """Replaces section ``name`` of ``path`` with ``section``, appending it if absent.

  Other scripts own other sections of the same file, so everything outside the
  markers is kept. A missing file starts with a ``# Benchmarks`` title.
  """
  start, end = markers(name)
  block = f"{start}\n{section.rstrip(chr(10))}\n{end}\n"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: block, text, count=1)  # a function: no escape processing
  else:
    text = text.rstrip("\n") + "\n\n" + block
  path.write_text(text)


def cpu_name() -> str:
  """The CPU model: ``platform.processor()`` is often empty or just "x86_64" on Linux."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def time_median(fn, inputs, repeats: int, burst: int = 1) -> float:
  """Median seconds of ``fn(*inputs[i % len(inputs)])`` after one warm-up per input set.

  With ``burst > 1`` each sample queues ``burst`` calls (cycling through the input
  sets) before waiting and divides by ``burst``, so that the host's dispatch and
  wait latency, tens of microseconds, is not timed: needed for ops of ~0.1 ms.
  """
  if burst < 1 or repeats < 1:
    raise ValueError(f"need burst >= 1 and repeats >= 1, got burst={burst}, repeats={repeats}")
  for args in inputs:
    jax.block_until_ready(fn(*args))
  seconds = []
  for i in range(repeats):
    calls = [inputs[(i + j) % len(inputs)] for j in range(burst)]
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for args in calls])
    seconds.append((time.perf_counter() - start) / burst)
  return statistics.median(seconds)


def copy_bandwidth(repeats: int) -> float:
  """Device-to-device copy GB/s (bytes read + written) of a 1 GiB (CPU: 256 MiB) buffer."""
  size = (1 << 28 if jax.default_backend() != "cpu" else 1 << 26)
  buffers = [jax.random.normal(jax.random.key(i), (size,), jnp.float32) for i in range(2)]
  copy = jax.jit(lambda a: a + 0.0)  # one read, one write
  seconds = time_median(copy, [(b,) for b in buffers], repeats)
  return 2 * size * 4 / seconds / 1e9


def matmul_rate(size: int, repeats: int, burst: int = 5) -> float:
  """bf16 FLOP/s of a ``size``^3 matmul on random data: the median over ``repeats`` bursts.

  A burst queues ``burst`` matmuls before waiting, so the dispatch latency is not timed.
  """
  a, b = (jax.random.normal(jax.random.key(i), (size, size), jnp.bfloat16) for i in (1, 2))
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, b))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready([matmul(a, b) for _ in range(burst)])
    seconds.append((time.perf_counter() - start) / burst)
  return 2 * size**3 / statistics.median(seconds)
