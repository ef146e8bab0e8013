"""The PyTorch peer of the fixed fan-in layer: cuSPARSE CSR SpMM + SDDMM, fwd+bwd.

What a PyTorch user would pick for a layer with K inputs per output: the
transposed weight ``W^T`` as a ``torch.sparse_csr_tensor`` of shape (L, in)
with K entries per row, and for one step of loss 0.5 |y|^2 (g = y):

* forward ``y = x @ W`` as ``torch.sparse.mm(W_t, x.T).T`` (SpMM);
* ``dx = g @ W^T`` as ``torch.sparse.mm(W_t.t(), g.T).T``: ``W_t.t()`` is a
  zero-copy CSC view of the same arrays (``--dx_mode csc``), or, with
  ``--dx_mode csr_t`` (also the fallback when the CSC product raises), a CSR
  of W (in, L) whose column order is precomputed once and whose values are
  permuted from ``W_t``'s every step (a training step changes the values);
* ``dvalues = (x^T g)`` at the non-zeros as ``torch.sparse.sampled_addmm(W_t,
  g.T, x, beta=0)`` (SDDMM).

The topology is built like ``sparsejax.FixedFanIn.init`` builds its own (K
distinct uniform columns per row, sorted), not bit for bit the same. Each
case is first checked against float64 on the layer's first ``--check_rows``
rows, then timed (CUDA events on GPU; median of ``--repeats`` after
``--warmup``). One JSON line per (case, dtype) goes to stdout and, flushed as
it comes, to ``--output``; a case that fails is a line with its ``error``.
Without torch every line says so: this script never needs torch to run.

Run as its own process (``benchmarks/kernels.py`` spawns it), so that JAX and
PyTorch never share the GPU's memory:

  python benchmarks/torch_peer.py --outs 131072 --fan_ins 32,64 --output /tmp/torch.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

PATH = "torch csr"  # the rows' path in benchmarks/kernels.py's table: "torch csr f32" ...
SHORT = {"float32": "f32", "bfloat16": "bf16"}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # relative error against float64


def _one_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _log(message: str) -> None:
  print(f"[torch_peer] {message}", file=sys.stderr, flush=True)


def topology(torch, rows: int, in_features: int, fan_in: int, device, seed: int, chunk=65536):
  """int32 ``(crow, col)`` of a CSR with ``fan_in`` distinct sorted columns per row."""
  generator = torch.Generator(device=device).manual_seed(seed)
  cols = []
  for start in range(0, rows, chunk):  # chunks: a (rows, in) draw at 3M rows would be 9 GB
    n = min(chunk, rows - start)
    scores = torch.rand(n, in_features, device=device, generator=generator)
    cols.append(scores.topk(fan_in, dim=1).indices.sort(dim=1).values.to(torch.int32))
  crow = torch.arange(0, (rows + 1) * fan_in, fan_in, dtype=torch.int32, device=device)
  return crow, torch.cat(cols).reshape(-1)


class Layer:
  """``W_t`` (L, in) as CSR, with what the chosen dx product needs."""

  def __init__(self, torch, crow, col, values, in_features: int, dx_mode: str):
    self.torch, self.dx_mode = torch, dx_mode
    rows = crow.numel() - 1
    self.shape = (rows, in_features)
    self.crow, self.col = crow, col
    self.w_t = torch.sparse_csr_tensor(crow, col, values, size=self.shape)
    if dx_mode == "csr_t":
      # W (in, L) as CSR: non-zeros sorted by (column of W_t, row of W_t), done once.
      row = torch.repeat_interleave(torch.arange(rows, device=col.device),
                                    (crow[1:] - crow[:-1]).to(torch.int64))
      self.perm = torch.argsort(col.to(torch.int64) * rows + row)
      counts = torch.bincount(col.to(torch.int64), minlength=in_features)
      self.crow_t = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
      self.col_t = row[self.perm].to(torch.int32)

  def w(self):
    """W = W_t^T (in, L) for the dx product."""
    if self.dx_mode == "csc":
      return self.w_t.t()
    return self.torch.sparse_csr_tensor(self.crow_t, self.col_t, self.w_t.values()[self.perm],
                                        size=self.shape[::-1])


def step(torch, layer: Layer, x):
  """``(y, dx, dvalues)`` of loss 0.5 |y|^2 for ``y = x @ W``."""
  y = torch.sparse.mm(layer.w_t, x.t()).t()
  g = y
  dx = torch.sparse.mm(layer.w(), g.t()).t()
  dvalues = torch.sparse.sampled_addmm(layer.w_t, g.t(), x, beta=0.0).values()
  return y, dx, dvalues


def check(torch, layer: Layer, x, rows: int) -> float:
  """Max relative error of (y, dx, dvalues) against float64 on the first ``rows`` rows."""
  nnz = int(layer.crow[rows])
  sub = Layer(torch, layer.crow[:rows + 1].clone(), layer.col[:nnz].clone(),
              layer.w_t.values()[:nnz].clone(), layer.shape[1], layer.dx_mode)
  got = [t.double().cpu().numpy() for t in step(torch, sub, x)]
  crow, col = sub.crow.cpu().numpy(), sub.col.cpu().numpy().astype(np.int64)
  values = sub.w_t.values().double().cpu().numpy()
  row = np.repeat(np.arange(rows), np.diff(crow))
  w_t = np.zeros((rows, layer.shape[1]))
  np.add.at(w_t, (row, col), values)
  x64 = x.double().cpu().numpy()
  y = x64 @ w_t.T
  want = [y, y @ w_t, (y.T @ x64)[row, col]]
  return max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(got, want))


def timed(torch, fn, warmup: int, repeats: int) -> float:
  """Median milliseconds of ``fn()`` (CUDA events on GPU) after ``warmup`` calls."""
  cuda = torch.cuda.is_available()
  for _ in range(warmup):
    fn()
  if cuda:
    torch.cuda.synchronize()
  ms = []
  for _ in range(repeats):
    if cuda:
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      fn()
      end.record()
      torch.cuda.synchronize()
      ms.append(start.elapsed_time(end))
    else:
      start = time.perf_counter()
      fn()
      ms.append((time.perf_counter() - start) * 1e3)
  return statistics.median(ms)


def measure(torch, out: int, fan_in: int, dtype_name: str, args, device) -> dict:
  """One case's result line: step ms and its parts, the check, the dx product used."""
  dtype = getattr(torch, dtype_name)
  crow, col = topology(torch, out, args.in_features, fan_in, device, seed=out + fan_in)
  generator = torch.Generator(device=device).manual_seed(1)
  values = (torch.randn(col.numel(), device=device, generator=generator) / fan_in**0.5).to(dtype)
  x = torch.randn(args.batch, args.in_features, device=device, generator=generator).to(dtype)
  result = {}
  for dx_mode in ([args.dx_mode] if args.dx_mode == "csr_t" else ["csc", "csr_t"]):
    try:
      layer = Layer(torch, crow, col, values, args.in_features, dx_mode)
      err = check(torch, layer, x, min(out, args.check_rows))
      break
    except Exception as error:  # the CSC product may be unsupported: fall back to csr_t
      result.setdefault("fallback", f"dx_mode {dx_mode}: {_one_line(error)}")
      if dx_mode == "csr_t":
        raise
  result.update(dx_mode=dx_mode, rel_err=err, tolerance=TOLERANCE[dtype_name],
                check="ok" if err <= TOLERANCE[dtype_name] else "failed")
  g = torch.sparse.mm(layer.w_t, x.t()).t()  # a cotangent for the parts' timings
  result["ms"] = timed(torch, lambda: step(torch, layer, x), args.warmup, args.repeats)
  result["forward_ms"] = timed(torch, lambda: torch.sparse.mm(layer.w_t, x.t()).t(),
                               args.warmup, args.repeats)
  result["dx_ms"] = timed(torch, lambda: torch.sparse.mm(layer.w(), g.t()).t(), args.warmup,
                          args.repeats)
  result["dvalues_ms"] = timed(
      torch, lambda: torch.sparse.sampled_addmm(layer.w_t, g.t(), x, beta=0.0).values(),
      args.warmup, args.repeats)
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--outs", default="131072,670091,3000000", help="layer sizes L")
  parser.add_argument("--fan_ins", default="32,64,128", help="fan-ins K")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--in_features", type=int, default=768)
  parser.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16")
  parser.add_argument("--repeats", type=int, default=20, help="timed calls (median)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
  parser.add_argument("--check_rows", type=int, default=4096, help="rows of the float64 check")
  parser.add_argument("--dx_mode", choices=["csc", "csr_t"], default="csc",
                      help="dx product: CSC view of W_t (falls back to csr_t) or transposed CSR")
  parser.add_argument("--device", default="auto", help="'auto' (cuda if available), cuda, cpu")
  parser.add_argument("--output", default="", help="JSON lines file ('' : stdout only)")
  args = parser.parse_args(argv)
  sink = open(args.output, "w") if args.output else None
  base = dict(batch=args.batch, in_features=args.in_features)
  try:
    import torch
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    base.update(device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or "cpu"),
                versions=f"Python {platform.python_version()}, torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda}")
    missing = None
  except Exception as error:  # no torch here: every case says so, the caller goes on
    torch, missing = None, f"not run: torch not importable ({_one_line(error)})"
  for out in (int(o) for o in args.outs.split(",")):
    for fan_in in (int(k) for k in args.fan_ins.split(",")):
      for dtype_name in args.dtypes.split(","):
        line = dict(base, path=f"{PATH} {SHORT[dtype_name]}", dtype=dtype_name, out=out,
                    fan_in=fan_in)
        if missing:
          line["error"] = missing
        else:
          _log(f"L={out:,} K={fan_in} {dtype_name}")
          try:
            line.update(measure(torch, out, fan_in, dtype_name, args, device))
          except Exception as error:  # an unsupported dtype, out of memory: a row, go on
            line["error"] = _one_line(error)
          if device.type == "cuda":
            torch.cuda.empty_cache()
          _log(f"  -> {line.get('ms', line.get('error'))}")
        text = json.dumps(line)
        print(text, flush=True)
        if sink:
          sink.write(text + "\n")
          sink.flush()
  if sink:
    sink.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
