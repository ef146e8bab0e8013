"""Measures the fixed fan-in paths side by side per shape; the table behind ``impl="auto"``.

For each (batch, in, out, K) of a grid, one jitted fwd+bwd (y, dx, dvalues of
loss ``0.5 |y|^2``) of every path that runs compiled on this backend: the
gather path (``xla``) and the tile path (``xla_tile``) everywhere, plus the
gather kernels (``pallas``) and the fused tile kernels (``pallas_tile``) on a
GPU. Each path is checked against a float64 reference first, then timed in
interleaved rounds (A B A B ...), so that a noisy shared machine slows every
path alike; the table gives each median, the fastest path, and what
``sparsejax.dispatch.fanin_choice`` picks for that shape, so a disagreement
shows. ``--csv`` writes every measurement for later analysis.

The table goes to stdout and to the ``fanin_dispatch`` section of BENCHMARKS.md.

  python benchmarks/fanin_dispatch.py                     # the default grid for this backend
  python benchmarks/fanin_dispatch.py --batches 128 --ins 128 --outs 4096 --fan_ins 32
"""

from __future__ import annotations

import functools
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

try:
  from benchmarks import _report
except ImportError:  # run as `python benchmarks/<script>.py`: this folder is on the path
  import _report
import sparsejax as sj
from sparsejax.dispatch import fanin_choice

def write_section(path, section):
  """The section of this backend: CPU and GPU tables are kept apart."""
  _report.write_section(path, section, name=f"fanin_dispatch_{jax.default_backend()}")


def paths_for(backend: str) -> list[str]:
  """The fixed fan-in paths that run compiled on ``backend``."""
  return ["xla", "xla_tile"] + (["pallas", "pallas_tile"] if backend == "gpu" else [])


def _step(impl: str):
  def loss(x, values, indices):
    y = sj.fixed_fanin_matmul(x, values, indices, impl=impl)
    return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _check(dx, dvalues, x, values, indices, tolerance: float) -> float:
  """Relative error of ``(dx, dvalues)`` against float64 through the dense matrix."""
  x64 = np.asarray(x, np.float64)
  idx = np.asarray(indices).astype(np.int64)
  rows = np.arange(idx.shape[0])[:, None]
  w = np.zeros((x.shape[1], idx.shape[0]))
  np.add.at(w, (idx, rows), np.asarray(values, np.float64))
  y = x64 @ w
  want_dx, want_dv = y @ w.T, (x64.T @ y)[idx, rows]
  err = max(np.linalg.norm(np.asarray(dx, np.float64) - want_dx) / np.linalg.norm(want_dx),
            np.linalg.norm(np.asarray(dvalues, np.float64) - want_dv) / np.linalg.norm(want_dv))
  if not np.isfinite(err) or err > tolerance:
    raise AssertionError(f"check failed: relative error {err:.2e}")
  return err


def measure(batch: int, in_features: int, out: int, fan_in: int, dtype, paths, rounds: int):
  """``{path: median seconds or error string}`` for one shape, paths timed interleaved."""
  layer = sj.FixedFanIn.init(in_features, out, fan_in, key=jax.random.key(out + fan_in))
  values = layer.values.astype(dtype)
  x = jax.random.normal(jax.random.key(batch), (batch, in_features), dtype)
  steps, seconds = {}, {}
  tolerance = 1e-4 if dtype == jnp.float32 else 2e-2
  for path in paths:
    try:
      step = _step(path)
      dx, dvalues = jax.block_until_ready(step(x, values, layer.indices))
      check_rows = min(out, 4096)  # the float64 reference on a slice of the rows
      if check_rows == out:
        _check(dx, dvalues, x, values, layer.indices, tolerance)
      else:
        sub = step(x, values[:check_rows], layer.indices[:check_rows])
        _check(*sub, x, values[:check_rows], layer.indices[:check_rows], tolerance)
      steps[path], seconds[path] = step, []
    except Exception as error:  # a path that fails here is a table entry, not a crash
      seconds[path] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
  for _ in range(rounds):
    for path, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(x, values, layer.indices))
      seconds[path].append(time.perf_counter() - start)
  return {path: statistics.median(s) if isinstance(s, list) else s for path, s in seconds.items()}


