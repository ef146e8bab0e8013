"""Extreme multi-label classification (XMC) data: container, readers, writers, batching.

Formats (Extreme Classification Repository; ``docs/methods.md``, "XMC data and metrics"):

- **BoW**: a header line ``N D L`` (points, features, labels), then one line per
  point, ``l1,l2,... f:v f:v ...``, with zero-based ids. A point without labels
  starts with whitespace or directly with its first ``f:v`` pair; a point without
  labels and features is an empty line.
- **Raw text**: a text file with one document per line (UTF-8), and a label file
  with one line per document holding its comma-separated zero-based label ids
  (``3,17,42``; an empty line means no labels), as in the repository's raw-text
  variants.

Every reader checks every line and raises ``XMCFormatError`` (a ``ValueError``)
whose message starts with ``file:line:`` (1-based). Nothing is skipped, clamped
or truncated. Ids inside one point are returned sorted; a point that repeats a
label or feature id is an error. Every line, the last included, must end with a
newline, as the repository's files do: a file cut short mid-value or inside a
label list otherwise parses as a shorter, valid line. A BoW header must have
``N >= 1`` and a raw-text split at least one document.

Train/test policy (``check_train_test``, run before training): the model's input
and output sizes are the training set's ``D`` and ``L``, so a test set whose
``num_features`` or ``num_labels`` differs (more: ids the model cannot score;
fewer: a mismatched output size) is refused, never remapped or cut; the two
headers must agree except in ``N``. A training set without points, labels or
features and a test set without points or labels are refused too.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

__all__ = [
  "XMCDataset", "XMCFormatError", "bow_header", "iter_bow", "read_bow", "write_bow",
  "read_raw_text", "write_raw_text", "hash_tokenize", "pad_tokens", "pad_points",
  "epoch_order", "steps_per_epoch", "batches", "check_train_test", "split_off",
]

_INT = r"[0-9]+"
_FLOAT = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_LABELS_RE = re.compile(rf"{_INT}(?:,{_INT})*", re.ASCII)
_FEATURES_RE = re.compile(rf"(?:\s+{_INT}:{_FLOAT})*\s*", re.ASCII)
_FLOAT_RE = re.compile(_FLOAT, re.ASCII)
_ROWS_PER_BLOCK = 65_536  # points collected before their arrays are concatenated
_INT32_MAX = int(np.iinfo(np.int32).max)


class XMCFormatError(ValueError):
  """A malformed line in an XMC data file.

  The message is ``"{path}:{line}: {problem}"``; the parts are also attributes.
  """

  def __init__(self, path: str | os.PathLike, line: int, problem: str):
    self.path, self.line, self.problem = os.fspath(path), line, problem
    super().__init__(f"{self.path}:{line}: {problem}")


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
  """``value`` as an ``int``; refuses bools, non-integers and values outside ``[low, high]``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if value < low or (high is not None and value > high):
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
  return int(value)


def _int_array(name: str, x, ndim: int = 1) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.integer) or (x.size == 0 and x.dtype == np.float64)):
    raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")
  return x


def _check_ids_in_rows(name: str, indptr: np.ndarray, ids: np.ndarray, bound: int):
  """Checks ids in [0, bound) and strictly increasing inside each CSR row."""
  if ids.size == 0:
    return
  low, high = int(ids.min()), int(ids.max())
  if low < 0 or high >= bound:
    bad = low if low < 0 else high
    row = int(np.searchsorted(indptr, np.flatnonzero(ids == bad)[0], side="right")) - 1
    raise ValueError(f"{name}: id {bad} in row {row} is outside [0, {bound})")
  # Position j > 0 continues the row of j - 1 unless a row starts at j.
  same_row = np.ones(ids.size - 1, bool)
  starts = indptr[1:-1]
  same_row[starts[(starts > 0) & (starts < ids.size)] - 1] = False
  bad = np.flatnonzero(same_row & (np.diff(ids.astype(np.int64)) <= 0))
  if bad.size:
    row = int(np.searchsorted(indptr, bad[0] + 1, side="right")) - 1
    raise ValueError(f"{name}: ids in row {row} are not strictly increasing "
                     f"({int(ids[bad[0]])} then {int(ids[bad[0] + 1])}); rows must be "
                     "sorted and must not repeat an id")


