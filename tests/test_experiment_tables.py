"""``experiments.common.tables``: CSV rows round-trip, written atomically; mean ± std cells."""

import math

import pytest

from experiments.common import tables


def test_rows_round_trip_with_numbers_parsed_and_a_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "sub" / "runs.csv"
  rows = [dict(name="a", seed=0, loss=0.25, note=""), dict(name="b", seed=1, loss=math.nan,
                                                           note="x")]
  tables.write_csv(rows, path)
  back = tables.read_csv(path)
  assert back[0] == dict(name="a", seed=0, loss=0.25, note="")
  assert back[1]["seed"] == 1 and math.isnan(back[1]["loss"]) and back[1]["note"] == "x"
  with pytest.raises(ValueError):  # a row with a column the first lacks
    tables.write_csv([dict(name="c"), dict(name="d", extra=1)], path)
  assert tables.read_csv(path)[0] == back[0]


def test_mean_std_is_the_sample_std_and_names_empty_input():
  assert tables.mean_std([1.0, 2.0, 4.0], 2) == "2.33 ± 1.53"
  assert tables.mean_std([0.5, 1.5], 1, "+") == "+1.0 ± 0.7"
  assert tables.mean_std([-0.25], 3, "+") == "-0.250"
  with pytest.raises(ValueError, match="non-empty 1-D"):
    tables.mean_std([], 2)
