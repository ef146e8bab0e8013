"""The N:M-gradient experiment's pipeline on tiny configurations: training, resume, variance, report."""

import csv
import dataclasses

import jax
import numpy as np
import pytest

from experiments.mvue import report
from experiments.mvue import train as mvue_grad
from experiments.mvue.variance import formula_variance, inclusion_probabilities
from tests import _reference

_TINY = mvue_grad.Config(width=16, depth=1, heads=2, context=16, batch=8, steps=10, log_every=5,
                         warmup=2, train_bytes=100_000, val_bytes=20_000, val_batches=2)
_CORPUS = dict(max_train_bytes=_TINY.train_bytes, max_val_bytes=_TINY.val_bytes)


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_resume_skips_finished_pairs_seed_major_and_partial_results_render(tmp_path):
  methods = ["dense", "mvue:2:4"]
  assert mvue_grad.run(_TINY, methods, out_dir=tmp_path, progress=False) == [
      ("dense", 0), ("mvue:2:4", 0)]
  # Partial results (one seed) render from the CSVs alone.
  assert "| mvue:2:4 | 1 |" in report.render(tmp_path)
  two_seeds = dataclasses.replace(_TINY, seeds=2)
  assert mvue_grad.config_id(two_seeds) == mvue_grad.config_id(_TINY)
  assert mvue_grad.run(two_seeds, methods, out_dir=tmp_path, progress=False) == [
      ("dense", 1), ("mvue:2:4", 1)]
  assert mvue_grad.run(two_seeds, methods, out_dir=tmp_path, progress=False) == []
  runs, curves = _rows(tmp_path / "runs.csv"), _rows(tmp_path / "curves.csv")
  assert [(r["method"], r["seed"]) for r in runs] == [
      ("dense", "0"), ("mvue:2:4", "0"), ("dense", "1"), ("mvue:2:4", "1")]
  assert len(curves) == 4 * 2
  dense = [float(r["train_loss"]) for r in curves if r["method"] == "dense" and r["seed"] == "0"]
  assert dense[-1] < dense[0] < np.log(256) + 0.5  # it learns
  table = report.render(tmp_path)
  assert "| mvue:2:4 | 2 |" in table and "| dense | 2 |" in table and "+0.0000 ± 0.0000" in table
  assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_time_budget_skips_runs_that_would_not_finish(tmp_path):
  assert mvue_grad.run(_TINY, ["dense"], out_dir=tmp_path, time_budget_s=0, progress=False) == []
  assert not (tmp_path / "runs.csv").exists()
  # A method not yet run in this invocation is estimated from its own earlier runs.
  recorded = [dict(method="mvue:2:4", seconds="17.0"), dict(method="mvue:2:4", seconds="8.0"),
              dict(method="greedy:2:4", seconds="66.0")]
  assert mvue_grad.expected_seconds("mvue:2:4", {}, recorded) == 17.0
  assert mvue_grad.expected_seconds("mvue:2:4", {"mvue:2:4": 9.0}, recorded) == 9.0
  assert mvue_grad.expected_seconds("dense", {"mvue:1:2": 70.0}, recorded) == 70.0
  assert mvue_grad.expected_seconds("dense", {}, []) == 0.0


def test_variance_on_a_real_captured_gradient_matches_the_formula():
  config = dataclasses.replace(_TINY, variance_draws=64)
  trainer = mvue_grad.trainer_for(config, "dense")
  params, rest, _ = trainer.init(0)
  train = jax.numpy.asarray(mvue_grad.stdlib_byte_corpus(**_CORPUS).train)
  rows = mvue_grad.variance_rows(config, trainer, params, rest, train, step=0,
                                 methods=["mvue:1:2", "mvue:2:4", "greedy:2:4"])
  layers = {r["layer"] for r in rows}
  assert layers == {"blocks/0/qkv", "blocks/0/proj", "blocks/0/fc", "blocks/0/out", "head"}
  for r in rows:
    assert r["dy_norm2"] > 0
    if r["method"] == "greedy:2:4":
      assert r["formula"] is None and 0 < r["relative"] < 1
    else:
      # 64 draws over >= 512 groups: the Monte-Carlo error of the ratio is a few percent.
      assert r["ratio"] == pytest.approx(1.0, abs=0.1), r
      assert 0 < r["relative"] < 2


@pytest.mark.parametrize("n,method", [(1, "mvue"), (2, "mvue"), (2, "mvue_approx")])
def test_formula_uses_the_reference_inclusion_probabilities(n, method):
  rng = np.random.default_rng(0)
  groups = rng.standard_normal((200, 2 * n)) * rng.choice([0, 1e-3, 1, 30], (200, 2 * n))
  reference = (_reference.mvue_probabilities if method == "mvue" else
               lambda x, n: _reference.approx_probabilities(x) if np.abs(x).sum() else 0 * x)
  expected = np.stack([reference(g, n) for g in groups])
  got = inclusion_probabilities(jax.numpy.asarray(groups, jax.numpy.float32), n=n,
                                method=method)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  total = np.where(expected > 0, groups**2 * (1 / np.where(expected > 0, expected, 1) - 1), 0).sum()
  # Groups along axis 0, as for dW = X^T dY.
  assert float(formula_variance(jax.numpy.asarray(groups.reshape(-1, 1)), n=n, m=2 * n,
                                method=method)) == pytest.approx(total, rel=1e-4)


def test_same_seed_same_curve_and_pruning_changes_it():
  corpus = mvue_grad.stdlib_byte_corpus(**_CORPUS)
  mvue = mvue_grad.trainer_for(_TINY, "mvue:2:4")
  first, _ = mvue_grad.train_one(_TINY, mvue, 0, corpus, progress=False)
  again, _ = mvue_grad.train_one(_TINY, mvue, 0, corpus, progress=False)
  dense, _ = mvue_grad.train_one(_TINY, mvue_grad.trainer_for(_TINY, "dense"), 0, corpus,
                                 progress=False)
  assert [r["train_loss"] for r in first] == [r["train_loss"] for r in again]
  assert [r["train_loss"] for r in first] != [r["train_loss"] for r in dense]


@pytest.mark.slow
def test_all_methods_bf16_with_variance_checkpoints(tmp_path):
  config = dataclasses.replace(_TINY, dtype="bfloat16", variance_steps=(0, 10),
                               variance_draws=8)
  assert len(mvue_grad.run(config, mvue_grad.METHODS, out_dir=tmp_path, progress=False)) == 6
  # Another configuration in the same folder trains anew; the report shows one config.
  assert mvue_grad.run(_TINY, ["dense"], out_dir=tmp_path, progress=False) == [("dense", 0)]
  assert "| dense | 1 |" in report.render(tmp_path, mvue_grad.config_id(_TINY))
  assert "| greedy:1:2 | 1 |" in report.render(tmp_path, mvue_grad.config_id(config))
  variance = _rows(tmp_path / "variance.csv")
  assert {int(r["step"]) for r in variance} == {0, 10}
  report.render(tmp_path, mvue_grad.config_id(config))
  assert "## Variance" in (tmp_path / "RESULTS.md").read_text()


def test_bad_method_names_and_variance_steps(tmp_path):
  with pytest.raises(ValueError, match="name:n:m"):
    mvue_grad.parse_method("mvue")
  with pytest.raises(ValueError, match="supports 1:2, 2:4"):
    mvue_grad.parse_method("mvue:1:4")
  with pytest.raises(ValueError, match="--variance_steps"):
    mvue_grad.run(dataclasses.replace(_TINY, variance_steps=(3,)), ["dense"], out_dir=tmp_path)
