"""The benchmark scripts run at toy sizes and write their own BENCHMARKS.md section."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

from benchmarks import fanin_memory


def test_fanin_memory_measures_and_writes_section(tmp_path):
  rows = fanin_memory.run_benchmark([600], [4], in_features=48, batch=8, max_bytes=2**30,
                                    repeats=1, timed=True)
  (row,) = rows
  # Params + Adam moments: 3 x (600 x 4) values vs 3 x (48 x 600) dense weights.
  assert row.sparse.arguments < row.dense.arguments / 4
  assert row.sparse_s > 0 and row.dense_s > 0
  section = fanin_memory.render_section(rows, "python benchmarks/fanin_memory.py", 48, 8, 1.0,
                                        1, True)
  path = tmp_path / "BENCHMARKS.md"
  path.write_text("# Benchmarks\n\nkept above\n\n<!-- other:start -->\nx\n<!-- other:end -->\n")
  fanin_memory.write_section(path, section)
  fanin_memory.write_section(path, section)  # a re-run replaces, never duplicates
  text = path.read_text()
  assert text.count(fanin_memory.START_MARKER) == 1 and "| 600 | 4 |" in text
  assert "kept above" in text and "<!-- other:start -->" in text


def test_kernel_benchmark_checks_times_and_writes_section(tmp_path, monkeypatch):
  from benchmarks import kernels
  original = kernels._sparse_step

  def failing(impl):  # a path that does not compile must become a row, not stop the run
    if impl != "auto":
      return original(impl)

    def step(*args):
      raise RuntimeError("kernel failed to compile")
    return step

  monkeypatch.setattr(kernels, "_sparse_step", failing)
  paths = kernels.parse_paths(["dense-bf16", "xla-f32", "pallas-bf16", "xla_tile-f32",
                               "xla_tile-bf16", "pallas_tile-bf16", "auto-f32"])
  rows = kernels.run([300, 600], [4], batch=8, in_features=32, repeats=1,
                     max_dense_bytes=2**30, xla_max_out=300, paths=paths)
  by = {(r.out, r.path): r for r in rows}
  assert [r.path for r in rows[:2]] == ["dense bf16", "xla f32"]  # dense first per out
  for path in ("xla f32", "xla_tile f32", "xla_tile bf16"):
    assert by[300, path].ms > 0 and "check rel err" in by[300, path].note
  assert by[300, "xla_tile bf16"].rel_err < kernels.TOLERANCE["bf16"]
  assert by[600, "xla f32"].ms is None and "--xla_max_out" in by[600, "xla f32"].note
  for path in ("pallas bf16", "pallas_tile bf16"):  # CPU says so
    assert by[300, path].ms is None and "no GPU" in by[300, path].note
  failed = by[300, "auto f32"]
  assert failed.ms is None and failed.status == "error" and "failed to compile" in failed.note
  assert kernels.check_ragged("xla_tile").endswith("passed")
  rate = kernels.matmul_rate(64, repeats=2)
  assert rate > 0

  csv = tmp_path / "dispatch.csv"
  kernels.write_dispatch_csv(csv, rows, 8, 32)
  lines = csv.read_text().splitlines()
  assert lines[0] == kernels.CSV_HEADER and len(lines) == len(rows) + 1
  assert lines[1].startswith("cpu,") and ",300,0,bf16,dense," in lines[1]

  section = kernels.render_section(rows, 10.0, "python benchmarks/kernels.py", rate=rate,
                                   matmul_size=64, batch=8, in_features=32)
  path = tmp_path / "BENCHMARKS.md"
  kernels.write_section(path, section)
  kernels.write_section(path, section)
  text = path.read_text()
  assert text.count(kernels.START_MARKER) == 1
  assert "of FLOP floor" in text and "bf16 matmul rate" in text


def test_mvue_cost_times_masks_next_to_the_gemm_and_writes_section(tmp_path):
  from benchmarks import mvue_cost
  rows = mvue_cost.run(16, 8, 12, jnp.float32, repeats=1)
  assert {r.pruning for r in rows} == {"none", "1:2 mvue", "2:4 mvue", "2:4 mvue_approx"}
  assert [r.path for r in rows[:3]] == ["dW GEMM: X^T dY", "dW GEMM: X^T dY, bf16 out",
                                        "dX GEMM: dY W"]
  assert all(r.ms > 0 for r in rows)
  section = mvue_cost.render_section(rows, 10.0, 1e9, "python benchmarks/mvue_cost.py",
                                     (16, 8, 12, jnp.float32))
  path = tmp_path / "BENCHMARKS.md"
  mvue_cost.write_section(path, section)
  mvue_cost.write_section(path, section)
  text = path.read_text()
  assert text.count(mvue_cost.START_MARKER) == 1 and "| 2:4 mvue | mask: xla |" in text
  assert "| none | dW GEMM: X^T dY |" in text and "| 1.00x |" in text  # the faster GEMM


def test_torch_peer_without_torch_and_its_rows(tmp_path):
  """No torch here: the peer and kernels.py say so; a peer's line becomes a table row."""
  from benchmarks import kernels, torch_peer
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed: the no-torch path cannot be seen here")
  jsonl = tmp_path / "torch.jsonl"
  assert torch_peer.main(["--outs", "100", "--fan_ins", "4", "--output", str(jsonl)]) == 0
  lines = kernels.read_torch_lines(jsonl)
  assert [line["path"] for line in lines] == ["torch csr f32", "torch csr bf16"]
  assert all("torch not importable" in line["error"] for line in lines)
  rows, about = kernels.run_torch_peer([100], [4], 8, 32, 1, ["f32"], tmp_path / "peer.jsonl",
                                       timeout=60)
  (row,) = rows
  assert row.path == "torch csr f32" and row.ms is None and row.status == "skipped"
  assert "not importable" in row.note and "not importable" in about

  measured = dict(out=100, fan_in=4, dtype="float32", ms=1.5, forward_ms=0.5, dx_ms=0.5,
                  dvalues_ms=0.4, rel_err=2e-7, check="ok", dx_mode="csc")
  failed = dict(out=100, fan_in=4, dtype="bfloat16", error="RuntimeError: no bf16 SDDMM")
  rows = kernels.torch_rows([measured, failed], [(100, 4, "f32"), (100, 4, "bf16"),
                                                 (200, 4, "f32")], 8, 32, "timed out")
  assert rows[0].ms == 1.5 and "dx 0.50 (csc)" in rows[0].note and rows[0].status == "ok"
  assert rows[1].ms is None and "no bf16 SDDMM" in rows[1].note and rows[1].status == "error"
  assert rows[2].ms is None and rows[2].note == "timed out"
  merged = kernels.run([100], [4], batch=8, in_features=32, repeats=1, max_dense_bytes=2**30,
                       xla_max_out=0, paths=kernels.parse_paths(["dense-bf16"]),
                       torch_rows=rows)
  assert [r.path for r in merged] == ["dense bf16", "torch csr f32", "torch csr bf16"]


