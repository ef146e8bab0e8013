"""Checks, then times, the fixed fan-in layer on whatever device JAX finds.

For batch 256, in 768 and each (L = out, K), one fwd+bwd step (y, dx, dvalues
of loss 0.5 |y|^2) of each path named by ``--paths`` (``<impl>-<dtype>``,
dtype ``f32`` or ``bf16``: activations and weights in it, float32 accumulation):

* ``dense``: ``x @ W`` with a dense (in, out) weight (f32 at JAX's default
  precision, TF32 on recent NVIDIA GPUs);
* ``xla``, ``pallas``: the gather design (``impl="xla"``: pure XLA, ~100x
  slower than the kernels on GPU, so by default only up to ``--xla_max_out``;
  ``impl="pallas"``: the Pallas gather kernels, GPU only);
* ``xla_tile``, ``pallas_tile``: the tile design (a dense (in, C) tile per C
  output rows on the tensor cores; pure XLA, or the fused Pallas kernel, GPU
  only); ``auto``: ``impl="auto"``, the note says what it dispatched to;
* ``bcoo``: ``jax.experimental.sparse`` BCOO with the same non-zeros (small
  layers only);
* ``torch``: the PyTorch cuSPARSE CSR peer (``benchmarks/torch_peer.py``), run
  first in its own process so that the two never share GPU memory; rows
  ``torch csr f32`` / ``bf16``, or a row saying why it did not run.

Each JAX sparse path is first checked against a float64 reference on a slice
of the rows (tolerance by dtype; a failed check is timed anyway and says so).
A path that raises (a kernel that does not compile, out of memory) becomes a
row with its error and the run goes on. Timing: warm-up, then the median of
``--repeats`` calls with ``block_until_ready``, rotating between two input sets
so caches do not flatter. In the same run the device-to-device copy bandwidth
and the bf16 matmul rate (``--matmul_size``^3 on random data) are measured;
each row gives the bytes a fwd+bwd step must move (each input read once, each
output written once), the achieved GB/s and fraction of copy bandwidth, the
time ratio to dense bf16, and the fraction of the FLOP floor: the dense layer's
3 matmuls, 6 B in L FLOPs, at the measured bf16 rate (the same dense-equivalent
FLOPs for the gather designs, which do only K/in of them). ``--dispatch_csv``
writes one line per timed row, the data behind ``sparsejax.dispatch``.

The MVUE N:M kernels have their own benchmark, ``benchmarks/mvue_cost.py``.

Progress goes to stderr; the tables to stdout and to their section of
``BENCHMARKS.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
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

_time, copy_bandwidth, matmul_rate = (_report.time_median, _report.copy_bandwidth,
                                      _report.matmul_rate)

START_MARKER, END_MARKER = _report.markers("kernels")
write_section = functools.partial(_report.write_section, name="kernels")


@dataclasses.dataclass
class Row:
  out: int
  fan_in: int
  path: str
  ms: float | None
  bytes_moved: int
  note: str = ""
  dtype: str = ""  # "f32" / "bf16"
  rel_err: float | None = None
  status: str = "ok"  # ok, check failed, error, skipped


DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# Relative error against float64 by dtype; "tf32": float32 through the tensor cores at
# XLA's default precision (the tile designs on GPU).
TOLERANCE = {"f32": 1e-4, "tf32": 3e-3, "bf16": 2e-2}
SPARSE_IMPLS = ("xla", "pallas", "xla_tile", "pallas_tile", "auto", "interpret", "interpret_tile")
GPU_ONLY = ("pallas", "pallas_tile")
PATHS = ("dense-bf16", "dense-f32", "xla-f32", "pallas-f32", "pallas-bf16", "xla_tile-f32",
         "xla_tile-bf16", "pallas_tile-f32", "pallas_tile-bf16", "bcoo-f32", "torch-f32",
         "torch-bf16")
CSV_HEADER = "backend,device,batch,in,L,K,dtype,path,ms,rel_err,status"


def parse_paths(names) -> list[tuple[str, str]]:
  """``["pallas-bf16", ...]`` -> ``[("pallas", "bf16"), ...]``; raises on an unknown one."""
  paths = []
  for name in names:
    impl, _, dtype = name.rpartition("-")
    if impl not in ("dense", "bcoo", "torch") + SPARSE_IMPLS or dtype not in DTYPES:
      raise ValueError(f"a path is <impl>-<f32|bf16>, impl one of dense, bcoo, torch, "
                       f"{', '.join(SPARSE_IMPLS)}; got {name!r}")
    paths.append((impl, dtype))
  return paths


def _log(message: str) -> None:
  print(f"[kernels] {message}", file=sys.stderr, flush=True)


def _one_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300].replace("|", "/")


def _sparse_step(impl):
  def loss(x, values, indices):
    y = sj.fixed_fanin_matmul(x, values, indices, impl=impl).astype(jnp.float32)
    return jnp.sum(y ** 2) * 0.5

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
  """Relative error of (dx, dvalues) against float64 on the first ``rows`` outputs.

  Raises ``AssertionError`` above ``tolerance``; the message holds the error.
  """
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
    raise AssertionError(f"check failed: relative error {err:.1e} > {tolerance:.0e}")
  return err


def _tolerance(impl: str, dtype: str) -> float:
  tile = impl.endswith("_tile") or impl == "auto"
  return TOLERANCE["tf32" if dtype == "f32" and tile and jax.default_backend() == "gpu"
                   else dtype]


def check_ragged(impl: str, tolerance: float = 1e-4) -> str:
  """``impl`` against XLA (both gradients) at sizes that are not block multiples.

  Returns a line saying whether it passed (never raises: the timing goes on).
  """
  try:
    for in_features, out, fan_in, batch in ((30, 21, 3, 19), (16, 40, 16, 70), (8, 33, 1, 1),
                                            (768, 1000, 64, 100)):
      layer = sj.FixedFanIn.init(in_features, out, fan_in, key=jax.random.key(out))
      x = jax.random.normal(jax.random.key(batch), (batch, in_features))
      got, want = (_sparse_step(i)(x, layer.values, layer.indices) for i in (impl, "xla"))
      for a, b in zip(got, want):
        err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        if not err < tolerance:
          raise AssertionError(f"at (in, out, K, batch) {(in_features, out, fan_in, batch)}: "
                               f"relative error {err:.1e}")
  except Exception as error:  # reported in the section; the timed rows still run
    return f"ragged-size check of {impl} against xla: FAILED, {_one_line(error)}"
  return f"ragged-size check of {impl} against xla (tolerance {tolerance:.0e}): passed"


def sweep(out: int, fan_in: int, batch: int, in_features: int, repeats: int) -> str:
  """Times each kernel alone over launch settings; returns a markdown table, fastest first."""
  from sparsejax.kernels import fanin
  layers = [sj.FixedFanIn.init(in_features, out, fan_in, key=jax.random.key(i)) for i in range(2)]
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


def _sparse_bytes(nnz: int, batch: int, in_features: int, out: int, item: int,
                  index_item: int = 2) -> int:
  """Bytes of one sparse fwd+bwd: values read twice (fwd, dx) and dvalues written, indices
  read twice (fwd, bwd), x read twice and dx written, y written and g read."""
  return (nnz * (3 * item + 2 * index_item) + 2 * batch * out * item
          + 3 * batch * in_features * item)


def _dispatched(batch: int, in_features: int, out: int, fan_in: int) -> str:
  """What ``impl="auto"`` runs for this shape, when ``sparsejax.dispatch`` can say."""
  try:
    from sparsejax.dispatch import resolve_fanin_impl
    return resolve_fanin_impl("auto", batch=batch, in_features=in_features, out=out,
                              fan_in=fan_in)
  except Exception as error:  # an older dispatch module: say so in the note
    return f"? ({_one_line(error)})"


def _time_sparse(impl: str, dtype_name: str, layers, xs, repeats: int, moved: int,
                 batch: int) -> Row:
  """The row of ``fixed_fanin_matmul(impl=impl)`` in ``dtype_name``: checked, then timed.

  A failed check is timed anyway; the row says so.
  """
  dtype = DTYPES[dtype_name]
  out, fan_in = layers[0].values.shape
  in_features = xs[0].shape[1]
  inputs = [(x.astype(dtype), lay.values.astype(dtype), lay.indices) for x, lay in zip(xs, layers)]
  step = _sparse_step(impl)
  status, err = "ok", None
  try:
    err = _check(step, *inputs[0], min(out, 4096), _tolerance(impl, dtype_name))
    note = f"check rel err {err:.1e}"
  except AssertionError as error:
    note, status = f"CHECK FAILED: {error}", "check failed"
  if impl == "auto":
    note += f"; dispatched to {_dispatched(batch, in_features, out, fan_in)}"
  seconds = _time(step, inputs, repeats)
  return Row(out, fan_in, f"{impl} {dtype_name}", seconds * 1e3, moved, note, dtype_name, err,
             status)


def run(outs, fan_ins, batch: int, in_features: int, repeats: int, max_dense_bytes: float,
        xla_max_out: int, paths=None, torch_rows=()):
  """Rows of every (out, K, path), dense rows first per out; ``paths`` as ``parse_paths``.

  ``torch_rows`` (from ``run_torch_peer``) are merged in at their (out, K).
  """
  paths = parse_paths(PATHS) if paths is None else paths
  backend = jax.default_backend()
  rows = []
  for out in outs:
    w_bytes = in_features * out
    for impl, dtype_name in paths:
      if impl != "dense":
        continue
      dtype = DTYPES[dtype_name]
      name = f"dense {dtype_name}"
      item = jnp.dtype(dtype).itemsize
      size = w_bytes * item
      moved = 3 * size + 3 * batch * out * item + 4 * batch * in_features * item  # w r, dw w
      if 2 * size > max_dense_bytes:
        rows.append(Row(out, 0, name, None, moved, "skipped: dense weight too large here",
                        dtype_name, status="skipped"))
        continue
      _log(f"L={out:,} {name}")
      try:
        inputs = [(jax.random.normal(jax.random.key(i), (batch, in_features), dtype),
                   jax.random.normal(jax.random.key(10 + i), (in_features, out), dtype))
                  for i in range(2)]
        seconds = _time(_dense_step(dtype), inputs, repeats)
        rows.append(Row(out, 0, name, seconds * 1e3, moved, dtype=dtype_name))
        del inputs
      except Exception as error:  # e.g. out of memory: a row, go on
        rows.append(Row(out, 0, name, None, moved, f"error: {_one_line(error)}", dtype_name,
                        status="error"))
    for fan_in in fan_ins:
      layers = [sj.FixedFanIn.init(in_features, out, fan_in, key=jax.random.key(i)) for i in range(2)]
      xs = [jax.random.normal(jax.random.key(20 + i), (batch, in_features)) for i in range(2)]
      nnz = out * fan_in
      for impl, dtype_name in paths:
        if impl in ("dense", "torch"):
          continue
        name = f"{impl} {dtype_name}"
        moved = _sparse_bytes(nnz, batch, in_features, out, jnp.dtype(DTYPES[dtype_name]).itemsize)
        skip = None
        if impl in GPU_ONLY and backend != "gpu":
          skip = ("not run: no GPU (interpret mode is a correctness tool, tested in "
                  "tests/test_kernels_fanin*.py)")
        elif impl == "xla" and out > xla_max_out:
          skip = f"skipped: out > --xla_max_out {xla_max_out:,} (the XLA gather is ~100x slower)"
        elif impl == "bcoo" and (out * fan_in > 64 * 131072 or dtype_name != "f32"):
          skip = "skipped: BCOO's index array is 16 B/nnz, timed for small f32 layers only"
        if skip:
          rows.append(Row(out, fan_in, name, None, moved, skip, dtype_name, status="skipped"))
          continue
        _log(f"L={out:,} K={fan_in} {name}")
        start = time.perf_counter()
        try:
          if impl == "bcoo":
            matrix = jsparse.BCOO.fromdense(layers[0].to_dense())
            seconds = _time(_bcoo_step(xs[0], matrix), [(x, matrix.data) for x in xs], repeats)
            rows.append(Row(out, fan_in, name, seconds * 1e3, moved + nnz * 8, dtype=dtype_name))
          else:
            rows.append(_time_sparse(impl, dtype_name, layers, xs, repeats, moved, batch))
        except Exception as error:  # a kernel that does not compile, out of memory: a row
          rows.append(Row(out, fan_in, name, None, moved, f"error: {_one_line(error)}",
                          dtype_name, status="error"))
        _log(f"  -> {rows[-1].ms if rows[-1].ms is not None else rows[-1].note} "
             f"({time.perf_counter() - start:.1f} s with compiling)")
      del layers
  order = {out: i for i, out in enumerate(outs)}  # the torch rows go after their (out, K)
  return sorted(rows + [r for r in torch_rows if r.out in order],
                key=lambda r: (order[r.out], r.fan_in))


def run_torch_peer(outs, fan_ins, batch: int, in_features: int, repeats: int, dtypes,
                   output: pathlib.Path, timeout: float, python: str = sys.executable):
  """``(rows, about)`` of ``benchmarks/torch_peer.py`` run in its own process (``python``).

  Without torch in that interpreter, or when the peer dies or times out, the
  cases it did not report are rows saying why. ``about``: the peer's device and
  versions, or why it did not run.
  """
  cases = [(out, fan_in, dtype) for out in outs for fan_in in fan_ins for dtype in dtypes]
  why = None
  try:
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True,
                           timeout=120)
    if probe.returncode:
      why = "not run: torch not importable here"
  except (OSError, subprocess.TimeoutExpired) as error:
    why = f"not run: {_one_line(error)}"
  lines = []
  if why is None:
    long = {"f32": "float32", "bf16": "bfloat16"}
    command = [python, str(pathlib.Path(__file__).with_name("torch_peer.py")),
               "--outs", ",".join(map(str, outs)), "--fan_ins", ",".join(map(str, fan_ins)),
               "--batch", str(batch), "--in_features", str(in_features),
               "--dtypes", ",".join(long[d] for d in dtypes), "--repeats", str(repeats),
               "--output", str(output)]
    _log("torch peer: " + " ".join(command))
    try:  # stderr (progress) passes through; the lines come from the file
      done = subprocess.run(command, stdout=subprocess.DEVNULL, timeout=timeout)
      why = None if done.returncode == 0 else f"torch peer exit status {done.returncode}"
    except subprocess.TimeoutExpired:
      why = f"torch peer timed out after {timeout:g} s"
    lines = read_torch_lines(output)
  measured = next((line for line in lines if "versions" in line), None)
  about = (f"{measured['versions']} on {measured['device']}" if measured
           else why or "no case reported")
  return torch_rows(lines, cases, batch, in_features, why), about


def read_torch_lines(path: pathlib.Path) -> list[dict]:
  """The JSON lines ``torch_peer.py`` wrote (a torn last line is dropped)."""
  lines = []
  for text in (path.read_text().splitlines() if path.exists() else []):
    try:
      lines.append(json.loads(text))
    except json.JSONDecodeError:
      pass
  return lines


def torch_rows(lines, cases, batch: int, in_features: int, why: str | None) -> list[Row]:
  """One row per ``(out, K, dtype)`` case: its line's figures, or ``why`` it has none."""
  by_case = {(line["out"], line["fan_in"], {"float32": "f32", "bfloat16": "bf16"}
              .get(line["dtype"], line["dtype"])): line for line in lines}
  rows = []
  for out, fan_in, dtype in cases:
    nnz = out * fan_in
    moved = _sparse_bytes(nnz, batch, in_features, out, jnp.dtype(DTYPES[dtype]).itemsize,
                          index_item=4)  # int32 column indices
    line = by_case.get((out, fan_in, dtype))
    name = f"torch csr {dtype}"
    if line is None or "ms" not in line:
      note = (line or {}).get("error") or why or "not reported by the torch peer"
      status = "skipped" if note.startswith("not run") else "error"
      rows.append(Row(out, fan_in, name, None, moved, note.replace("|", "/"), dtype,
                      status=status))
      continue
    note = (f"check rel err {line['rel_err']:.1e}" if line["check"] == "ok"
            else f"CHECK FAILED: rel err {line['rel_err']:.1e}")
    note += (f"; fwd {line['forward_ms']:.2f} + dx {line['dx_ms']:.2f} ({line['dx_mode']}) + "
             f"dvalues {line['dvalues_ms']:.2f} ms alone")
    if line.get("fallback"):
      note += f"; {line['fallback']}"
    rows.append(Row(out, fan_in, name, line["ms"], moved, note.replace("|", "/"), dtype,
                    line["rel_err"], "ok" if line["check"] == "ok" else "check failed"))
  return rows


