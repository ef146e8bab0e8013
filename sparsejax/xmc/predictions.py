"""Top-k predictions as a file that external metric tools read (pyxclib, napkinxc).

The format is the Extreme Classification Repository's sparse score matrix, in
text: a header line ``N L`` (points, labels), then one line per point with its
predicted labels, best first, as ``label:score`` pairs separated by spaces
(zero-based label ids; each score the shortest decimal that reads back to the
same float32). pyxclib's ``xclib.data.data_utils.read_sparse_file``
reads it as an ``N x L`` CSR matrix of scores; ranking by score gives back the
order of the line (ties keep the file's order here, and the order is the
trainer's: higher score first, lower id first among equal scores).
"""

from __future__ import annotations

import os

import numpy as np

from sparsejax.data.xmc import XMCFormatError

__all__ = ["read_predictions", "write_predictions"]


def write_predictions(path: str | os.PathLike, ids, scores, *, num_labels: int) -> None:
  """Writes ``(N, k)`` predicted label ids and their scores, best first per row.

  Arguments:
    path: the file to write.
    ids: ``(N, k)`` ints in ``[0, num_labels)``, distinct within a row.
    scores: ``(N, k)`` floats, non-increasing within a row (NaN is refused).
    num_labels: ``L``, the header's second number.
  """
  ids, scores = np.asarray(ids), np.asarray(scores, np.float32)
  if ids.ndim != 2 or ids.shape != scores.shape:
    raise ValueError(f"ids and scores must both be (N, k), got {ids.shape} and {scores.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be integers, got {ids.dtype}")
  if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
    raise ValueError(f"ids must be in [0, {num_labels}), got {ids.min()}..{ids.max()}")
  if np.isnan(scores).any():
    raise ValueError("scores hold NaN: the model's outputs are not finite")
  if (np.diff(scores, axis=1) > 0).any():
    raise ValueError("scores must be non-increasing within a row (best first)")
  with open(path, "w") as f:
    f.write(f"{ids.shape[0]} {num_labels}\n")
    for row_ids, row_scores in zip(ids.tolist(), scores):
      f.write(" ".join(f"{i}:{s}" for i, s in zip(row_ids, row_scores)) + "\n")


def read_predictions(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
  """Reads a file of ``write_predictions``: ``(ids, scores, num_labels)``.

  Every line must hold the same number ``k`` of pairs.

  Returns:
    ``(N, k)`` int64 ids, ``(N, k)`` float32 scores, and ``L``.
  """
  with open(path) as f:
    lines = f.read().split("\n")
  if not lines[-1] == "":
    raise XMCFormatError(path, len(lines), "the last line has no newline: the file looks cut "
                         "short")
  header = lines[0].split()
  if len(header) != 2 or not all(h.isdigit() for h in header):
    raise XMCFormatError(path, 1, f"header must be 'N L', got {lines[0]!r}")
  num_points, num_labels = map(int, header)
  rows = lines[1:-1]
  if len(rows) != num_points:
    raise XMCFormatError(path, len(lines), f"header says N = {num_points}, the file has "
                         f"{len(rows)} rows")
  ids, scores = [], []
  for number, line in enumerate(rows, start=2):
    try:
      pairs = [pair.split(":") for pair in line.split()]
      ids.append([int(i) for i, _ in pairs])
      scores.append([float(s) for _, s in pairs])
    except ValueError:
      raise XMCFormatError(path, number, f"expected 'label:score' pairs, got {line[:80]!r}") \
          from None
    if len(ids[-1]) != len(ids[0]):
      raise XMCFormatError(path, number, f"{len(ids[-1])} pairs, the first row has "
                           f"{len(ids[0])}")
    if ids[-1] and (min(ids[-1]) < 0 or max(ids[-1]) >= num_labels):
      raise XMCFormatError(path, number, f"a label id is outside [0, {num_labels})")
  k = len(ids[0]) if ids else 0
  return (np.asarray(ids, np.int64).reshape(num_points, k),
          np.asarray(scores, np.float32).reshape(num_points, k), num_labels)