def test_time_median_queues_a_burst_of_calls_per_sample():
  from benchmarks import _report
  seen = []
  fn = lambda x: seen.append(int(x)) or jnp.asarray(x)
  inputs = [(jnp.int32(0),), (jnp.int32(1),)]
  assert _report.time_median(fn, inputs, repeats=3, burst=4) > 0
  # One warm-up per input set, then 3 samples of 4 calls cycling through the sets.
  assert seen == [0, 1] + [0, 1, 0, 1] + [1, 0, 1, 0] + [0, 1, 0, 1]
  with pytest.raises(ValueError, match="burst >= 1"):
    _report.time_median(fn, inputs, repeats=3, burst=0)


def test_profile_trace_times_a_call_of_the_supar_sweep(tmp_path):
  script = pathlib.Path(__file__).parents[1] / "benchmarks" / "profile_trace.py"
  out = subprocess.run(
      [sys.executable, str(script), "--workload", "byte_lm", "--width", "32",
       "--density", "1/8", "--models", "2", "--lm_steps", "2", "--steps", "1",
       "--trace_dir", str(tmp_path)], capture_output=True, text=True, check=True).stdout
  line = re.search(r"byte_lm width=32 density=1/8 layer=fixed_fanin dtype=bfloat16 models=2 "
                   r"lm_steps=2 on \w+: ([0-9.]+) ms per call, ([0-9.]+) TFLOP/s", out)
  assert line and float(line.group(1)) > 0, out
  assert list(tmp_path.rglob("*.trace.json.gz")), "no profile written"