def _check_indptr(name: str, indptr: np.ndarray, nnz: int):
  if indptr.size == 0 or indptr[0] != 0:
    raise ValueError(f"{name} must start with 0, got {indptr[:1].tolist()}")
  if indptr[-1] != nnz:
    raise ValueError(f"{name} must end with the number of ids {nnz}, got {int(indptr[-1])}")
  if np.any(np.diff(indptr) < 0):
    raise ValueError(f"{name} must be non-decreasing")


@dataclasses.dataclass(frozen=True, eq=False)
class XMCDataset:
  """Sparse features and label sets of ``N`` points, in CSR form (numpy arrays).

  Point ``i`` has features ``feature_ids[feature_indptr[i]:feature_indptr[i+1]]``
  with values ``feature_values[...]`` of the same slice, and labels
  ``label_ids[label_indptr[i]:label_indptr[i+1]]``. Ids inside a row are strictly
  increasing (sorted, no repeats). ``__post_init__`` converts integer arrays to
  the dtypes below and raises ``ValueError`` for anything inconsistent.

  Attributes:
    feature_indptr: ``(N+1,)`` int64.
    feature_ids: ``(nnz_f,)`` int32, each in ``[0, num_features)``.
    feature_values: ``(nnz_f,)`` float32, finite.
    label_indptr: ``(N+1,)`` int64.
    label_ids: ``(nnz_l,)`` int32, each in ``[0, num_labels)``.
    num_features: ``D``, at least 1.
    num_labels: ``L``, at least 1.
  """
  feature_indptr: np.ndarray
  feature_ids: np.ndarray
  feature_values: np.ndarray
  label_indptr: np.ndarray
  label_ids: np.ndarray
  num_features: int
  num_labels: int

  def __post_init__(self):
    for name in ("num_features", "num_labels"):  # ids are int32
      object.__setattr__(self, name, _check_int(name, getattr(self, name), 1, _INT32_MAX))
    fptr = _int_array("feature_indptr", self.feature_indptr)
    lptr = _int_array("label_indptr", self.label_indptr)
    fids = _int_array("feature_ids", self.feature_ids)
    lids = _int_array("label_ids", self.label_ids)
    fvals = np.asarray(self.feature_values)
    if fvals.ndim != 1 or not (np.issubdtype(fvals.dtype, np.floating) or fvals.size == 0):
      raise ValueError(f"feature_values must be a 1-D float array, got {fvals.dtype} {fvals.shape}")
    if fptr.shape != lptr.shape:
      raise ValueError(f"feature_indptr {fptr.shape} and label_indptr {lptr.shape} "
                       "must describe the same number of points")
    if fids.shape != fvals.shape:
      raise ValueError(f"feature_ids {fids.shape} and feature_values {fvals.shape} differ in length")
    _check_indptr("feature_indptr", fptr, fids.size)
    _check_indptr("label_indptr", lptr, lids.size)
    _check_ids_in_rows("feature_ids", fptr, fids, self.num_features)
    _check_ids_in_rows("label_ids", lptr, lids, self.num_labels)
    with np.errstate(over="ignore"):  # overflow is reported below
      fvals = fvals.astype(np.float32, copy=False)
    if not np.all(np.isfinite(fvals)):
      pos = int(np.flatnonzero(~np.isfinite(fvals))[0])
      row = int(np.searchsorted(fptr, pos, side="right")) - 1
      raise ValueError(f"feature_values: value {fvals[pos]} in row {row} is not finite in float32")
    for name, value in (("feature_indptr", fptr.astype(np.int64, copy=False)),
                        ("feature_ids", fids.astype(np.int32, copy=False)),
                        ("feature_values", fvals),
                        ("label_indptr", lptr.astype(np.int64, copy=False)),
                        ("label_ids", lids.astype(np.int32, copy=False))):
      object.__setattr__(self, name, value)

  def __len__(self) -> int:
    return self.feature_indptr.size - 1

  def label_counts(self) -> np.ndarray:
    """``(num_labels,)`` int64: the number of points carrying each label (``N_l``)."""
    return np.bincount(self.label_ids, minlength=self.num_labels).astype(np.int64)

  def max_features_per_point(self) -> int:
    """The largest number of features of one point (0 for no points)."""
    return int(np.diff(self.feature_indptr).max(initial=0))

  def max_labels_per_point(self) -> int:
    """The largest number of labels of one point (0 for no points)."""
    return int(np.diff(self.label_indptr).max(initial=0))

  def take(self, rows: np.ndarray) -> XMCDataset:
    """The points ``rows`` (1-D ints in ``[0, N)``, repeats allowed), in that order."""
    rows = _rows(rows, len(self))
    fptr, fsrc = _csr_gather(self.feature_indptr, rows)
    lptr, lsrc = _csr_gather(self.label_indptr, rows)
    return XMCDataset(fptr, self.feature_ids[fsrc], self.feature_values[fsrc], lptr,
                      self.label_ids[lsrc], self.num_features, self.num_labels)

  @classmethod
  def from_rows(cls, rows: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_features: int,
                num_labels: int) -> XMCDataset:
    """Builds a dataset from points ``(label_ids, feature_ids, feature_values)``.

    Arguments:
      rows: an iterable of 1-D arrays per point, as ``iter_bow`` yields them
        (ids sorted within each point); consumed in blocks, so it may stream.
      num_features, num_labels: ``D`` and ``L``.
    """
    dtypes = (np.int32, np.int32, np.float32)  # labels, feature ids, feature values
    parts, counts = ([], [], []), ([], [])          # counts: labels, features per point
    rows = iter(rows)
    while block := list(itertools.islice(rows, _ROWS_PER_BLOCK)):
      columns = list(zip(*block))
      for part, column in zip(parts, columns):
        part.append(np.concatenate(column))  # dtypes are checked by __post_init__
      for count, column in zip(counts, columns):
        count.append(np.fromiter(map(len, column), np.int64, len(block)))
    labels, ids, values = (np.concatenate([np.zeros(0, d), *p]) for p, d in zip(parts, dtypes))
    label_indptr, feature_indptr = (
      np.concatenate([[0], np.cumsum(np.concatenate([np.zeros(0, np.int64), *c]))]) for c in counts)
    return cls(feature_indptr, ids, values, label_indptr, labels, num_features, num_labels)


