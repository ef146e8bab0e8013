"""Checks, then times, the fixed fan-in kernels on whatever device JAX finds.

For batch 256, in 768 and each (out, K), one fwd+bwd step (y, dvalues, dx) of:

* ``xla``: the pure-XLA gather path (``impl="xla"``);
* ``pallas``: the Pallas kernels (GPU only; interpret mode is far too slow at
  these sizes, so CPU runs say so and skip it);
* ``dense f32`` / ``dense bf16``: ``x @ W`` with a dense (in, out) weight, fwd+bwd;
* ``bcoo``: ``jax.experimental.sparse`` BCOO with the same non-zeros, fwd+bwd.

Each sparse path is first checked against a float64 reference on a slice of
the rows. Timing: warm-up, then the median of ``--repeats`` calls with
``block_until_ready``, rotating between two input sets so caches do not
flatter. The device-to-device copy bandwidth is measured in the same run;
for each case the table gives the bytes a fwd+bwd step must move (each input
read once, each output written once), the achieved GB/s, the fraction of the
copy bandwidth and the time ratio to dense bf16.

MVUE N:M gradient pruning of a (tokens, out) dY along the tokens (``--nm_*``
flags), for 1:2, 2:4 and approximate 2:4: the mask alone (``xla``:
``sparsejax.nm_prune``; ``pallas``: the in-kernel-RNG kernel, checked equal to
it first) with bytes = dY read + written; and ``dW = X^T prune(dY)`` as
mask-then-matmul (XLA mask or kernel mask, then an XLA matmul) against the
fused kernel that never writes the pruned dY.

The tables go to stdout and to their section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import dataclasses
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
from jax.experimental import sparse as jsparse

try:
  from benchmarks import _report
except ImportError:  # run as `python benchmarks/<script>.py`: this folder is on the path
  import _report
import sparsejax as sj

START_MARKER, END_MARKER = _report.markers("kernels")
write_section = functools.partial(_report.write_section, name="kernels")


@dataclasses.dataclass
class NmRow:
  pruning: str
  path: str
  ms: float | None
  bytes_moved: int
  note: str = ""


@dataclasses.dataclass
class Row:
  out: int
  fan_in: int
  path: str
  ms: float | None
  bytes_moved: int
  note: str = ""


def _time(fn, inputs, repeats: int) -> float:
  """Median seconds of ``fn(*inputs[i % len(inputs)])`` after one warm-up per input set."""
  for args in inputs:
    jax.block_until_ready(fn(*args))
  seconds = []
  for i in range(repeats):
    args = inputs[i % len(inputs)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def copy_bandwidth(repeats: int) -> float:
  """Device-to-device copy GB/s (bytes read + written) of a 1 GiB (CPU: 256 MiB) buffer."""
  size = (1 << 28 if jax.default_backend() != "cpu" else 1 << 26)
  buffers = [jax.random.normal(jax.random.key(i), (size,), jnp.float32) for i in range(2)]
  copy = jax.jit(lambda a: a + 0.0)  # one read, one write
  seconds = _time(copy, [(b,) for b in buffers], repeats)
  return 2 * size * 4 / seconds / 1e9


def _sparse_step(impl):
  def loss(x, values, indices):
    return jnp.sum(sj.fixed_fanin_matmul(x, values, indices, impl=impl) ** 2) * 0.5

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _dense_step(dtype):
  def loss(x, w):
    return jnp.sum((x.astype(dtype) @ w.astype(dtype)).astype(jnp.float32) ** 2) * 0.5

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _bcoo_step(x, matrix):
  def loss(x, data):
    w = jsparse.BCOO((data, matrix.indices), shape=matrix.shape)
    return jnp.sum((x @ w) ** 2) * 0.5

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _check(step, x, values, indices, rows: int, tolerance: float = 1e-4) -> float:
  """Relative error of (dx, dvalues) against float64 on the first ``rows`` outputs."""
  sub_values, sub_indices = values[:rows], indices[:rows]
  dx, dvalues = step(x, sub_values, sub_indices)
  x64 = np.asarray(x, np.float64)
  idx = np.asarray(sub_indices).astype(np.int64)
  w = np.zeros((x.shape[1], rows))
  np.add.at(w, (idx, np.arange(rows)[:, None]), np.asarray(sub_values, np.float64))
  y = x64 @ w  # loss 0.5 |y|^2: g = y
  want_dx, want_dv = y @ w.T, (x64.T @ y)[idx, np.arange(rows)[:, None]]
  err = max(np.linalg.norm(np.asarray(dx, np.float64) - want_dx) / np.linalg.norm(want_dx),
            np.linalg.norm(np.asarray(dvalues, np.float64) - want_dv) / np.linalg.norm(want_dv))
  if not np.isfinite(err) or err > tolerance:
    raise AssertionError(f"check failed: relative error {err}")
  return err


def check_ragged(impl: str) -> None:
  """``impl`` against XLA (values and both gradients) at sizes that are not block multiples."""
  for in_features, out, fan_in, batch in ((30, 21, 3, 19), (16, 40, 16, 70), (8, 33, 1, 1),
                                          (768, 1000, 64, 100)):
    layer = sj.FixedFanIn.init(jax.random.key(out), in_features, out, fan_in)
    x = jax.random.normal(jax.random.key(batch), (batch, in_features))
    got, want = (_sparse_step(i)(x, layer.values, layer.indices) for i in (impl, "xla"))
    for a, b in zip(got, want):
      err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
      if not err < 1e-4:
        raise AssertionError(f"{impl} vs xla at {(in_features, out, fan_in, batch)}: {err}")
  print(f"ragged-size check of {impl} against xla: passed")


def sweep(out: int, fan_in: int, batch: int, in_features: int, repeats: int) -> str:
  """Times each kernel alone over launch settings; returns a markdown table, fastest first."""
  from sparsejax.kernels import fanin
  layers = [sj.FixedFanIn.init(jax.random.key(i), in_features, out, fan_in) for i in range(2)]
  xs = [jax.random.normal(jax.random.key(20 + i), (batch, in_features)) for i in range(2)]
  gs = [jax.random.normal(jax.random.key(30 + i), (batch, out)) for i in range(2)]
  T = fanin.Tuning
  cases = []
  for rows, cols in ((16, 128), (32, 64), (64, 64), (128, 32)):
    for warps in (4, 8):
      for stages in (2, 3):
        cases.append(("forward", T(rows, cols, warps, stages), None))
  for rows, cols in ((16, 64), (32, 64), (64, 32)):
    for warps in (4, 8):
      cases.append(("dvalues", T(rows, cols, warps, 2), None))
  for chunk in (64, 128, 256):
    for cols in (64, 128, 256):
      for warps in (4, 8):
        cases.append(("dx_sorted", T(32, cols, warps, 2), chunk))
  cases.append(("sort_topology", T(), None))
  orders = [fanin.sort_topology(lay.indices, in_features) for lay in layers]
  results = []
  for kernel, tuning, chunk in cases:
    if kernel == "forward":
      fn = jax.jit(lambda x, v, i, g, t=tuning: fanin.fanin_forward(x, v, i, tuning=t))
    elif kernel == "dvalues":
      fn = jax.jit(lambda x, v, i, g, t=tuning: fanin.fanin_dvalues(
          x, g, i, values_dtype=v.dtype, tuning=t))
    elif kernel == "sort_topology":
      fn = jax.jit(lambda x, v, i, g: fanin.sort_topology(i, x.shape[1]))
    else:  # dx from the cached column-sorted topology
      fn = jax.jit(lambda x, v, i, g, t=tuning, c=chunk: fanin.fanin_dx_sorted(
          g, v, *i, tuning=t, chunk=c))
    try:
      topologies = orders if kernel == "dx_sorted" else [lay.indices for lay in layers]
      seconds = _time(fn, [(x, lay.values, top, g)
                           for x, lay, top, g in zip(xs, layers, topologies, gs)], repeats)
      results.append((kernel, chunk or "", tuning, seconds * 1e3, ""))
    except Exception as error:  # a launch setting the compiler rejects: report, go on
      results.append((kernel, chunk or "", tuning, float("inf"), type(error).__name__))
  lines = [f"Kernel launch settings at out {out:,}, K {fan_in}, batch {batch}, in {in_features}:",
           "", "| kernel | chunk | rows | batch block | warps | stages | ms |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for kernel, chunk, t, ms, err in sorted(results, key=lambda r: (r[0], r[3])):
    lines.append(f"| {kernel} | {chunk} | {t.block_rows} | {t.block_batch} | {t.num_warps} | "
                 f"{t.num_stages} | {ms:.2f}{' ' + err if err else ''} |")
  return "\n".join(lines)


def run(outs, fan_ins, batch: int, in_features: int, repeats: int, max_dense_bytes: float,
        xla_max_out: int):
  backend = jax.default_backend()
  if backend == "gpu":
    check_ragged("pallas")
  rows = []
  for out in outs:
    dense_ms = {}
    w_bytes = in_features * out
    for dtype, name in ((jnp.float32, "dense f32"), (jnp.bfloat16, "dense bf16")):
      size = w_bytes * jnp.dtype(dtype).itemsize
      moved = 3 * size + 3 * batch * out * 4 + 4 * batch * in_features * 4  # w r, dw w, +x/g/y
      if 2 * size > max_dense_bytes:
        rows.append(Row(out, 0, name, None, moved, "skipped: dense weight too large here"))
        continue
      inputs = [(jax.random.normal(jax.random.key(i), (batch, in_features)),
                 jax.random.normal(jax.random.key(10 + i), (in_features, out), dtype))
                for i in range(2)]
      seconds = _time(_dense_step(dtype), inputs, repeats)
      dense_ms[name] = seconds * 1e3
      rows.append(Row(out, 0, name, seconds * 1e3, moved))
      del inputs
    for fan_in in fan_ins:
      layers = [sj.FixedFanIn.init(jax.random.key(i), in_features, out, fan_in) for i in range(2)]
      xs = [jax.random.normal(jax.random.key(20 + i), (batch, in_features)) for i in range(2)]
      nnz = out * fan_in
      # values r + dvalues w (4 B each), indices read twice (fwd, bwd: 2 B each), x, g, y, dx.
      moved = nnz * (4 + 4 + 2 * 2 + 4) + 2 * batch * out * 4 + 3 * batch * in_features * 4
      paths = (["xla"] if out <= xla_max_out else []) + (["pallas"] if backend == "gpu" else [])
      for impl in paths:
        step = _sparse_step(impl)
        err = _check(step, xs[0], layers[0].values, layers[0].indices, min(out, 4096))
        seconds = _time(step, [(x, lay.values, lay.indices) for x, lay in zip(xs, layers)],
                        repeats)
        rows.append(Row(out, fan_in, impl, seconds * 1e3, moved, f"check rel err {err:.1e}"))
      if backend == "gpu":
        # bf16 activations and values: half the bytes per gathered batch vector, which is
        # what bounds these L2-bound gathers (BENCHMARKS.md notes).
        half = [(x.astype(jnp.bfloat16), lay.values.astype(jnp.bfloat16), lay.indices)
                for x, lay in zip(xs, layers)]
        step = _sparse_step("pallas")
        err = _check(step, *half[0], min(out, 4096), tolerance=2e-2)
        seconds = _time(step, half, repeats)
        moved_bf16 = nnz * (2 + 2 + 2 * 2 + 4) + 2 * batch * out * 2 + 3 * batch * in_features * 2
        rows.append(Row(out, fan_in, "pallas bf16", seconds * 1e3, moved_bf16,
                        f"check rel err {err:.1e}"))
      if backend == "cpu" and "pallas" not in paths:
        rows.append(Row(out, fan_in, "pallas", None, moved, "not run: no GPU (interpret mode "
                        "is a correctness tool, tested in tests/test_kernels_fanin.py)"))
      if out * fan_in <= 64 * 131072:  # BCOO's index array is 16 B/nnz: keep it small
        matrix = jsparse.BCOO.fromdense(layers[0].to_dense())
        step = _bcoo_step(xs[0], matrix)
        seconds = _time(step, [(x, matrix.data) for x in xs], repeats)
        rows.append(Row(out, fan_in, "bcoo", seconds * 1e3, moved + nnz * 8))
      del layers
  return rows


_NM = [(1, 2, "mvue"), (2, 4, "mvue"), (2, 4, "mvue_approx")]


def run_nm(tokens: int, in_features: int, out: int, dtype, repeats: int):
  """Rows for the MVUE mask and the weight gradient; kernels only on GPU."""
  from sparsejax.kernels import nm
  from sparsejax.mvue import _key_data
  gpu = jax.default_backend() == "gpu"
  keys = [jax.random.key(40 + i) for i in range(2)]
  gs = [jax.random.normal(jax.random.key(50 + i), (tokens, out), dtype) for i in range(2)]
  xs = [jax.random.normal(jax.random.key(60 + i), (tokens, in_features), dtype) for i in range(2)]
  item = jnp.dtype(dtype).itemsize
  rows = []
  for n, m, method in _NM:
    name = f"{n}:{m} {method}"
    xla_mask = jax.jit(lambda g, k, n=n, m=m, method=method: sj.nm_prune(
        g, k, n=n, m=m, method=method, axis=0))
    kernel_mask = jax.jit(lambda g, k, m=m, method=method: nm.nm_prune_kernel(
        g, _key_data(k), m=m, method=method, axis=0))
    fused = jax.jit(lambda x, g, k, m=m, method=method: nm.pruned_weight_grad(
        x, g, _key_data(k), m=m, method=method))
    mask_bytes = 2 * tokens * out * item
    dw_bytes = tokens * (in_features + out) * item + in_features * out * 4
    mask_paths = {"xla": xla_mask} | ({"pallas": kernel_mask} if gpu else {})
    for path, mask in mask_paths.items():
      note = ""
      if path == "pallas":
        got, want = (np.asarray(f(gs[0], keys[0]), np.float32) for f in (kernel_mask, xla_mask))
        same = np.array_equal(got != 0, want != 0)
        diff = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        if not same or diff > 1e-6:
          raise AssertionError(f"mask kernel {name} differs from nm_prune: {diff}")
        note = "bit-equal to nm_prune" if diff == 0 else f"kept equal, max rel diff {diff:.0e}"
      seconds = _time(mask, list(zip(gs, keys)), repeats)
      rows.append(NmRow(name, f"mask: {path}", seconds * 1e3, mask_bytes, note))
      dw = jax.jit(lambda x, g, k, mask=mask: (x.T @ mask(g, k)).astype(jnp.float32))
      seconds = _time(dw, list(zip(xs, gs, keys)), repeats)
      rows.append(NmRow(name, f"dW: {path} mask, then matmul", seconds * 1e3, dw_bytes))
    if gpu:
      want = np.asarray(xs[0], np.float32).T @ np.asarray(xla_mask(gs[0], keys[0]), np.float32)
      err = float(np.linalg.norm(np.asarray(fused(xs[0], gs[0], keys[0])) - want)
                  / np.linalg.norm(want))
      if not err < 1e-2:
        raise AssertionError(f"fused dW {name}: relative error {err}")
      seconds = _time(fused, list(zip(xs, gs, keys)), repeats)
      rows.append(NmRow(name, "dW: fused kernel", seconds * 1e3, dw_bytes,
                        f"check rel err {err:.1e}"))
    else:
      rows.append(NmRow(name, "mask: pallas; dW: fused kernel", None, mask_bytes,
                        "not run: no GPU (interpret mode is tested in tests/test_kernels_nm.py)"))
  return rows


def sweep_nm(tokens: int, in_features: int, out: int, dtype, repeats: int) -> str:
  """Times the 2:4 MVUE mask and fused dW kernels over launch settings (GPU)."""
  from sparsejax.kernels import nm
  from sparsejax.mvue import _key_data
  keys = [_key_data(jax.random.key(40 + i)) for i in range(2)]
  gs = [jax.random.normal(jax.random.key(50 + i), (tokens, out), dtype) for i in range(2)]
  xs = [jax.random.normal(jax.random.key(60 + i), (tokens, in_features), dtype) for i in range(2)]
  cases = [("mask", nm.MaskTuning(groups, warps, stages)) for groups in (256, 512, 1024)
           for warps in (4, 8, 16) for stages in (1, 2)]
  # Each program prunes its dY tiles once per block of inputs: wide input blocks prune less
  # often, at the cost of registers and of re-reading X once per block of outputs. Token
  # splits multiply the programs (in x out alone gives ~2 waves on an H100).
  cases += [("fused dW", nm.DwTuning(bi, bo, bg, warps, stages, splits))
            for bi, bo in ((128, 64), (256, 32), (256, 64), (512, 16))
            for bg in (16, 32) for warps in (4, 8) for stages in (2, 3) for splits in (1, 4, 8)]
  results = []
  for kernel, tuning in cases:
    if kernel == "mask":
      fn = jax.jit(lambda x, g, k, t=tuning: nm.nm_prune_kernel(g, k, m=4, method="mvue", axis=0,
                                                                tuning=t))
    else:
      fn = jax.jit(lambda x, g, k, t=tuning: nm.pruned_weight_grad(x, g, k, m=4, method="mvue",
                                                                   tuning=t))
    try:
      ms = _time(fn, list(zip(xs, gs, keys)), repeats) * 1e3
      results.append((kernel, tuning, ms, ""))
    except Exception as error:  # a launch setting the compiler rejects: report, go on
      results.append((kernel, tuning, float("inf"), type(error).__name__))
  lines = [f"N:M kernel launch settings, 2:4 mvue, tokens {tokens:,}, in {in_features}, "
           f"out {out}, {jnp.dtype(dtype).name}:", "", "| kernel | settings | ms |", "|---|---|---:|"]
  for kernel, t, ms, err in sorted(results, key=lambda r: (r[0], r[2])):
    lines.append(f"| {kernel} | {t} | {ms:.3f}{' ' + err if err else ''} |")
  return "\n".join(lines)


def format_nm_table(rows, bandwidth: float) -> str:
  lines = ["| pruning | path | ms | MB moved | GB/s | of copy BW | note |",
           "|---|---|---:|---:|---:|---:|---|"]
  for r in rows:
    if r.ms is None:
      lines.append(f"| {r.pruning} | {r.path} | - | {r.bytes_moved / 1e6:,.0f} | - | - | "
                   f"{r.note} |")
      continue
    gbs = r.bytes_moved / (r.ms / 1e3) / 1e9
    lines.append(f"| {r.pruning} | {r.path} | {r.ms:,.3f} | {r.bytes_moved / 1e6:,.0f} | "
                 f"{gbs:,.0f} | {gbs / bandwidth:.0%} | {r.note} |")
  return "\n".join(lines)


def format_table(rows, bandwidth: float) -> str:
  dense = {(r.out): r.ms for r in rows if r.path == "dense bf16"}
  lines = ["| out | K | path | ms / fwd+bwd | MB moved | GB/s | of copy BW | vs dense bf16 | note |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    if r.ms is None:
      lines.append(f"| {r.out:,} | {r.fan_in or '-'} | {r.path} | - | {r.bytes_moved / 1e6:,.0f} "
                   f"| - | - | - | {r.note} |")
      continue
    gbs = r.bytes_moved / (r.ms / 1e3) / 1e9
    ratio = "-" if dense.get(r.out) is None else f"{r.ms / dense[r.out]:.2f}x"
    lines.append(f"| {r.out:,} | {r.fan_in or '-'} | {r.path} | {r.ms:,.2f} | "
                 f"{r.bytes_moved / 1e6:,.0f} | {gbs:,.0f} | {gbs / bandwidth:.0%} | {ratio} | "
                 f"{r.note} |")
  return "\n".join(lines)


def render_section(rows, bandwidth: float, command: str, nm_rows=(), nm_shape=None) -> str:
  device = jax.devices()[0]
  versions = f"Python {sys.version.split()[0]}, jax {jax.__version__}"
  try:
    import triton
    versions += f", triton {triton.__version__}"
  except ImportError:
    pass
  return "\n".join([
      "## Fixed fan-in kernels: fwd+bwd time and bandwidth", "",
      f"- Command: `{command}`",
      f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
      f"- Device: {device.device_kind} ({jax.default_backend()}); {platform.platform()}",
      f"- Versions: {versions}",
      f"- Measured copy bandwidth: {bandwidth:,.0f} GB/s (read + write)",
      "- One step = y, dvalues and dx for loss 0.5 |y|^2; batch 256, in 768, float32 "
      "values, uint16 indices. MB moved counts each input read once and each output "
      "written once.", "",
      format_table(rows, bandwidth), "",
      *([f"MVUE N:M pruning of dY (tokens, out) = ({nm_shape[0]:,}, {nm_shape[2]:,}) along the "
         f"tokens, {nm_shape[3]}; dW = X^T prune(dY) with X ({nm_shape[0]:,}, {nm_shape[1]:,}). "
         "Mask MB = dY read + written; dW MB = X and dY read, float32 dW written.", "",
         format_nm_table(nm_rows, bandwidth), ""] if nm_rows else [])])


def define_flags():
  flags.DEFINE_list("outs", ["131072", "670091", "3000000"], "output sizes")
  flags.DEFINE_list("fan_ins", ["32", "64", "128"], "fan-ins K")
  flags.DEFINE_integer("batch", 256, "batch size")
  flags.DEFINE_integer("in_features", 768, "input size")
  flags.DEFINE_integer("repeats", 20, "timed repeats (median)")
  flags.DEFINE_float("max_dense_gib", 8.0, "skip dense weights larger than this")
  flags.DEFINE_integer("xla_max_out", 670091, "time the (slow) XLA path only up to this out")
  flags.DEFINE_integer("nm_tokens", 8192, "tokens of the N:M pruning benchmark (0 skips it)")
  flags.DEFINE_integer("nm_in", 768, "input features of the N:M weight-gradient benchmark")
  flags.DEFINE_integer("nm_out", 3072, "output features (dY columns) of the N:M benchmark")
  flags.DEFINE_enum("nm_dtype", "bfloat16", ["bfloat16", "float32"], "dtype of X and dY")
  flags.DEFINE_bool("sweep", False, "time each kernel over launch settings (GPU) and exit")
  flags.DEFINE_bool("nm_sweep", False, "time the N:M kernels over launch settings (GPU) and exit")
  flags.DEFINE_string("output", str(pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
                      "file whose kernels section is rewritten ('' to skip)")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.nm_sweep:
    print(sweep_nm(FLAGS.nm_tokens, FLAGS.nm_in, FLAGS.nm_out, jnp.dtype(FLAGS.nm_dtype),
                   FLAGS.repeats))
    return
  if FLAGS.sweep:
    print(sweep(int(FLAGS.outs[0]), int(FLAGS.fan_ins[0]), FLAGS.batch, FLAGS.in_features,
                FLAGS.repeats))
    return
  bandwidth = copy_bandwidth(FLAGS.repeats)
  rows = run([int(o) for o in FLAGS.outs], [int(k) for k in FLAGS.fan_ins], FLAGS.batch,
             FLAGS.in_features, FLAGS.repeats, FLAGS.max_dense_gib * 2**30, FLAGS.xla_max_out)
  nm_shape = (FLAGS.nm_tokens, FLAGS.nm_in, FLAGS.nm_out, FLAGS.nm_dtype)
  nm_rows = (run_nm(*nm_shape[:3], jnp.dtype(FLAGS.nm_dtype), FLAGS.repeats)
             if FLAGS.nm_tokens else [])
  section = render_section(rows, bandwidth, "python benchmarks/kernels.py " + " ".join(sys.argv[1:]),
                           nm_rows, nm_shape)
  print(section)
  if FLAGS.output:
    write_section(pathlib.Path(FLAGS.output), section)


if __name__ == "__main__":
  define_flags()
  app.run(main)