def render(rows, paths, command: str) -> str:
  backend = jax.default_backend()
  device = jax.devices()[0]
  machine = (f"{device.device_kind} ({backend})" if backend != "cpu" else
             f"{_report.cpu_name()}, {len(jax.devices())} JAX CPU device(s)")
  lines = ["## Fixed fan-in dispatch: which path is fastest per shape", "",
           f"- Command: `{command}`",
           f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
           f"- Machine: {machine}; {platform.platform()}",
           f"- Versions: Python {platform.python_version()}, jax {jax.__version__}",
           "- One jitted fwd+bwd (y, dx, dvalues; loss 0.5 |y|^2), each path checked "
           "against float64 first, then timed in interleaved rounds; ms are medians. "
           "`auto` is what `sparsejax.dispatch.fanin_choice` picks for the shape.", "",
           "| batch | in | out | K | dtype | " + " | ".join(f"{p} ms" for p in paths)
           + " | fastest | auto | auto / fastest |",
           "|---:|---:|---:|---:|---|" + "---:|" * len(paths) + "---|---|---:|"]
  for (batch, in_features, out, fan_in, dtype), result in rows:
    timed = {p: s for p, s in result.items() if isinstance(s, float)}
    best = min(timed, key=timed.get) if timed else "-"
    auto = fanin_choice(backend, batch=batch, in_features=in_features, out=out, fan_in=fan_in)
    cells = [f"{result[p] * 1e3:,.2f}" if isinstance(result.get(p), float)
             else str(result.get(p, "-")).replace("|", "/") for p in paths]
    ratio = (f"{timed[auto] / timed[best]:.2f}" if auto in timed and best in timed else "-")
    lines.append(f"| {batch} | {in_features} | {out:,} | {fan_in} | {jnp.dtype(dtype).name} | "
                 + " | ".join(cells) + f" | {best} | {auto} | {ratio} |")
  return "\n".join(lines)


def define_flags():
  flags.DEFINE_list("batches", None, "batch sizes (default: per backend)")
  flags.DEFINE_list("ins", ["128", "768"], "input sizes")
  flags.DEFINE_list("outs", None, "output sizes (default: per backend)")
  flags.DEFINE_list("fan_ins", ["8", "32", "64", "128"], "fan-ins K (those <= in)")
  flags.DEFINE_list("dtypes", None, "float32 and/or bfloat16 (default: per backend)")
  flags.DEFINE_list("paths", None, "paths to time (default: all that run on this backend)")
  flags.DEFINE_integer("rounds", 5, "interleaved timing rounds (median)")
  flags.DEFINE_string("csv", "", "also write every measurement here")
  flags.DEFINE_string("output", str(pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
                      "file whose fanin_dispatch section is rewritten ('' to skip)")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  gpu = jax.default_backend() == "gpu"
  batches = [int(b) for b in FLAGS.batches or (["1", "16", "64", "256"] if gpu
                                                 else ["1", "32", "128", "256"])]
  outs = [int(o) for o in FLAGS.outs or (["65536", "670091"] if gpu else ["4096", "32768"])]
  dtypes = [jnp.dtype(d) for d in FLAGS.dtypes or (["bfloat16", "float32"] if gpu
                                                     else ["float32"])]
  paths = FLAGS.paths or paths_for(jax.default_backend())
  rows, csv_lines = [], ["backend,batch,in,out,K,dtype,path,ms"]
  for in_features in (int(i) for i in FLAGS.ins):
    for fan_in in (int(k) for k in FLAGS.fan_ins if int(k) <= in_features):
      for batch in batches:
        for out in outs:
          for dtype in dtypes:
            shape = (batch, in_features, out, fan_in, dtype)
            result = measure(*shape, paths, FLAGS.rounds)
            rows.append((shape, result))
            print(f"{shape[:4]} {dtype.name}: " + ", ".join(
                f"{p} {s * 1e3:.2f} ms" if isinstance(s, float) else f"{p} {s}"
                for p, s in result.items()), file=sys.stderr, flush=True)
            csv_lines += [f"{jax.default_backend()},{batch},{in_features},{out},{fan_in},"
                          f"{dtype.name},{p},{s * 1e3 if isinstance(s, float) else ''}"
                          for p, s in result.items()]
  section = render(rows, paths, "python benchmarks/fanin_dispatch.py " + " ".join(sys.argv[1:]))
  print(section)
  if FLAGS.csv:
    pathlib.Path(FLAGS.csv).write_text("\n".join(csv_lines) + "\n")
  if FLAGS.output:
    write_section(pathlib.Path(FLAGS.output), section)


if __name__ == "__main__":
  define_flags()
  app.run(main)
