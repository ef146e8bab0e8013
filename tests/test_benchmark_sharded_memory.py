"""benchmarks/sharded_memory.py at toy sizes: per-device memory falls with the label shards."""

from benchmarks import sharded_memory


def test_sharded_memory_measures_and_writes_section(tmp_path):
  sizes = dict(num_labels=20_000, fan_in=8, classifier_in=16, batch=8, num_features=64,
               label_chunk=1024, max_features=4, max_labels=2)
  rows = sharded_memory.run_benchmark(["", "labels:4", "labels:99"], **sizes)
  one, four = rows  # labels:99 is left out: there are 8 devices
  assert [r.devices for r in rows] == [1, 4]
  # The classifier's params and Adam moments dominate the arguments and split 4 ways.
  assert one.classifier_state == 4 * four.classifier_state > 0.8 * one.arguments
  assert four.arguments < 0.35 * one.arguments and four.total < 0.5 * one.total
  section = sharded_memory.render_section(rows, "python benchmarks/sharded_memory.py", **sizes)
  path = tmp_path / "BENCHMARKS.md"
  path.write_text("# Benchmarks\n\nkept above\n\n<!-- other:start -->\nx\n<!-- other:end -->\n")
  sharded_memory.write_section(path, section)
  sharded_memory.write_section(path, section)  # a re-run replaces, never duplicates
  text = path.read_text()
  assert text.count(sharded_memory.START_MARKER) == 1 and "| `labels:4` | 4 |" in text
  assert "kept above" in text and "<!-- other:start -->" in text
