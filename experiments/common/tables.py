"""Result tables the experiments share: CSV rows on disk and mean ± std cells."""

from __future__ import annotations

import csv
import os
import pathlib

import numpy as np

__all__ = ["mean_std", "read_csv", "write_csv"]


def read_csv(path: pathlib.Path) -> list[dict]:
  """Rows of a CSV, with numbers parsed (``nan`` included); other cells stay strings."""
  def parse(value: str):
    for kind in (int, float):
      try:
        return kind(value)
      except ValueError:
        pass
    return value

  with open(path, newline="") as f:
    return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
  """Writes ``rows`` (columns of the first row) through a temporary file, so that a kill
  mid-write keeps the old file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def mean_std(values, digits: int, sign: str = "") -> str:
  """``"mean ± sample std"`` of ``values`` to ``digits`` decimals; the mean alone for one value.

  ``sign="+"`` prints the mean's sign (for gaps).
  """
  values = np.asarray(values, float)
  if values.ndim != 1 or not len(values):
    raise ValueError(f"mean_std needs a non-empty 1-D list of values, got shape {values.shape}")
  if len(values) < 2:
    return f"{values.mean():{sign}.{digits}f}"
  return f"{values.mean():{sign}.{digits}f} ± {values.std(ddof=1):.{digits}f}"
