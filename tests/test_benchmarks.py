"""The benchmark scripts run at toy sizes and write their own BENCHMARKS.md section."""

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