def write_dispatch_csv(path: pathlib.Path, rows, batch: int, in_features: int) -> None:
  """One line per row: ``CSV_HEADER``; dense rows have K 0, rows not timed an empty ms."""
  device = jax.devices()[0].device_kind.replace(",", " ")
  lines = [CSV_HEADER]
  for r in rows:
    ms = "" if r.ms is None else f"{r.ms:.4f}"
    err = "" if r.rel_err is None else f"{r.rel_err:.2e}"
    path_name = r.path.rsplit(" ", 1)[0].replace(" ", "_")
    lines.append(f"{jax.default_backend()},{device},{batch},{in_features},{r.out},{r.fan_in},"
                 f"{r.dtype},{path_name},{ms},{err},{r.status}")
  path.write_text("\n".join(lines) + "\n")


def format_table(rows, bandwidth: float, rate: float | None, batch: int,
                 in_features: int) -> str:
  """The markdown table; ``rate`` is the bf16 matmul FLOP/s of the FLOP-floor column."""
  dense = {(r.out): r.ms for r in rows if r.path == "dense bf16"}
  lines = ["| out | K | path | ms / fwd+bwd | MB moved | GB/s | of copy BW | vs dense bf16 "
           "| of FLOP floor | note |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    if r.ms is None:
      lines.append(f"| {r.out:,} | {r.fan_in or '-'} | {r.path} | - | {r.bytes_moved / 1e6:,.0f} "
                   f"| - | - | - | - | {r.note} |")
      continue
    gbs = r.bytes_moved / (r.ms / 1e3) / 1e9
    ratio = "-" if dense.get(r.out) is None else f"{r.ms / dense[r.out]:.2f}x"
    floor = "-" if not rate else f"{6 * batch * in_features * r.out / rate / (r.ms / 1e3):.0%}"
    lines.append(f"| {r.out:,} | {r.fan_in or '-'} | {r.path} | {r.ms:,.2f} | "
                 f"{r.bytes_moved / 1e6:,.0f} | {gbs:,.0f} | {gbs / bandwidth:.0%} | {ratio} | "
                 f"{floor} | {r.note} |")
  return "\n".join(lines)


def render_section(rows, bandwidth: float, command: str, *, rate: float | None = None,
                   matmul_size: int = 0, checks=(), batch: int = 256,
                   in_features: int = 768, torch_about: str = "not run") -> str:
  """The kernels section of BENCHMARKS.md (without markers)."""
  device = jax.devices()[0]
  versions = f"Python {sys.version.split()[0]}, jax {jax.__version__}"
  try:
    import triton
    versions += f", triton {triton.__version__}"
  except ImportError:
    pass
  rate_line = (f"- Measured bf16 matmul rate: {rate / 1e12:,.1f} TFLOP/s ({matmul_size}^3, "
               "random data, median of bursts after warm-up)" if rate
               else "- bf16 matmul rate: not measured")
  return "\n".join([
      "## Fixed fan-in kernels: fwd+bwd time and bandwidth", "",
      f"- Command: `{command}`",
      f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
      f"- Device: {device.device_kind} ({jax.default_backend()}); {platform.platform()}",
      f"- Versions: {versions}",
      f"- Measured copy bandwidth: {bandwidth:,.0f} GB/s (read + write)",
      rate_line,
      *[f"- {line}" for line in checks],
      f"- One step = y, dvalues and dx for loss 0.5 |y|^2; batch {batch}, in {in_features}; "
      "`f32` / `bf16`: activations and weights in that dtype, float32 accumulation; uint16 "
      "indices (torch: int32). `dense f32` runs at JAX's default precision (TF32 on recent "
      "NVIDIA GPUs). MB moved counts each input read once and each output written once. "
      "Of FLOP floor: the dense layer's 3 matmuls, 6 x batch x in x out FLOPs, at the "
      "measured bf16 matmul rate, over the step's time; the tile designs (`*_tile`) do "
      "those FLOPs, the gather designs (`xla`, `pallas`, `torch csr`) only K/in of them "
      "but are given the same dense-equivalent count, so the column compares every path "
      "with the time a dense bf16 layer needs at the matmul rate.",
      "- `torch csr`: PyTorch's cuSPARSE CSR in its own process (`benchmarks/torch_peer.py`): "
      "W^T (out, in) as `torch.sparse_csr_tensor`, forward and dx by `torch.sparse.mm` "
      "(SpMM; dx with the CSC view `W_t.t()`, or a precomputed transposed CSR, as its note "
      "says), dvalues by `torch.sparse.sampled_addmm` (SDDMM); the same construction of "
      f"the random topology, not the same bits. Peer: {torch_about}.", "",
      format_table(rows, bandwidth, rate, batch, in_features), ""])


def define_flags():
  flags.DEFINE_list("outs", ["131072", "670091", "3000000"], "output sizes L")
  flags.DEFINE_list("fan_ins", ["32", "64", "128"], "fan-ins K")
  flags.DEFINE_list("paths", list(PATHS), "paths <impl>-<f32|bf16>, impl one of dense, bcoo, "
                    "torch (the PyTorch CSR peer) or a fixed_fanin_matmul impl "
                    f"({', '.join(SPARSE_IMPLS)})")
  flags.DEFINE_integer("batch", 256, "batch size")
  flags.DEFINE_integer("in_features", 768, "input size")
  flags.DEFINE_integer("repeats", 20, "timed repeats (median)")
  flags.DEFINE_float("max_dense_gib", 8.0, "skip dense weights larger than this")
  flags.DEFINE_integer("xla_max_out", 131072, "time the (slow) XLA gather path only up to this out")
  flags.DEFINE_integer("matmul_size", 0, "n of the n^3 bf16 matmul whose rate is the FLOP floor "
                       "(0: 8192, or 1024 on CPU)")
  flags.DEFINE_string("dispatch_csv", "", f"write one CSV line per row here ({CSV_HEADER})")
  flags.DEFINE_string("torch_jsonl", "", "where the torch peer writes its JSON lines "
                      "('': a temporary file)")
  flags.DEFINE_float("torch_timeout", 300, "seconds before the torch peer's process is killed")
  flags.DEFINE_bool("sweep", False, "time each kernel over launch settings (GPU) and exit")
  flags.DEFINE_string("output", str(pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
                      "file whose kernels section is rewritten ('' to skip)")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.sweep:
    print(sweep(int(FLAGS.outs[0]), int(FLAGS.fan_ins[0]), FLAGS.batch, FLAGS.in_features,
                FLAGS.repeats))
    return
  outs, fan_ins = [int(o) for o in FLAGS.outs], [int(k) for k in FLAGS.fan_ins]
  paths = parse_paths(FLAGS.paths)  # a typo fails here, before anything runs
  torch_dtypes = [dtype for impl, dtype in paths if impl == "torch"]
  rows_of_torch, torch_about = [], "not in --paths"
  if torch_dtypes:  # first, before JAX takes its share of the GPU memory
    with tempfile.TemporaryDirectory() as scratch:
      jsonl = pathlib.Path(FLAGS.torch_jsonl or pathlib.Path(scratch) / "torch_peer.jsonl")
      rows_of_torch, torch_about = run_torch_peer(outs, fan_ins, FLAGS.batch, FLAGS.in_features,
                                     FLAGS.repeats, torch_dtypes, jsonl, FLAGS.torch_timeout)
  _log(f"devices: {jax.devices()}")
  bandwidth = copy_bandwidth(FLAGS.repeats)
  size = FLAGS.matmul_size or (1024 if jax.default_backend() == "cpu" else 8192)
  rate = matmul_rate(size, 10)
  _log(f"copy {bandwidth:,.0f} GB/s, bf16 matmul {rate / 1e12:,.1f} TFLOP/s")
  checks = []
  for impl in dict.fromkeys(impl for impl, _ in paths):
    if (impl in GPU_ONLY and jax.default_backend() == "gpu") or impl == "xla_tile":
      checks.append(check_ragged(impl, _tolerance(impl, "f32")))
      _log(checks[-1])
  command = "python benchmarks/kernels.py " + " ".join(sys.argv[1:])
  rows = []

  def write():  # after every out: a run killed at its time limit keeps what it measured
    section = render_section(rows, bandwidth, command, rate=rate,
                             matmul_size=size, checks=checks, batch=FLAGS.batch,
                             in_features=FLAGS.in_features, torch_about=torch_about)
    if FLAGS.dispatch_csv:
      write_dispatch_csv(pathlib.Path(FLAGS.dispatch_csv), rows, FLAGS.batch, FLAGS.in_features)
    if FLAGS.output:
      write_section(pathlib.Path(FLAGS.output), section)
    return section

  for out in outs:
    rows += run([out], fan_ins, FLAGS.batch, FLAGS.in_features, FLAGS.repeats,
                FLAGS.max_dense_gib * 2**30, FLAGS.xla_max_out, paths, rows_of_torch)
    write()
  print(write())


if __name__ == "__main__":
  define_flags()
  app.run(main)