def _rows(rows, num_points: int) -> np.ndarray:
  rows = _int_array("rows", rows).astype(np.int64, copy=False)
  if rows.size and (rows.min() < 0 or rows.max() >= num_points):
    bad = int(rows.min()) if rows.min() < 0 else int(rows.max())
    raise ValueError(f"row {bad} is outside [0, {num_points})")
  return rows


def _csr_gather(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """New indptr ``(B+1,)`` and source positions ``(nnz,)`` of rows ``rows`` of a CSR."""
  starts, counts = indptr[rows], indptr[rows + 1] - indptr[rows]
  new_indptr = np.zeros(rows.size + 1, np.int64)
  np.cumsum(counts, out=new_indptr[1:])
  src = np.repeat(starts - new_indptr[:-1], counts) + np.arange(new_indptr[-1])
  return new_indptr, src


def check_train_test(train: XMCDataset, test: XMCDataset, *, train_name: str = "train",
                     test_name: str = "test") -> None:
  """Refuses a train/test pair that would give a meaningless run, before training starts.

  Policy: the model's input and output sizes are the training set's ``D`` and
  ``L``, so the test set must have the same ``num_features`` and ``num_labels``
  (its BoW header must agree with the training file's in ``D`` and ``L``). Ids
  beyond the training sizes are never remapped or dropped, and a smaller test
  ``L`` is refused too, since evaluation scores every one of the model's labels.

  Arguments:
    train, test: the two splits.
    train_name, test_name: how messages name them, e.g. their file paths.

  Raises:
    ValueError: when ``train`` has no points, no positive label or no feature
      at all; when ``test`` has no points or no positive label at all (every
      metric would be 0); or when their ``num_features`` or ``num_labels`` differ.
  """
  for name, data in ((train_name, train), (test_name, test)):
    if not len(data):
      raise ValueError(f"{name} has no points")
  for size in ("num_features", "num_labels"):
    got, want = getattr(test, size), getattr(train, size)
    if got != want:
      relation = "more" if got > want else "fewer"
      raise ValueError(f"{test_name} has {size} = {got} ({relation} than {train_name}'s {want}); "
                       f"the model's sizes are the training set's, so the headers' D and L must "
                       f"agree")
  for name, data in ((train_name, train), (test_name, test)):
    if not data.label_ids.size:
      raise ValueError(f"{name} has no positive label at all: every point's label list is empty")
  if not train.feature_ids.size:
    raise ValueError(f"{train_name} has no feature at all: every point's feature list is empty")


# ----------------------------------------------------------------------------- BoW


def _check_newline(path, number: int, raw: bytes) -> None:
  """Refuses a line without its newline (only the last line can lack one)."""
  if not raw.endswith(b"\n"):
    raise XMCFormatError(path, number, "last line has no trailing newline, so the file looks cut "
                         "short; if it is complete, add the final newline")


def _read_lines(path) -> Iterator[tuple[int, str]]:
  """``(1-based line number, line without its newline)``, decoded as ASCII."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      _check_newline(path, number, raw)
      try:
        yield number, raw.rstrip(b"\r\n").decode("ascii")
      except UnicodeDecodeError as e:
        raise XMCFormatError(path, number, f"non-ASCII byte at column {e.start + 1}") from None


def _parse_header(path, line: str) -> tuple[int, int, int]:
  fields = line.split()
  if len(fields) != 3:
    raise XMCFormatError(path, 1, f"header must be 'N D L' (3 integers), got {len(fields)} "
                         f"fields: {line!r}")
  for name, field in zip(("N", "D", "L"), fields):
    if not re.fullmatch(_INT, field, re.ASCII):
      raise XMCFormatError(path, 1, f"header {name} is not a non-negative integer: {field!r}")
  n, d, num_labels = map(int, fields)
  if n == 0:
    raise XMCFormatError(path, 1, "header N = 0: the file must hold at least one point")
  for name, value in (("D", d), ("L", num_labels)):
    if not 1 <= value <= _INT32_MAX:
      raise XMCFormatError(path, 1, f"header {name} = {value} must be in [1, 2**31)")
  return n, d, num_labels


def bow_header(path: str | os.PathLike) -> tuple[int, int, int]:
  """The checked header ``(N, D, L)`` of a BoW file."""
  for _, line in _read_lines(path):
    return _parse_header(path, line)
  raise XMCFormatError(path, 1, "empty file, expected the header 'N D L'")


def _id_problem(kind: str, token: str, bound: int) -> str:
  if token == "":
    return f"empty {kind} id"
  if re.fullmatch(r"-[0-9]+", token):
    return f"negative {kind} id {token}"
  if not re.fullmatch(_INT, token, re.ASCII):
    return f"{kind} id {token!r} is not a non-negative integer"
  return f"{kind} id {token} is out of range [0, {bound})"


def _labels_problem(field: str, bound: int) -> str:
  for token in field.split(","):
    problem = _id_problem("label", token, bound)
    if not problem.endswith(f"out of range [0, {bound})"):
      return problem
  return f"malformed label list {field!r}"


def _features_problem(rest: str, bound: int) -> str:
  for token in rest.split():
    fid, colon, value = token.partition(":")
    if not colon:
      return f"feature {token!r} has no ':' (expected id:value)"
    problem = _id_problem("feature", fid, bound)
    if not problem.endswith(f"out of range [0, {bound})"):
      return problem
    if not _FLOAT_RE.fullmatch(value):
      try:
        float(value)
      except ValueError:
        return f"feature value {value!r} of feature {fid} is not a number"
      return f"feature value {value!r} of feature {fid} is not finite"
  return f"malformed features {rest!r}"


def _sorted_unique(path, number: int, kind: str, ids: np.ndarray, bound: int) -> np.ndarray:
  """Checks the range of ``ids`` and returns the permutation that sorts them."""
  if ids.size and ids.max() >= bound:
    raise XMCFormatError(path, number, f"{kind} id {int(ids.max())} is out of range [0, {bound})")
  order = np.argsort(ids, kind="stable")
  repeats = np.flatnonzero(np.diff(ids[order]) == 0)
  if repeats.size:
    raise XMCFormatError(path, number, f"{kind} id {int(ids[order][repeats[0]])} is repeated")
  return order


def _parse_labels(path, number: int, field: str, num_labels: int | None) -> np.ndarray:
  """Sorted int32 label ids of a comma-separated list ('' is no labels)."""
  if not field:
    return np.zeros(0, np.int32)
  if not _LABELS_RE.fullmatch(field):
    raise XMCFormatError(path, number, _labels_problem(field, num_labels))
  ids = np.array(field.split(","), dtype=np.int64)
  bound = _INT32_MAX if num_labels is None else num_labels
  return ids[_sorted_unique(path, number, "label", ids, bound)].astype(np.int32)


def _parse_bow_line(path, number: int, line: str, num_features: int, num_labels: int):
  first = line.split(None, 1)[0] if line.strip() else ""
  if line[:1].isspace() or ":" in first:
    label_field, rest = "", line
  else:
    label_field, rest = first, line[len(first):]
  labels = _parse_labels(path, number, label_field, num_labels)
  if not _FEATURES_RE.fullmatch(" " + rest):
    raise XMCFormatError(path, number, _features_problem(rest, num_features))
  flat = rest.replace(":", " ").split()
  fids = np.array(flat[0::2], dtype=np.int64)
  values64 = np.array(flat[1::2], dtype=np.float64)
  order = _sorted_unique(path, number, "feature", fids, num_features)
  with np.errstate(over="ignore"):  # overflow is reported below, with its line
    values = values64[order].astype(np.float32)
  if not np.all(np.isfinite(values)):
    pos = int(np.flatnonzero(~np.isfinite(values))[0])
    raise XMCFormatError(path, number, f"feature value {float(values64[order][pos])} of feature "
                         f"{fids[order][pos]} overflows float32")
  return labels, fids[order].astype(np.int32), values


def iter_bow(path: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Streams the points of a BoW file, checking every line and the header counts.

  Arguments:
    path: the BoW file.

  Returns:
    An iterator over points: ``(label_ids (l,) int32, feature_ids (f,) int32,
    feature_values (f,) float32)``, ids sorted. Raises ``XMCFormatError`` at the
    first malformed line, and at the end when the number of point lines is not
    the header's ``N``.
  """
  lines = _read_lines(path)
  header = next(lines, None)
  if header is None:
    raise XMCFormatError(path, 1, "empty file, expected the header 'N D L'")
  n, num_features, num_labels = _parse_header(path, header[1])
  count = 0
  for number, line in lines:
    if count == n:
      raise XMCFormatError(path, number, f"header says N = {n} points, but the file has more lines")
    yield _parse_bow_line(path, number, line, num_features, num_labels)
    count += 1
  if count != n:
    raise XMCFormatError(path, count + 2, f"header says N = {n} points, but the file ends after "
                         f"{count}")


def read_bow(path: str | os.PathLike) -> XMCDataset:
  """Reads a whole BoW file (see ``iter_bow`` for the checks)."""
  _, num_features, num_labels = bow_header(path)
  return XMCDataset.from_rows(iter_bow(path), num_features, num_labels)


def write_bow(path: str | os.PathLike, dataset: XMCDataset) -> None:
  """Writes ``dataset`` as a BoW file.

  Values are written with 9 significant digits, so ``read_bow`` gives back the
  same float32 values. A point without labels starts with a space. A dataset
  without points raises ``ValueError`` (``read_bow`` refuses ``N = 0``).
  """
  if not len(dataset):
    raise ValueError("dataset has no points; a BoW file must hold at least one")
  fptr, lptr = dataset.feature_indptr, dataset.label_indptr
  with open(path, "w", encoding="ascii", newline="\n") as f:
    f.write(f"{len(dataset)} {dataset.num_features} {dataset.num_labels}\n")
    for i in range(len(dataset)):
      labels = ",".join(map(str, dataset.label_ids[lptr[i]:lptr[i + 1]].tolist()))
      ids = dataset.feature_ids[fptr[i]:fptr[i + 1]].tolist()
      values = dataset.feature_values[fptr[i]:fptr[i + 1]].tolist()
      features = " ".join(f"{j}:{v:.9g}" for j, v in zip(ids, values))
      f.write(f"{labels} {features}\n" if features else f"{labels}\n")


# ------------------------------------------------------------------------ raw text


def _read_utf8_lines(path) -> list[str]:
  lines = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      _check_newline(path, number, raw)
      try:
        lines.append(raw.rstrip(b"\r\n").decode("utf-8"))
      except UnicodeDecodeError as e:
        raise XMCFormatError(path, number, f"invalid UTF-8 at byte {e.start + 1}") from None
  return lines


def read_raw_text(text_path: str | os.PathLike, label_path: str | os.PathLike, *,
                  num_labels: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Reads a raw-text split: documents and their label sets.

  Arguments:
    text_path: UTF-8 text, one document per line (``\\n`` or ``\\r\\n`` endings).
    label_path: one line per document, comma-separated label ids, e.g. ``3,17``;
      an empty line means no labels.
    num_labels: when given, every label id must be below it.

  Returns:
    ``(documents, label_indptr (N+1,) int64, label_ids (nnz,) int32)``, label ids
    sorted within each document. Raises ``XMCFormatError`` naming file and line
    for a malformed label line, a repeated or out-of-range id, invalid UTF-8, a
    last line without its newline, an empty text file, or files with different
    numbers of lines.
  """
  if num_labels is not None:
    _check_int("num_labels", num_labels, 1, _INT32_MAX)
  docs = _read_utf8_lines(text_path)
  if not docs:
    raise XMCFormatError(text_path, 1, "empty file, expected at least one document")
  label_lines = _read_utf8_lines(label_path)
  if len(docs) != len(label_lines):
    longer = text_path if len(docs) > len(label_lines) else label_path
    raise XMCFormatError(longer, min(len(docs), len(label_lines)) + 1,
                         f"{text_path} has {len(docs)} lines but {label_path} has "
                         f"{len(label_lines)}")
  labels = [_parse_labels(label_path, number, line.strip(), num_labels)
            for number, line in enumerate(label_lines, 1)]
  indptr = np.zeros(len(labels) + 1, np.int64)
  np.cumsum([x.size for x in labels], out=indptr[1:])
  ids = np.concatenate(labels) if labels else np.zeros(0, np.int32)
  return docs, indptr, ids


def write_raw_text(text_path: str | os.PathLike, label_path: str | os.PathLike,
                   documents: Sequence[str], label_indptr: np.ndarray,
                   label_ids: np.ndarray) -> None:
  """Writes documents and label sets in the format ``read_raw_text`` reads (at least one)."""
  if not documents:
    raise ValueError("no documents; a raw-text split must hold at least one")
  if len(label_indptr) != len(documents) + 1:
    raise ValueError(f"label_indptr has {len(label_indptr)} entries, expected "
                     f"{len(documents) + 1}")
  for i, doc in enumerate(documents):
    if "\n" in doc or "\r" in doc:
      raise ValueError(f"document {i} contains a line break")
  with open(text_path, "w", encoding="utf-8", newline="\n") as f:
    f.writelines(doc + "\n" for doc in documents)
  with open(label_path, "w", encoding="ascii", newline="\n") as f:
    for i in range(len(documents)):
      f.write(",".join(map(str, label_ids[label_indptr[i]:label_indptr[i + 1]].tolist())) + "\n")


def hash_tokenize(document: str, vocab: int) -> np.ndarray:
  """Token ids of a document: lower-cased whitespace-separated words, hashed.

  Word ``w`` becomes ``1 + crc32(utf8(w)) % (vocab - 1)``; id 0 is left for padding.
  CRC-32 is fixed, so ids do not depend on the process (unlike ``hash``).

  Returns:
    ``(num_words,)`` int32.
  """
  if vocab < 2:
    raise ValueError(f"vocab must be >= 2 (id 0 is padding), got {vocab}")
  words = document.lower().split()
  return np.array([1 + zlib.crc32(w.encode("utf-8")) % (vocab - 1) for w in words], np.int32)


def pad_tokens(documents: Sequence[str], rows: np.ndarray, *, max_len: int, vocab: int,
               truncate: bool = False) -> dict[str, np.ndarray]:
  """Hashed token ids of documents ``rows``, padded to ``max_len``.

  Arguments:
    documents: all documents.
    rows: ``(B,)`` indices into ``documents``.
    max_len: padded length.
    vocab: vocabulary size of ``hash_tokenize``.
    truncate: keep the first ``max_len`` words of longer documents. When False,
      a longer document raises ``ValueError``.

  Returns:
    ``token_ids`` ``(B, max_len)`` int32 (0 = padding) and ``token_mask``
    ``(B, max_len)`` bool.
  """
  max_len = _check_int("max_len", max_len, 1)
  rows = _rows(rows, len(documents))
  ids = np.zeros((rows.size, max_len), np.int32)
  mask = np.zeros((rows.size, max_len), bool)
  for b, row in enumerate(rows.tolist()):
    tokens = hash_tokenize(documents[row], vocab)
    if tokens.size > max_len and not truncate:
      raise ValueError(f"document {row} has {tokens.size} words > max_len {max_len} "
                       "(pass truncate=True to cut it)")
    tokens = tokens[:max_len]
    ids[b, :tokens.size], mask[b, :tokens.size] = tokens, True
  return {"token_ids": ids, "token_mask": mask}


# ------------------------------------------------------------------------ batching


def _padded(indptr: np.ndarray, rows: np.ndarray, cap: int, what: str):
  """Padded positions: ``mask`` (B, cap) bool and ``src`` (mask.sum(),) into the CSR."""
  counts = indptr[rows + 1] - indptr[rows]
  if counts.size and counts.max() > cap:
    b = int(np.argmax(counts))
    raise ValueError(f"point {int(rows[b])} has {int(counts[b])} {what}, more than the cap "
                     f"{cap} (raise the cap; nothing is truncated)")
  mask = np.arange(cap) < counts[:, None]
  src = (indptr[rows][:, None] + np.arange(cap))[mask]
  return mask, src


def pad_points(dataset: XMCDataset, rows: np.ndarray, *, max_features: int,
               max_labels: int) -> dict[str, np.ndarray]:
  """Points ``rows`` as padded arrays.

  Arguments:
    dataset: the points.
    rows: ``(B,)`` point indices.
    max_features, max_labels: padded widths ``F`` and ``Lmax``. A point with more
      features or labels raises ``ValueError``.

  Returns:
    ``feature_ids`` (B, F) int32, ``feature_values`` (B, F) float32,
    ``feature_mask`` (B, F) bool, ``label_ids`` (B, Lmax) int32 and ``label_mask``
    (B, Lmax) bool. Padding slots hold id 0 and value 0 and are False in the mask.
  """
  max_features = _check_int("max_features", max_features, 0)
  max_labels = _check_int("max_labels", max_labels, 0)
  rows = _rows(rows, len(dataset))
  fmask, fsrc = _padded(dataset.feature_indptr, rows, max_features, "features")
  lmask, lsrc = _padded(dataset.label_indptr, rows, max_labels, "labels")
  fids = np.zeros(fmask.shape, np.int32)
  fvals = np.zeros(fmask.shape, np.float32)
  lids = np.zeros(lmask.shape, np.int32)
  fids[fmask], fvals[fmask] = dataset.feature_ids[fsrc], dataset.feature_values[fsrc]
  lids[lmask] = dataset.label_ids[lsrc]
  return {"feature_ids": fids, "feature_values": fvals, "feature_mask": fmask,
          "label_ids": lids, "label_mask": lmask}


def epoch_order(num_points: int, *, seed: int, epoch: int) -> np.ndarray:
  """``(num_points,)`` int64 permutation for ``epoch``, a function of ``(seed, epoch)`` only."""
  for name, value in (("num_points", num_points), ("seed", seed), ("epoch", epoch)):
    _check_int(name, value, 0)
  return np.random.default_rng([seed, epoch]).permutation(num_points)


def split_off(num_points: int, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A stable split of ``range(num_points)``: ``(kept rows, held-out rows)``, both sorted.

  Point ``i`` is held out when a hash of ``(seed, i)`` (SplitMix64, as a
  fraction of 2^64) falls below ``fraction``: the split of a point depends only
  on the seed and its index, not on ``num_points``, so appending points to a
  file leaves the split of the others as it was, and the same seed always gives
  the same split. The two parts are disjoint and cover every point.

  Arguments:
    num_points: points in the set being split.
    fraction: the expected share held out, in ``[0, 1)``.
    seed: selects the split (an int ``>= 0``).

  Returns:
    ``(kept, held_out)``, int64 row indices.
  """
  _check_int("num_points", num_points, 0)
  _check_int("seed", seed, 0)
  if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
    raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
  with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
    z = (np.arange(1, num_points + 1, dtype=np.uint64)
         + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
  held = z < np.uint64(int(fraction * 2.0**64))
  return np.flatnonzero(~held), np.flatnonzero(held)


def steps_per_epoch(num_points: int, *, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches ``batches`` yields for one epoch."""
  _check_int("num_points", num_points, 0)
  _check_int("batch_size", batch_size, 1)
  return num_points // batch_size if drop_remainder else -(-num_points // batch_size)


def batches(dataset: XMCDataset, *, batch_size: int, seed: int, epoch: int, start_step: int = 0,
            max_features: int | None = None, max_labels: int | None = None,
            drop_remainder: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """The padded batches (see ``pad_points``) of one epoch, in ``epoch_order``.

  Arguments:
    dataset: the points.
    batch_size: points per batch ``B``.
    seed, epoch: pick the order.
    start_step: skip the first ``start_step`` batches, so that a run resumed at
      step ``s`` of an epoch sees the same batches as an uninterrupted one.
    max_features, max_labels: padded widths; default to the dataset's maxima so
      that every batch has the same shape.
    drop_remainder: drop the last partial batch; when False it is yielded with
      fewer than ``batch_size`` rows.

  Returns:
    An iterator of dicts of numpy arrays with a leading axis ``B``.
  """
  steps = steps_per_epoch(len(dataset), batch_size=batch_size, drop_remainder=drop_remainder)
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step must be in [0, {steps}] (batches per epoch), got {start_step}")
  max_features = dataset.max_features_per_point() if max_features is None else max_features
  max_labels = dataset.max_labels_per_point() if max_labels is None else max_labels
  order = epoch_order(len(dataset), seed=seed, epoch=epoch)
  for step in range(start_step, steps):
    yield pad_points(dataset, order[step * batch_size:(step + 1) * batch_size],
                     max_features=max_features, max_labels=max_labels)
