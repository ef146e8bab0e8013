"""Times variants of the XLA label-tile path side by side, and its pieces: where the time goes.

For batch 256 and in 768 (flags), each (out, K) and bfloat16 activations, one
jitted fwd+bwd (y, dx, dvalues; loss 0.5 |y|^2) of:

* ``dense``: ``x @ W`` with a dense bf16 (in, out) weight (the ratio's base);
* ``tile 2^N``: ``fixed_fanin_matmul(impl="xla_tile")`` with tiles of 2^N
  elements (``sparsejax.fanin_matmul._TILE_ELEMENTS``, the library default and
  others);
* ``tile set``: the tile built with an unchecked ``.set(unique_indices=True)``
  scatter instead of the library's ``.add`` (what exact duplicate-free rows
  would allow);
* ``tile bf16 G``: the dense gradient tile ``x^T g`` written in bfloat16
  instead of float32 before dvalues are gathered from it;

and, per tile of ``C`` rows, the pieces alone: building the tile, ``x @ tile``,
``g @ tile^T``, ``x^T g`` and the gather of dvalues from it. Each variant is
checked against float64 on a slice of rows, then the variants are timed in
interleaved rounds (medians). FLOP floor = 6 B in out at the bf16 matmul rate
measured in the same run.

  python benchmarks/tile_variants.py --output ''
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
from jax import lax

try:
  from benchmarks import _report
except ImportError:  # run as `python benchmarks/<script>.py`: this folder is on the path
  import _report
import sparsejax as sj
from sparsejax import fanin_matmul

write_section = functools.partial(_report.write_section, name="tile_variants")


def _set_tile(values, indices, in_features, dtype):
  rows = lax.broadcasted_iota(jnp.int32, indices.shape, 0)
  return jnp.zeros((in_features, values.shape[0]), dtype).at[
      indices.astype(jnp.int32), rows].set(values.astype(dtype), unique_indices=True,
                                           mode="promise_in_bounds")


def _bf16_grads(x, g, tile, idx, values_dtype, acc):
  g = g.astype(tile.dtype)
  dx = jnp.dot(g, tile.T, preferred_element_type=acc)
  dense = jnp.dot(x.T, g, preferred_element_type=jnp.bfloat16)
  return dx, fanin_matmul._gather_tile(dense, idx).astype(values_dtype)


def _variant(name: str, log2_elements: int):
  """A context for one variant: patches the tile path's module globals while tracing."""
  patches = {"_TILE_ELEMENTS": 1 << log2_elements}
  if name == "set":
    patches["build_tile"] = _set_tile
  elif name == "bf16 G":
    patches["_tile_grads"] = _bf16_grads
  return patches


def _sparse_step(patches):
  def loss(x, values, indices):
    y = sj.fixed_fanin_matmul(x, values, indices, impl="xla_tile")
    return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))

  saved = {k: getattr(fanin_matmul, k) for k in patches}
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))

  def run(*args):
    for k, v in patches.items():
      setattr(fanin_matmul, k, v)
    try:
      return step(*args)
    finally:
      for k, v in saved.items():
        setattr(fanin_matmul, k, v)

  return run


def _dense_step():
  def loss(x, w):
    return 0.5 * jnp.sum(jnp.square((x @ w).astype(jnp.float32)))

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _check(dx, dvalues, x, values, indices, rows: int) -> float:
  """Relative error against float64 on the first ``rows`` outputs (their own sub-problem)."""
  x64 = np.asarray(x, np.float64)
  idx = np.asarray(indices[:rows]).astype(np.int64)
  r = np.arange(rows)[:, None]
  w = np.zeros((x.shape[1], rows))
  np.add.at(w, (idx, r), np.asarray(values[:rows], np.float64))
  y = x64 @ w
  want_dx, want_dv = y @ w.T, (x64.T @ y)[idx, r]
  err = max(np.linalg.norm(np.asarray(dx, np.float64) - want_dx) / np.linalg.norm(want_dx),
            np.linalg.norm(np.asarray(dvalues, np.float64) - want_dv) / np.linalg.norm(want_dv))
  if not np.isfinite(err) or err > 2e-2:
    raise AssertionError(f"check failed: relative error {err:.2e}")
  return err


