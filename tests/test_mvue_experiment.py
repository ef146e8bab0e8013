"""The N:M-gradient experiment runs end to end on a tiny configuration."""

import csv

import numpy as np
import pytest

from experiments.mvue import train as mvue_grad

_TINY = mvue_grad.Config(width=32, depth=1, heads=2, context=32, batch=16, steps=30,
                         log_every=10, warmup=5, train_bytes=200_000, val_bytes=50_000,
                         val_batches=2)


def test_tiny_run_writes_curves_plot_and_table(tmp_path):
  rows = mvue_grad.run(_TINY, ["dense", "mvue:2:4", "greedy:1:2"], progress=False)
  assert [(r["method"], r["step"]) for r in rows] == [
      (m, s) for m in ("dense", "mvue:2:4", "greedy:1:2") for s in (10, 20, 30)]
  dense = [r["train_loss"] for r in rows if r["method"] == "dense"]
  assert dense[-1] < dense[0] < np.log(256) + 0.5  # it learns
  table = mvue_grad.write_outputs(rows, _TINY, tmp_path, "python -m experiments.mvue.train",
                                  1.0)
  assert "| mvue:2:4 | 1 |" in table and "+0.0000" in table
  with open(tmp_path / "curves.csv") as f:
    assert len(list(csv.DictReader(f))) == len(rows)
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  assert "Command: `python -m experiments.mvue.train`" in (tmp_path / "RESULTS.md").read_text()


def test_same_seed_same_curve_and_pruning_changes_it():
  corpus = mvue_grad.stdlib_byte_corpus(max_train_bytes=200_000, max_val_bytes=50_000)
  short = mvue_grad.Config(**{**_TINY.__dict__, "steps": 10, "log_every": 5})
  first = mvue_grad.train_one(short, "mvue:1:2", 0, corpus, progress=False)
  again = mvue_grad.train_one(short, "mvue:1:2", 0, corpus, progress=False)
  dense = mvue_grad.train_one(short, "dense", 0, corpus, progress=False)
  assert [r["train_loss"] for r in first] == [r["train_loss"] for r in again]
  assert [r["train_loss"] for r in first] != [r["train_loss"] for r in dense]


def test_bad_method_names():
  with pytest.raises(ValueError, match="name:n:m"):
    mvue_grad.parse_method("mvue")
  with pytest.raises(ValueError, match="supports 1:2, 2:4"):
    mvue_grad.parse_method("mvue:1:4")
