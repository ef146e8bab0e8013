"""What MVUE N:M pruning of dY costs next to the GEMM it feeds.

For a bf16 (or f32) neural gradient dY (tokens, out) pruned along the tokens and
a layer input X (tokens, in), one run times side by side:

* ``dW GEMM``: ``X^T dY`` with float32 and with bfloat16 output, the GEMM the pruned
  dY feeds (and ``dX GEMM``, ``dY W^T``, the other consumer of dY, for scale);
* per method (1:2, 2:4 ``mvue``, 2:4 ``mvue_approx``): the mask alone by XLA
  (``sparsejax.nm_prune``) and by the Pallas kernel (checked bit-equal to it
  first), mask-then-matmul, and the fused prune + dW kernel;
* ``--compare_with DIR``: the mask kernel of an earlier version, imported as
  ``kernels_previous.nm`` from ``DIR`` (a copy of that version's ``kernels/``),
  timed on the same inputs (its bits differ when the random map changed).

Each row gives ms, the bytes it must move (mask: dY read and written; dW: X and
dY read, float32 dW written), the achieved fraction of the measured copy
bandwidth, and its time over the faster dW GEMM's. ``--sweep`` first times the mask
kernel over launch settings and uses the fastest per method. Timing: warm-up,
then the median of ``--repeats`` samples of ``BURST`` queued calls each, alternating
two input sets, so that host dispatch latency is not timed. The table goes
to stdout and to the ``mvue_cost`` section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import pathlib
import platform
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
from sparsejax.kernels import nm
from sparsejax.mvue import key_data

START_MARKER, END_MARKER = _report.markers("mvue_cost")
write_section = functools.partial(_report.write_section, name="mvue_cost")
METHODS = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx")]
# Each sample queues this many calls: a lone 0.04 ms kernel timed from the host measured
# 0.11 ms on an H100 (ncu: 0.0375 ms), the rest being dispatch and wait latency.
BURST = 20


def _time(fn, inputs, repeats: int) -> float:
  return _report.time_median(fn, inputs, repeats, burst=BURST)


@dataclasses.dataclass
class Row:
  pruning: str
  path: str
  ms: float | None
  bytes_moved: int
  note: str = ""


def _inputs(tokens: int, in_features: int, out: int, dtype):
  gs = [jax.random.normal(jax.random.key(50 + i), (tokens, out), dtype) for i in range(2)]
  xs = [jax.random.normal(jax.random.key(60 + i), (tokens, in_features), dtype) for i in range(2)]
  ws = [jax.random.normal(jax.random.key(70 + i), (out, in_features), dtype) for i in range(2)]
  keys = [jax.random.key(40 + i) for i in range(2)]
  return gs, xs, ws, keys


def sweep_mask(tokens: int, out: int, dtype, repeats: int):
  """The fastest ``MaskTuning`` per method, and the markdown table of all that ran."""
  gs, _, _, keys = _inputs(tokens, 8, out, dtype)
  inputs = [(g, key_data(k)) for g, k in zip(gs, keys)]
  grid = [nm.MaskTuning(groups, cols, warps, 1) for groups, cols, warps in
          itertools.product((1024, 2048, 4096), (256, 512), (4, 8))]
  best, lines = {}, ["| pruning | settings | ms |", "|---|---|---:|"]
  for (n, m, method), tuning in itertools.product(METHODS, grid):
    fn = jax.jit(lambda g, k, m=m, method=method, t=tuning: nm.nm_prune_kernel(
        g, k, m=m, method=method, axis=0, tuning=t))
    try:
      ms = _time(fn, inputs, repeats) * 1e3
    except Exception as error:  # a setting the compiler rejects: report it, go on
      lines.append(f"| {n}:{m} {method} | {tuning} | {type(error).__name__} |")
      continue
    lines.append(f"| {n}:{m} {method} | {tuning} | {ms:.4f} |")
    if ms < best.get(method + str(m), (None, np.inf))[1]:
      best[method + str(m)] = (tuning, ms)
  return {name: tuning for name, (tuning, _) in best.items()}, "\n".join(lines)


def _previous_mask(directory: str):
  sys.path.insert(0, str(pathlib.Path(directory).resolve()))
  return importlib.import_module("kernels_previous.nm")


def run(tokens: int, in_features: int, out: int, dtype, repeats: int, tunings=None,
        previous=None) -> list[Row]:
  """The rows of the table; the Pallas kernels only on GPU."""
  gpu = jax.default_backend() == "gpu"
  gs, xs, ws, keys = _inputs(tokens, in_features, out, dtype)
  item = jnp.dtype(dtype).itemsize
  mask_bytes = 2 * tokens * out * item
  dw_bytes = tokens * (in_features + out) * item + in_features * out * 4
  f32 = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  rows = [
      Row("none", "dW GEMM: X^T dY", 1e3 * _time(
          jax.jit(lambda x, g: f32(x.T, g)), list(zip(xs, gs)), repeats), dw_bytes),
      Row("none", "dW GEMM: X^T dY, bf16 out", 1e3 * _time(
          jax.jit(lambda x, g: x.T @ g), list(zip(xs, gs)), repeats),
          tokens * (in_features + out) * item + in_features * out * item),
      Row("none", "dX GEMM: dY W", 1e3 * _time(
          jax.jit(lambda g, w: f32(g, w)), list(zip(gs, ws)), repeats),
          (tokens * out + in_features * out) * item + tokens * in_features * 4),
  ]
  for n, m, method in METHODS:
    name = f"{n}:{m} {method}"
    tuning = (tunings or {}).get(method + str(m), nm.MASK_TUNING[m])
    xla_mask = jax.jit(lambda g, k, n=n, m=m, method=method: sj.nm_prune(
        g, key=k, n=n, m=m, method=method, axis=0))
    kernel_mask = jax.jit(lambda g, k, m=m, method=method, t=tuning: nm.nm_prune_kernel(
        g, key_data(k), m=m, method=method, axis=0, tuning=t))
    masks = {"xla": (xla_mask, "")}
    if gpu:
      got, want = (np.asarray(f(gs[0], keys[0]), np.float32) for f in (kernel_mask, xla_mask))
      if not np.array_equal(got, want):
        raise AssertionError(f"mask kernel {name} differs from nm_prune")
      masks["pallas"] = (kernel_mask, f"bit-equal to nm_prune; {tuning}")
      if previous is not None:
        masks["pallas, previous version"] = (jax.jit(
            lambda g, k, m=m, method=method: previous.nm_prune_kernel(
                g, key_data(k), m=m, method=method, axis=0)), "its own random map")
    for path, (mask, note) in masks.items():
      seconds = _time(mask, list(zip(gs, keys)), repeats)
      rows.append(Row(name, f"mask: {path}", seconds * 1e3, mask_bytes, note))
    best = masks["pallas" if gpu else "xla"][0]
    dw = jax.jit(lambda x, g, k, mask=best: f32(x.T, mask(g, k)))
    rows.append(Row(name, f"dW: {'pallas' if gpu else 'xla'} mask, then GEMM",
                    1e3 * _time(dw, list(zip(xs, gs, keys)), repeats), dw_bytes))
    if gpu:
      fused = jax.jit(lambda x, g, k, m=m, method=method: nm.pruned_weight_grad(
          x, g, key_data(k), m=m, method=method))
      want = np.asarray(xs[0], np.float32).T @ np.asarray(xla_mask(gs[0], keys[0]), np.float32)
      err = float(np.linalg.norm(np.asarray(fused(xs[0], gs[0], keys[0])) - want)
                  / np.linalg.norm(want))
      if not err < 1e-2:
        raise AssertionError(f"fused dW {name}: relative error {err}")
      rows.append(Row(name, "dW: fused kernel", 1e3 * _time(
          fused, list(zip(xs, gs, keys)), repeats), dw_bytes, f"check rel err {err:.1e}"))
  return rows


def format_table(rows, bandwidth: float) -> str:
  gemm = min(r.ms for r in rows if r.path.startswith("dW GEMM"))  # the faster of the two
  lines = ["| pruning | path | ms | MB moved | of copy BW | x dW GEMM | note |",
           "|---|---|---:|---:|---:|---:|---|"]
  for r in rows:
    gbs = r.bytes_moved / (r.ms / 1e3) / 1e9
    lines.append(f"| {r.pruning} | {r.path} | {r.ms:,.4f} | {r.bytes_moved / 1e6:,.0f} | "
                 f"{gbs / bandwidth:.0%} | {r.ms / gemm:.2f}x | {r.note} |")
  return "\n".join(lines)


def render_section(rows, bandwidth: float, rate: float, command: str, shape, sweep_table="") -> str:
  tokens, in_features, out, dtype = shape
  device = jax.devices()[0]
  item = jnp.dtype(dtype).itemsize
  floor_ms = 2 * tokens * out * item / bandwidth / 1e6
  gemm_floor_ms = 2 * tokens * in_features * out / rate * 1e3
  versions = f"Python {sys.version.split()[0]}, jax {jax.__version__}"
  return "\n".join([
      "## MVUE N:M pruning of dY: cost next to the GEMM it feeds", "",
      f"- Command: `{command}`",
      f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
      f"- Device: {device.device_kind} ({jax.default_backend()}); {platform.platform()}",
      f"- Versions: {versions}",
      f"- dY ({tokens:,}, {out:,}) {jnp.dtype(dtype).name}, pruned along the tokens; "
      f"X ({tokens:,}, {in_features:,}); float32 dW.",
      f"- Measured copy bandwidth {bandwidth:,.0f} GB/s: a mask must read and write dY, "
      f"{2 * tokens * out * item / 1e6:,.0f} MB, so it takes at least {floor_ms:.4f} ms. "
      f"Measured bf16 matmul rate {rate / 1e12:,.0f} TFLOP/s: the dW GEMM's FLOP floor is "
      f"{gemm_floor_ms:.4f} ms.", "",
      format_table(rows, bandwidth), "",
      *(["Mask kernel launch settings (`--sweep`):", "", sweep_table, ""] if sweep_table else [])])


def define_flags():
  flags.DEFINE_integer("tokens", 8192, "tokens of dY and X")
  flags.DEFINE_integer("in_features", 768, "columns of X (rows of dW)")
  flags.DEFINE_integer("out", 3072, "columns of dY")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "dtype of X and dY")
  flags.DEFINE_integer("repeats", 20, "timed repeats (median)")
  flags.DEFINE_bool("sweep", False, "time the mask kernel over launch settings first (GPU)")
  flags.DEFINE_string("compare_with", "", "a folder holding an earlier version's kernels/ as "
                      "kernels_previous/, whose mask kernel is timed too (GPU)")
  flags.DEFINE_string("output", str(pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
                      "file whose mvue_cost section is rewritten ('' to skip)")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  dtype = jnp.dtype(FLAGS.dtype)
  shape = (FLAGS.tokens, FLAGS.in_features, FLAGS.out, dtype)
  gpu = jax.default_backend() == "gpu"
  bandwidth = _report.copy_bandwidth(FLAGS.repeats)
  rate = _report.matmul_rate(8192 if gpu else 1024, 10)
  tunings, sweep_table = {}, ""
  if FLAGS.sweep and gpu:
    tunings, sweep_table = sweep_mask(FLAGS.tokens, FLAGS.out, dtype, FLAGS.repeats)
    print(sweep_table, file=sys.stderr, flush=True)
  previous = _previous_mask(FLAGS.compare_with) if FLAGS.compare_with and gpu else None
  rows = run(*shape[:3], dtype, FLAGS.repeats, tunings, previous)
  command = "python benchmarks/mvue_cost.py " + " ".join(sys.argv[1:])
  section = render_section(rows, bandwidth, rate, command, shape, sweep_table)
  if FLAGS.output:
    write_section(pathlib.Path(FLAGS.output), section)
  print(section)


if __name__ == "__main__":
  define_flags()
  app.run(main)