def _timed(fns: dict, rounds: int) -> dict:
  """Median seconds of each ``fn()``, the functions interleaved round by round."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  seconds = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in seconds.items()}


def matmul_rate(rounds: int) -> float:
  """bf16 matmul TFLOP/s on random data: an 8192^3 product (2048^3 on CPU)."""
  n = 8192 if jax.default_backend() != "cpu" else 2048
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2))
  mm = jax.jit(lambda a, b: a @ b)
  return 2 * n**3 / _timed({"mm": lambda: mm(a, b)}, rounds)["mm"] / 1e12


def run_case(out: int, fan_in: int, batch: int, in_features: int, log2s, rounds: int):
  layer = sj.FixedFanIn.init(in_features, out, fan_in, key=jax.random.key(out + fan_in))
  values, indices = layer.values, layer.indices
  x = jax.random.normal(jax.random.key(batch), (batch, in_features), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(3), (in_features, out), jnp.bfloat16)
  variants = {f"tile 2^{n}": _variant("", n) for n in log2s}
  variants["tile set"] = _variant("set", log2s[-1])
  variants["tile bf16 G"] = _variant("bf16 G", log2s[-1])
  fns, notes = {}, {}
  dense = _dense_step()
  fns["dense"] = lambda: dense(x, w)
  for name, patches in variants.items():
    step = _sparse_step(patches)
    try:
      rows = min(out, 8192)
      notes[name] = f"err {_check(*step(x, values[:rows], indices[:rows]), x, values, indices, rows):.1e}"
      fns[name] = functools.partial(step, x, values, indices)
    except Exception as error:  # a variant that fails is reported, the others go on
      notes[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
  result = _timed(fns, rounds)
  # The pieces, per tile of C rows (the library's tile size).
  c = fanin_matmul.tile_rows(in_features, out)
  idx, v = indices[:c], values[:c]
  g = jax.random.normal(jax.random.key(4), (batch, c), jnp.bfloat16)
  tile = fanin_matmul.build_tile(v, idx, in_features, jnp.bfloat16)
  dense_g = jnp.dot(x.T, g, preferred_element_type=jnp.float32)
  build = jax.jit(lambda v, i: fanin_matmul.build_tile(v, i, in_features, jnp.bfloat16))
  fwd = jax.jit(lambda x, t: jnp.dot(x, t, preferred_element_type=jnp.float32))
  dx = jax.jit(lambda g, t: jnp.dot(g, t.T, preferred_element_type=jnp.float32))
  dg = jax.jit(lambda x, g: jnp.dot(x.T, g, preferred_element_type=jnp.float32))
  gather = jax.jit(fanin_matmul._gather_tile)
  pieces = _timed({"build": lambda: build(v, idx), "x @ tile": lambda: fwd(x, tile),
                   "g @ tile^T": lambda: dx(g, tile), "x^T g": lambda: dg(x, g),
                   "gather": lambda: gather(dense_g, idx)}, rounds)
  return result, notes, c, pieces


def render(cases, rate: float, command: str) -> str:
  device = jax.devices()[0]
  lines = ["## Tile path variants and pieces (fwd+bwd, bf16 activations)", "",
           f"- Command: `{command}`",
           f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
           f"- Device: {device.device_kind} ({jax.default_backend()}); {platform.platform()}",
           f"- Versions: Python {platform.python_version()}, jax {jax.__version__}",
           f"- Measured bf16 matmul rate: {rate:,.0f} TFLOP/s (8192^3 on random data)", "",
           "| out | K | variant | ms | vs dense | of FLOP floor | note |",
           "|---:|---:|---|---:|---:|---:|---|"]
  piece_lines = ["", "Pieces, one tile of C rows (ms). Each is one jitted call timed from the host, so "
                 "at these sizes mostly dispatch and synchronisation: profile_trace.py gives the "
                 "per-kernel breakdown.", "",
                 "| out | K | C | build tile | x @ tile | g @ tile^T | x^T g | gather dvalues |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for (out, fan_in, batch, in_features), (result, notes, c, pieces) in cases:
    floor_ms = 6 * batch * in_features * out / (rate * 1e12) * 1e3
    for name, seconds in result.items():
      ms = seconds * 1e3
      lines.append(f"| {out:,} | {fan_in} | {name} | {ms:,.2f} | {ms / (result['dense'] * 1e3):.2f}x"
                   f" | {floor_ms / ms:.0%} | {notes.get(name, '')} |")
    for name, note in notes.items():
      if name not in result:
        lines.append(f"| {out:,} | {fan_in} | {name} | - | - | - | {note} |")
    piece_lines.append(f"| {out:,} | {fan_in} | {c:,} | " + " | ".join(
        f"{pieces[p] * 1e3:.3f}" for p in ("build", "x @ tile", "g @ tile^T", "x^T g", "gather"))
        + " |")
  return "\n".join(lines + piece_lines)


def define_flags():
  flags.DEFINE_list("outs", ["65536", "670091", "3000000"], "output sizes")
  flags.DEFINE_list("fan_ins", ["64", "128"], "fan-ins K")
  flags.DEFINE_integer("batch", 256, "batch size")
  flags.DEFINE_integer("in_features", 768, "input size")
  flags.DEFINE_list("log2_tiles", ["24", "26"], "tile sizes to time, log2 elements")
  flags.DEFINE_integer("rounds", 7, "interleaved timing rounds (median)")
  flags.DEFINE_string("output", str(pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
                      "file whose tile_variants section is rewritten ('' to skip)")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  rate = matmul_rate(FLAGS.rounds)
  cases = []
  for out in (int(o) for o in FLAGS.outs):
    for fan_in in (int(k) for k in FLAGS.fan_ins):
      shape = (out, fan_in, FLAGS.batch, FLAGS.in_features)
      cases.append((shape, run_case(*shape, [int(n) for n in FLAGS.log2_tiles], FLAGS.rounds)))
      print(f"done {shape}", file=sys.stderr, flush=True)
  section = render(cases, rate, "python benchmarks/tile_variants.py " + " ".join(sys.argv[1:]))
  print(section)
  if FLAGS.output:
    write_section(pathlib.Path(FLAGS.output), section)


if __name__ == "__main__":
  define_flags()
  app.run(main)
