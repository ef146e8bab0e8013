"""benchmarks/xmc_trainer.py runs the trainer's step at toy sizes and writes its section."""

import pathlib
import subprocess
import sys

import pytest

from benchmarks import xmc_trainer

ROOT = pathlib.Path(__file__).parents[1]
TOY = dict(warmup=1, steps=3, xla_steps=3, batch_size=32, label_chunk=512, set_interval=2,
           timeout=120)


def test_variant_names():
  assert xmc_trainer.parse_variant("dense") == (0, "auto", "")
  assert xmc_trainer.parse_variant("k64-pallas_tile") == (64, "pallas_tile", "random")
  assert xmc_trainer.parse_variant("k128-auto-rigl") == (128, "auto", "rigl")
  for bad in ("k0-xla", "k64-tile", "k64-xla-set", "dense-rigl"):
    with pytest.raises(ValueError):
      xmc_trainer.parse_variant(bad)


def test_xmc_trainer_benchmark_times_skips_and_writes_section(tmp_path):
  path = tmp_path / "BENCHMARKS.md"
  path.write_text("# Benchmarks\n\nkept above\n")
  # The command line, as on the GPU: one process per variant, the section written.
  flags = [f"--{name}={value}" for name, value in TOY.items()]
  subprocess.run([sys.executable, str(ROOT / "benchmarks" / "xmc_trainer.py"), "--labels=2000",
                  "--variants=dense,k64-xla,k64-pallas,k16-xla_tile-rigl", f"--output={path}",
                  *flags],
                 check=True, timeout=300)
  rows = {row["variant"]: row for row in xmc_trainer.read_rows(path)}
  dense, sparse, pallas = rows["dense"], rows["k64-xla"], rows["k64-pallas"]
  rigl = rows["k16-xla_tile-rigl"]
  for row in (dense, sparse, rigl):
    assert "error" not in row and row["done"] and row["peak_kind"] == "RSS"
    assert row["compile_s"] > 0 and row["compiled"]["argument"] > 0
  assert dense["classifier_params"] == 2000 * 768 + 2000
  assert sparse["classifier_params"] == 2000 * 64 + 2000
  # Timed updates t = 2, 3, 4 with SET every 2: the dense model has no SET step.
  assert len(dense["plain_s"]) == 3 and dense["set_s"] == []
  assert len(sparse["plain_s"]) == 1 and len(sparse["set_s"]) == 2
  assert all(s > 0 for s in dense["plain_s"] + sparse["plain_s"] + sparse["set_s"])
  # RigL on the tile path: the trainer's two steps (plain, rewiring), resolved settings.
  assert len(rigl["plain_s"]) == 1 and len(rigl["set_s"]) == 2
  assert rigl["dispatched"] == "xla_tile" and "compiled_rewire" in rigl
  assert rigl["config"] == dict(regrowth="rigl", compute_dtype="float32", label_chunk=512)
  assert pallas["skipped"] == xmc_trainer.PALLAS_ON_CPU
  text = path.read_text()
  assert text.count(xmc_trainer.START_MARKER) == text.count(xmc_trainer.END_MARKER) == 1
  assert "kept above" in text and "| 2,000 | dense | - | - | float32 | 1,538,000 |" in text
  assert "| 2,000 | fixed fan-in, RigL | xla_tile | 16 | float32 | 34,000 |" in text
  assert "(2 RigL)" in text and "| 1.00x |" in text  # the dense row's own ratio
  assert f"{xmc_trainer.PALLAS_ON_CPU} |" in text

  # --merge: a second run replaces its own rows and keeps the others; a failure is a row.
  xmc_trainer.run([2000], ["k64-pallas", "k8-xla"], **{**TOY, "label_chunk": -1},
                  command="second", output=path, merge=True)
  rows = xmc_trainer.read_rows(path)
  assert [row["variant"] for row in rows] == ["dense", "k8-xla", "k16-xla_tile-rigl", "k64-xla",
                                              "k64-pallas"]
  assert [row["command"] for row in rows][3:] == [rows[0]["command"], "second"]
  assert "label_chunk" in rows[1]["error"]
  text = path.read_text()
  assert text.count(xmc_trainer.START_MARKER) == 1 and "- Run 2: `second`" in text
