"""The demo main job trains end to end on generated data, reproducibly."""

import csv

import pytest

from experiments.fanin_demo import train


def _config(tmp_path, name):
  return train.Config(in_features=32, hidden=64, labels=200, fan_in=8, batch=128, steps=150,
                      learning_rate=1e-2, log_every=50, output_dir=str(tmp_path / name))


def test_demo_loss_falls_and_is_logged(tmp_path):
  config = _config(tmp_path, "a")
  history = train.train(config)
  assert [row["step"] for row in history] == [50, 100, 150]
  assert history[-1]["loss"] < 0.85 * history[0]["loss"], history
  assert history[-1]["accuracy"] > 5 / config.labels  # well above chance (1/200)
  with open(tmp_path / "a" / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert [float(r["loss"]) for r in rows] == [row["loss"] for row in history]


def test_demo_same_seed_same_losses(tmp_path):
  config = _config(tmp_path, "b")
  short = dict(steps=50, log_every=25)
  first = train.train(train.Config(**{**config.__dict__, **short}))
  second = train.train(train.Config(**{**config.__dict__, **short, "output_dir": str(tmp_path / "c")}))
  assert [r["loss"] for r in first] == [r["loss"] for r in second]


@pytest.mark.slow
def test_default_demo_config_learns(tmp_path):
  # The README's main job, as shipped: 1,000 labels, 1,000 steps.
  history = train.train(train.Config(output_dir=str(tmp_path / "default")))
  assert history[-1]["loss"] < 0.75 * history[0]["loss"], history
