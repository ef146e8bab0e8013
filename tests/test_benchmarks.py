"""The benchmark scripts run at toy sizes and write their own BENCHMARKS.md section."""

import jax.numpy as jnp

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


def test_kernel_benchmark_checks_times_and_writes_section(tmp_path):
  from benchmarks import kernels
  rows = kernels.run([300], [4], batch=8, in_features=32, repeats=1, max_dense_bytes=2**30,
                     xla_max_out=300)
  paths = {r.path: r for r in rows}
  assert paths["xla"].ms > 0 and "check rel err" in paths["xla"].note
  assert paths["pallas"].ms is None and "no GPU" in paths["pallas"].note  # CPU says so
  nm_rows = kernels.run_nm(16, 8, 12, jnp.float32, repeats=1)
  assert {r.pruning for r in nm_rows} == {"1:2 mvue", "2:4 mvue", "2:4 mvue_approx"}
  assert all(r.ms > 0 for r in nm_rows if "xla" in r.path)
  section = kernels.render_section(rows, 10.0, "python benchmarks/kernels.py", nm_rows,
                                   (16, 8, 12, "float32"))
  path = tmp_path / "BENCHMARKS.md"
  kernels.write_section(path, section)
  kernels.write_section(path, section)
  text = path.read_text()
  assert text.count(kernels.START_MARKER) == 1 and "| 2:4 mvue | mask: xla |" in text
