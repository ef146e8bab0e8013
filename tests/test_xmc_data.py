"""XMC data: readers and writers, batching, the synthetic generator and the tfds builder."""

import re
import sys
import zlib

import numpy as np
import pytest

from sparsejax.data.synthetic_xmc import signature_features, synthetic_xmc
from sparsejax.data.xmc import (XMCDataset, XMCFormatError, batches, bow_header,
                                check_train_test, epoch_order, hash_tokenize, iter_bow, pad_points,
                                pad_tokens, read_bow, read_raw_text, split_off, steps_per_epoch,
                                write_bow, write_raw_text)

_FIELDS = ("feature_indptr", "feature_ids", "feature_values", "label_indptr", "label_ids")


def assert_same(a: XMCDataset, b: XMCDataset):
  assert (a.num_features, a.num_labels) == (b.num_features, b.num_labels)
  for name in _FIELDS:
    x, y = getattr(a, name), getattr(b, name)
    assert x.dtype == y.dtype, name
    np.testing.assert_array_equal(x, y, err_msg=name)


def edge_dataset() -> XMCDataset:
  """Rows: labels and features, features only (a tiny value), labels only, nothing, both."""
  return XMCDataset(
    feature_indptr=np.array([0, 2, 3, 3, 3, 5]),
    feature_ids=np.array([1, 4, 0, 2, 3]),
    feature_values=np.array([0.5, -2.25, 1e-7, 3.0, 1 / 3], np.float32),
    label_indptr=np.array([0, 2, 2, 3, 3, 4]),
    label_ids=np.array([0, 2, 1, 2]),
    num_features=5, num_labels=3)


@pytest.fixture(scope="module")
def small():
  return synthetic_xmc(seed=3, num_train=300, num_test=100, num_features=400, num_labels=60)


# ------------------------------------------------------------------------ readers


def test_bow_round_trip(tmp_path, small, monkeypatch):
  from sparsejax.data import xmc
  monkeypatch.setattr(xmc, "_ROWS_PER_BLOCK", 7)  # read_bow collects rows in several blocks
  for name, data in (("edge", edge_dataset()), ("train", small[0]), ("test", small[1])):
    path = tmp_path / f"{name}.txt"
    write_bow(path, data)
    assert bow_header(path) == (len(data), data.num_features, data.num_labels)
    assert_same(read_bow(path), data)
    rows = list(iter_bow(path))
    assert len(rows) == len(data)
    i = len(data) // 2
    np.testing.assert_array_equal(rows[i][0], data.label_ids[data.label_indptr[i]:data.label_indptr[i + 1]])
    np.testing.assert_array_equal(rows[i][2], data.feature_values[data.feature_indptr[i]:data.feature_indptr[i + 1]])
  lines = (tmp_path / "edge.txt").read_text().split("\n")
  assert lines[:2] == ["5 5 3", "0,2 1:0.5 4:-2.25"]
  assert lines[2].startswith(" 0:") and lines[3:] == ["1", "", "2 2:3 3:0.333333343", ""]


def test_bow_reader_accepts_repository_layout(tmp_path):
  # CRLF endings, tabs, unsorted ids, a no-label line starting with its first pair.
  path = tmp_path / "repo.txt"
  path.write_bytes(b"3 6 4\r\n3,1\t5:2 0:1.5\r\n2:0.25 1:1e-3\r\n 4:-1\r\n")
  data = read_bow(path)
  np.testing.assert_array_equal(data.label_indptr, [0, 2, 2, 2])
  np.testing.assert_array_equal(data.label_ids, [1, 3])
  np.testing.assert_array_equal(data.feature_ids, [0, 5, 1, 2, 4])
  np.testing.assert_array_equal(data.feature_values, np.float32([1.5, 2, 1e-3, 0.25, -1]))


GOOD = "0,1 0:1.5 3:2\n"
MALFORMED_BOW = {
  "header_two_fields": ("3 5\n", 1, r"3 integers\), got 2 fields"),
  "header_four_fields": ("1 5 3 7\n" + GOOD, 1, r"got 4 fields"),
  "header_float": ("1 5.0 3\n" + GOOD, 1, r"header D is not a non-negative integer: '5.0'"),
  "header_word": ("one 5 3\n" + GOOD, 1, r"header N is not"),
  "header_negative": ("1 5 -3\n" + GOOD, 1, r"header L is not"),
  "header_zero_labels": ("1 5 0\n" + GOOD, 1, r"header L = 0 must be in \[1"),
  "empty_file": ("", 1, r"empty file"),
  "feature_out_of_range": ("2 5 3\n" + GOOD + "0 5:1\n", 3, r"feature id 5 is out of range \[0, 5\)"),
  "label_out_of_range": ("2 5 3\n" + GOOD + "3 0:1\n", 3, r"label id 3 is out of range \[0, 3\)"),
  "negative_feature": ("2 5 3\n" + GOOD + "0 -1:0.5\n", 3, r"negative feature id -1"),
  "negative_label": ("2 5 3\n" + GOOD + "-1 0:1\n", 3, r"negative label id -1"),
  "value_not_numeric": ("2 5 3\n" + GOOD + "0 2:abc\n", 3, r"value 'abc' of feature 2 is not a number"),
  "feature_not_numeric": ("2 5 3\n" + GOOD + "0 x:1\n", 3, r"feature id 'x' is not a non-negative"),
  "feature_float_id": ("2 5 3\n" + GOOD + "0 1.5:1\n", 3, r"feature id '1.5' is not"),
  "label_not_numeric": ("2 5 3\n" + GOOD + "a,1 0:1\n", 3, r"label id 'a' is not"),
  "no_colon": ("2 5 3\n" + GOOD + "0 1 2:1\n", 3, r"feature '1' has no ':'"),
  "two_colons": ("2 5 3\n" + GOOD + "0 1:2:3\n", 3, r"value '2:3' of feature 1 is not a number"),
  "nan": ("2 5 3\n" + GOOD + "0 1:nan\n", 3, r"value 'nan' of feature 1 is not finite"),
  "inf": ("2 5 3\n" + GOOD + "0 1:-inf\n", 3, r"value '-inf' of feature 1 is not finite"),
  "float32_overflow": ("2 5 3\n" + GOOD + "0 1:1e39\n", 3, r"overflows float32"),
  "empty_label_entry": ("2 5 3\n" + GOOD + "0,,1 0:1\n", 3, r"empty label id"),
  "repeated_label": ("2 5 3\n" + GOOD + "1,1 0:1\n", 3, r"label id 1 is repeated"),
  "repeated_feature": ("2 5 3\n" + GOOD + "1 2:1 2:3\n", 3, r"feature id 2 is repeated"),
  "header_n_too_large": ("3 5 3\n" + GOOD + GOOD, 4, r"N = 3 points, but the file ends after 2"),
  "header_n_too_small": ("1 5 3\n" + GOOD + GOOD, 3, r"N = 1 points, but the file has more"),
  "stray_blank_line": ("1 5 3\n" + GOOD + "\n", 3, r"has more lines"),
  "non_ascii": ("2 5 3\n" + GOOD + "0 1:1\u00e9\n", 3, r"non-ASCII byte at column 6"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BOW))
def test_bow_malformed_line_raises_with_file_and_line(tmp_path, case):
  text, line, message = MALFORMED_BOW[case]
  path = tmp_path / "bad.txt"
  path.write_bytes(text.encode("utf-8"))
  with pytest.raises(XMCFormatError, match=message) as info:
    read_bow(path)
  assert (info.value.path, info.value.line) == (str(path), line)
  assert str(info.value).startswith(f"{path}:{line}: ")
  assert isinstance(info.value, ValueError)


def test_iter_bow_streams_up_to_the_bad_line(tmp_path):
  path = tmp_path / "bad.txt"
  path.write_text("3 5 3\n" + GOOD + "2 4:1\n" + "0 9:1\n")
  rows = iter_bow(path)
  first, second = next(rows), next(rows)
  np.testing.assert_array_equal(first[1], [0, 3])
  np.testing.assert_array_equal(second[0], [2])
  with pytest.raises(XMCFormatError, match="feature id 9") as info:
    next(rows)
  assert info.value.line == 4


# Cuts of the last line "0,1 0:1.5 3:2", and what the same text gives as a complete line:
# None where it parses (only the missing newline shows the cut), else the error.
CUTS = {
  "0,1 0:1.5 3:2": None, "0,1 0:1.5 3:": "value '' of feature 3 is not a number",
  "0,1 0:1.5 3": "feature '3' has no ':'", "0,1 0:1.": None, "0,1 0:": "is not a number",
  "0,1 ": None, "0,": "empty label id", "0": None, "1,2,": "empty label id", "0 3:0.": None,
  "0 3:": "value '' of feature 3 is not a number",
}


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_bow_without_final_newline_is_cut_short(tmp_path, cut):
  path = tmp_path / "cut.txt"
  path.write_text("2 5 3\n" + GOOD + cut)
  with pytest.raises(XMCFormatError, match="no trailing newline, so the file looks cut") as info:
    read_bow(path)
  assert (info.value.path, info.value.line) == (str(path), 3)
  # iter_bow yields the complete points, never the cut one.
  rows = iter_bow(path)
  next(rows)
  with pytest.raises(XMCFormatError, match="add the final newline"):
    next(rows)
  path.write_text("2 5 3\n" + GOOD + cut + "\n")
  if CUTS[cut] is None:
    assert len(read_bow(path)) == 2
  else:
    with pytest.raises(XMCFormatError, match=re.escape(CUTS[cut])) as info:
      read_bow(path)
    assert info.value.line == 3


def test_bow_cut_at_a_line_end_or_in_the_header(tmp_path):
  path = tmp_path / "cut.txt"
  path.write_text("3 5 3\n" + GOOD)
  with pytest.raises(XMCFormatError, match="N = 3 points, but the file ends after 1"):
    read_bow(path)
  path.write_text("3 5")
  for read in (read_bow, bow_header):
    with pytest.raises(XMCFormatError, match="looks cut short") as info:
      read(path)
    assert info.value.line == 1
  path.write_bytes(b"1 5 3\r\n0 1:1\r")  # cut between CR and LF
  with pytest.raises(XMCFormatError, match="looks cut short") as info:
    read_bow(path)
  assert info.value.line == 2


def test_bow_header_n_zero_is_refused(tmp_path):
  path = tmp_path / "empty.txt"
  for text in ("0 5 3\n", "0 5 3\n" + GOOD):
    path.write_text(text)
    for read in (read_bow, bow_header):
      with pytest.raises(XMCFormatError, match="header N = 0: the file must hold") as info:
        read(path)
      assert info.value.line == 1
  empty = XMCDataset(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                     np.zeros(1, np.int64), np.zeros(0, np.int32), 5, 3)
  with pytest.raises(ValueError, match="dataset has no points"):
    write_bow(path, empty)


def test_raw_text_round_trip(tmp_path):
  docs = ["Sparse training, really.", "", "ünïcode   words\tand tabs", "last"]
  indptr, ids = np.array([0, 2, 2, 3, 6]), np.array([1, 4, 0, 0, 2, 7], np.int32)
  write_raw_text(tmp_path / "x.txt", tmp_path / "y.txt", docs, indptr, ids)
  got_docs, got_indptr, got_ids = read_raw_text(tmp_path / "x.txt", tmp_path / "y.txt", num_labels=8)
  assert got_docs == docs
  np.testing.assert_array_equal(got_indptr, indptr)
  np.testing.assert_array_equal(got_ids, ids)
  assert got_ids.dtype == np.int32 and got_indptr.dtype == np.int64
  # CRLF files and unsorted label lines read the same, sorted.
  (tmp_path / "x2.txt").write_bytes(b"a b\r\nc\r\n")
  (tmp_path / "y2.txt").write_bytes(b"5,2\r\n\r\n")
  got = read_raw_text(tmp_path / "x2.txt", tmp_path / "y2.txt")
  assert got[0] == ["a b", "c"]
  np.testing.assert_array_equal(got[2], [2, 5])
  with pytest.raises(ValueError, match="document 1 contains a line break"):
    write_raw_text(tmp_path / "z.txt", tmp_path / "w.txt", ["a", "b\nc"], np.array([0, 0, 0]), ids[:0])


MALFORMED_RAW = {
  "label_not_numeric": (b"a\nb\nc\n", b"1\n2,x\n3\n", "labels", 2, r"label id 'x' is not"),
  "label_negative": (b"a\nb\n", b"1\n-2\n", "labels", 2, r"negative label id -2"),
  "label_out_of_range": (b"a\nb\n", b"1\n8\n", "labels", 2, r"label id 8 is out of range \[0, 8\)"),
  "label_repeated": (b"a\nb\n", b"3,3\n1\n", "labels", 1, r"label id 3 is repeated"),
  "label_space_separated": (b"a\n", b"1 2\n", "labels", 1, r"label id '1 2' is not"),
  "fewer_labels": (b"a\nb\nc\n", b"1\n2\n", "text", 3, r"has 3 lines but .* has 2"),
  "fewer_docs": (b"a\n", b"1\n2\n", "labels", 2, r"has 1 lines but .* has 2"),
  "bad_utf8": (b"ok\n\xff\xfe\n", b"1\n2\n", "text", 2, r"invalid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_RAW))
def test_raw_text_malformed_raises_with_file_and_line(tmp_path, case):
  text, labels, bad_file, line, message = MALFORMED_RAW[case]
  paths = {"text": tmp_path / "x.txt", "labels": tmp_path / "y.txt"}
  paths["text"].write_bytes(text)
  paths["labels"].write_bytes(labels)
  with pytest.raises(XMCFormatError, match=message) as info:
    read_raw_text(paths["text"], paths["labels"], num_labels=8)
  assert (info.value.path, info.value.line) == (str(paths[bad_file]), line)


def test_raw_text_cut_short_or_empty_is_refused(tmp_path):
  x, y = tmp_path / "x.txt", tmp_path / "y.txt"
  # A label file cut inside "1,23": "1,2" would otherwise read as a valid, wrong set.
  x.write_bytes(b"a\nb\n")
  y.write_bytes(b"0\n1,2")
  with pytest.raises(XMCFormatError, match="looks cut short") as info:
    read_raw_text(x, y)
  assert (info.value.path, info.value.line) == (str(y), 2)
  x.write_bytes(b"a\nb wor")
  with pytest.raises(XMCFormatError, match="looks cut short") as info:
    read_raw_text(x, y)
  assert (info.value.path, info.value.line) == (str(x), 2)
  x.write_bytes(b"")
  y.write_bytes(b"")
  with pytest.raises(XMCFormatError, match="empty file, expected at least one document") as info:
    read_raw_text(x, y)
  assert info.value.path == str(x)
  with pytest.raises(ValueError, match="no documents"):
    write_raw_text(x, y, [], np.zeros(1, np.int64), np.zeros(0, np.int32))


# ---------------------------------------------------------------------- container


def test_dataset_conversions_take_and_counts():
  data = edge_dataset()
  assert len(data) == 5 and data.feature_ids.dtype == np.int32 and data.feature_indptr.dtype == np.int64
  assert data.max_features_per_point() == 2 and data.max_labels_per_point() == 2
  np.testing.assert_array_equal(data.label_counts(), [1, 1, 2])
  sub = data.take(np.array([4, 0, 0, 3]))
  np.testing.assert_array_equal(sub.feature_indptr, [0, 2, 4, 6, 6])
  np.testing.assert_array_equal(sub.feature_ids, [2, 3, 1, 4, 1, 4])
  np.testing.assert_array_equal(sub.label_ids, [2, 0, 2, 0, 2])
  np.testing.assert_array_equal(sub.label_indptr, [0, 1, 3, 5, 5])
  with pytest.raises(ValueError, match="row -1 is outside"):
    data.take(np.array([-1]))
  with pytest.raises(ValueError, match="row 5 is outside"):
    data.take(np.array([5]))


def _replace(**changes):
  base = {name: getattr(edge_dataset(), name) for name in _FIELDS}
  base.update(num_features=5, num_labels=3)
  base.update(changes)
  return base


@pytest.mark.parametrize("changes, message", [
  (dict(feature_ids=np.array([4, 1, 0, 2, 3])), r"ids in row 0 are not strictly increasing"),
  (dict(label_ids=np.array([2, 0, 1, 2])), r"ids in row 0 are not strictly increasing"),
  (dict(feature_ids=np.array([1, 4, 0, 2, 5])), r"id 5 in row 4 is outside \[0, 5\)"),
  (dict(label_ids=np.array([0, -2, 1, 2])), r"id -2 in row 0 is outside"),
  (dict(feature_values=np.array([0.5, np.nan, 1, 1, 1])), r"row 0 is not finite"),
  (dict(feature_values=np.array([0.5, 1e300, 1, 1, 1])), r"not finite in float32"),
  (dict(feature_ids=np.array([1.0, 4, 0, 2, 3])), r"feature_ids must have an integer dtype"),
  (dict(label_indptr=np.array([0, 2, 2, 3, 4])), r"same number of points"),
  (dict(label_indptr=np.array([0, 2, 2, 3, 3, 3])), r"must end with the number of ids 4"),
  (dict(feature_indptr=np.array([0, 3, 2, 3, 3, 5])), r"non-decreasing"),
  (dict(num_labels=0), r"num_labels must be an integer in \[1, 2147483647\], got 0"),
  (dict(num_features=-3), r"num_features must be an integer in \[1,"),
  (dict(num_features=5.0), r"num_features must be an integer, got 5.0"),
])
def test_dataset_rejects_inconsistent_arrays(changes, message):
  with pytest.raises(ValueError, match=message):
    XMCDataset(**_replace(**changes))


def _with_labels(data: XMCDataset, indptr, ids) -> XMCDataset:
  return XMCDataset(data.feature_indptr, data.feature_ids, data.feature_values, np.asarray(indptr),
                    np.asarray(ids), data.num_features, data.num_labels)


def test_check_train_test_accepts_a_matching_pair(small):
  check_train_test(*small)
  # Points without labels are normal, as long as some point has one.
  data = edge_dataset()
  check_train_test(data, data.take(np.array([3, 4])))


def test_check_train_test_refuses_unusable_pairs(tmp_path):
  data = edge_dataset()
  no_labels = _with_labels(data, np.zeros(6, np.int64), np.zeros(0, np.int32))
  with pytest.raises(ValueError, match="tr.txt has no positive label at all"):
    check_train_test(no_labels, data, train_name="tr.txt", test_name="te.txt")
  with pytest.raises(ValueError, match="te.txt has no positive label at all"):
    check_train_test(data, no_labels, train_name="tr.txt", test_name="te.txt")
  # The same, read from files: a training file that parses but has no labels.
  (tmp_path / "tr.txt").write_text("2 5 3\n 0:1\n1:2\n")
  write_bow(tmp_path / "te.txt", data)
  with pytest.raises(ValueError, match="has no positive label at all"):
    check_train_test(read_bow(tmp_path / "tr.txt"), read_bow(tmp_path / "te.txt"))
  # A test header with more (or fewer) features or labels than the training header.
  for name, size, relation in (("num_features", 7, "more"), ("num_labels", 4, "more"),
                                ("num_labels", 2, "fewer")):
    other = XMCDataset(**_replace(label_ids=np.array([0, 1, 1, 0]), **{name: size}))
    message = (f"te.txt has {name} = {size} ({relation} than tr.txt's {getattr(data, name)}); "
               "the model's sizes are the training set's, so the headers' D and L must agree")
    with pytest.raises(ValueError, match=re.escape(message)):
      check_train_test(data, other, train_name="tr.txt", test_name="te.txt")
  empty = data.take(np.zeros(0, np.int64))
  with pytest.raises(ValueError, match="train has no points"):
    check_train_test(empty, data)
  with pytest.raises(ValueError, match="test has no points"):
    check_train_test(data, empty)
  no_features = XMCDataset(np.zeros(6, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                           data.label_indptr, data.label_ids, 5, 3)
  with pytest.raises(ValueError, match="train has no feature at all"):
    check_train_test(no_features, data)
  check_train_test(data, no_features)  # a test point without features still gets scored


# ----------------------------------------------------------------------- batching


def test_split_off_is_disjoint_stable_and_independent_of_the_count():
  kept, held = split_off(10_000, 0.1, seed=3)
  assert np.intersect1d(kept, held).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(10_000))
  assert 900 < held.size < 1100
  again = split_off(10_000, 0.1, seed=3)
  np.testing.assert_array_equal(again[1], held)  # the same seed, the same split
  # A point's side depends on its index only: more points leave the first ones as they were.
  longer = split_off(12_000, 0.1, seed=3)[1]
  np.testing.assert_array_equal(longer[longer < 10_000], held)
  assert not np.array_equal(split_off(10_000, 0.1, seed=4)[1], held)
  assert split_off(100, 0.0, seed=0)[1].size == 0
  for fraction in (-0.1, 1.0, float("nan")):
    with pytest.raises(ValueError, match="fraction must be a number in"):
      split_off(10, fraction, seed=0)


def test_pad_points_matches_rows_and_masks():
  data = edge_dataset()
  batch = pad_points(data, np.array([3, 0, 1, 4]), max_features=3, max_labels=2)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
    "feature_ids": ((4, 3), np.int32), "feature_values": ((4, 3), np.float32),
    "feature_mask": ((4, 3), bool), "label_ids": ((4, 2), np.int32), "label_mask": ((4, 2), bool)}
  np.testing.assert_array_equal(batch["feature_ids"], [[0, 0, 0], [1, 4, 0], [0, 0, 0], [2, 3, 0]])
  np.testing.assert_array_equal(batch["feature_mask"].sum(1), [0, 2, 1, 2])
  np.testing.assert_allclose(batch["feature_values"][1], [0.5, -2.25, 0])
  np.testing.assert_array_equal(batch["label_ids"], [[0, 0], [0, 2], [0, 0], [2, 0]])
  np.testing.assert_array_equal(batch["label_mask"], [[0, 0], [1, 1], [0, 0], [1, 0]])
  with pytest.raises(ValueError, match="point 0 has 2 features, more than the cap 1"):
    pad_points(data, np.array([1, 0]), max_features=1, max_labels=2)
  with pytest.raises(ValueError, match="point 0 has 2 labels, more than the cap 1"):
    pad_points(data, np.array([0]), max_features=2, max_labels=1)


def test_epoch_order_is_deterministic_and_seed_dependent():
  a = epoch_order(1000, seed=5, epoch=2)
  np.testing.assert_array_equal(np.sort(a), np.arange(1000))
  np.testing.assert_array_equal(a, epoch_order(1000, seed=5, epoch=2))
  assert not np.array_equal(a, epoch_order(1000, seed=6, epoch=2))
  assert not np.array_equal(a, epoch_order(1000, seed=5, epoch=3))
  with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
    epoch_order(10, seed=-1, epoch=0)


def test_batches_cover_epoch_and_resume(small):
  train = small[0]
  full = list(batches(train, batch_size=64, seed=1, epoch=0))
  assert len(full) == steps_per_epoch(len(train), batch_size=64) == len(train) // 64
  widths = {(b["feature_ids"].shape, b["label_ids"].shape) for b in full}
  assert widths == {((64, train.max_features_per_point()), (64, train.max_labels_per_point()))}
  # The batches hold the points of epoch_order, in order.
  order = epoch_order(len(train), seed=1, epoch=0)
  for step in (0, len(full) - 1):
    expect = pad_points(train, order[step * 64:(step + 1) * 64],
                        max_features=train.max_features_per_point(),
                        max_labels=train.max_labels_per_point())
    for key in expect:
      np.testing.assert_array_equal(full[step][key], expect[key])
  resumed = list(batches(train, batch_size=64, seed=1, epoch=0, start_step=2))
  assert len(resumed) == len(full) - 2
  for a, b in zip(resumed, full[2:]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = next(batches(train, batch_size=64, seed=2, epoch=0))
  assert not np.array_equal(other["feature_ids"], full[0]["feature_ids"])
  tail = list(batches(train, batch_size=64, seed=1, epoch=0, drop_remainder=False,
                      max_features=100, max_labels=9))
  assert len(tail) == len(full) + 1 and tail[-1]["feature_ids"].shape == (len(train) % 64, 100)
  with pytest.raises(ValueError, match=r"start_step must be in \[0, 4\]"):
    next(batches(train, batch_size=64, seed=1, epoch=0, start_step=5))


def test_pad_tokens_hashes_words():
  docs = ["Hello hello WORLD", "", "a b c d e"]
  assert hash_tokenize("Hello", 1000)[0] == 1 + zlib.crc32(b"hello") % 999
  out = pad_tokens(docs, np.array([0, 1]), max_len=4, vocab=1000)
  ids, mask = out["token_ids"], out["token_mask"]
  assert ids.shape == (2, 4) and ids.dtype == np.int32
  assert ids[0, 0] == ids[0, 1] != ids[0, 2] and np.all((ids[mask] >= 1) & (ids[mask] < 1000))
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [0, 0, 0, 0]])
  with pytest.raises(ValueError, match="document 2 has 5 words > max_len 4"):
    pad_tokens(docs, np.array([2]), max_len=4, vocab=1000)
  cut = pad_tokens(docs, np.array([2]), max_len=4, vocab=1000, truncate=True)
  np.testing.assert_array_equal(cut["token_ids"][0], hash_tokenize("a b c d", 1000))


# ---------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_by_seed():
  kwargs = dict(num_train=500, num_test=100, num_features=1000, num_labels=200)
  a, b, c = (synthetic_xmc(seed=s, **kwargs) for s in (7, 7, 8))
  for split in range(2):
    assert_same(a[split], b[split])
  assert not np.array_equal(a[0].label_ids, c[0].label_ids)
  sig = signature_features(np.array([0, 199]), seed=7, num_features=1000, signature_size=8)
  assert sig.shape == (2, 8) and sig.min() >= 0 and sig.max() < 1000
  np.testing.assert_array_equal(sig, signature_features(np.array([0, 199]), seed=7,
                                                        num_features=1000, signature_size=8))


@pytest.mark.parametrize("changes, message", [
  (dict(num_labels=0), "num_labels must be an integer in [1, 2147483647], got 0"),
  (dict(num_labels=2**31), "num_labels must be an integer in [1, 2147483647], got 2147483648"),
  (dict(num_features=64.0), "num_features must be an integer, got 64.0"),
  (dict(num_train=0), "num_train must be an integer >= 1, got 0"),
  (dict(num_test=-1), "num_test must be an integer >= 0, got -1"),
  (dict(seed=True), "seed must be an integer, got True"),
  (dict(signature_size=2.5), "signature_size must be an integer, got 2.5"),
  (dict(max_labels=0), "max_labels must be an integer >= 1, got 0"),
  (dict(mean_labels=float("nan")), "need 1 <= mean_labels <= max_labels, got nan, 8"),
  (dict(signature_keep=0.0), "need 0 < signature_keep <= 1, got 0.0"),
  (dict(zipf_exponent=float("nan")), "zipf_exponent must be finite and >= 0, got nan"),
  (dict(mean_background=float("inf")), "mean_background must be finite and >= 0, got inf"),
])
def test_synthetic_refuses_bad_arguments(changes, message):
  kwargs = dict(seed=0, num_train=10, num_test=5, num_features=64, num_labels=16) | changes
  with pytest.raises(ValueError, match=re.escape(message)):
    synthetic_xmc(**kwargs)


def test_synthetic_has_zipf_labels_and_unit_rows():
  train, test = synthetic_xmc(seed=0, num_train=4000, num_test=1000, num_features=4096,
                              num_labels=2048)
  assert (len(train), len(test)) == (4000, 1000)
  counts = np.sort(train.label_counts())[::-1]
  assert counts[:20].sum() > 0.3 * counts.sum()      # the top 1% of labels: a third of occurrences
  assert np.mean(counts <= 5) > 0.5                   # most labels are tail labels
  assert 2.5 < len(train.label_ids) / len(train) < 3.5
  assert np.all(np.diff(train.label_indptr) >= 1)
  assert np.all(train.feature_values > 0)
  rows = np.repeat(np.arange(len(train)), np.diff(train.feature_indptr))
  norms = np.sqrt(np.bincount(rows, weights=train.feature_values.astype(np.float64) ** 2))
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_synthetic_scales_to_millions_of_labels():
  train, test = synthetic_xmc(seed=1, num_train=2000, num_test=0, num_labels=3_000_000,
                              num_features=100_000)
  assert train.num_labels == 3_000_000 and len(test) == 0
  # Ranks are permuted over all 3M ids, so the drawn labels spread over the whole range.
  assert np.unique(train.label_ids).size > 1000 and train.label_ids.max() > 2_900_000


def _precision_at_1(test: XMCDataset, predicted: np.ndarray) -> float:
  rows = np.repeat(np.arange(len(test)), np.diff(test.label_indptr))
  hit = np.zeros(len(test), bool)
  hit[rows[test.label_ids == predicted[rows]]] = True
  return hit.mean()


def test_planted_structure_is_learnable():
  train, test = synthetic_xmc(seed=0, num_train=4000, num_test=1000, num_features=2048,
                              num_labels=512)

  def dense(data, width, indptr, ids, values):
    out = np.zeros((len(data), width), np.float32)
    out[np.repeat(np.arange(len(data)), np.diff(indptr)), ids] = values
    return out
  x = dense(train, 2048, train.feature_indptr, train.feature_ids, train.feature_values)
  y = dense(train, 512, train.label_indptr, train.label_ids, 1.0)
  centroids = x.T @ y                                  # (D, L) sums of each label's points
  centroids /= np.maximum(np.linalg.norm(centroids, axis=0), 1e-12)
  x_test = dense(test, 2048, test.feature_indptr, test.feature_ids, test.feature_values)
  p1_centroid = _precision_at_1(test, np.argmax(x_test @ centroids, axis=1))
  p1_frequent = _precision_at_1(test, np.full(len(test), np.argmax(train.label_counts())))
  assert p1_frequent < 0.45
  assert p1_centroid > p1_frequent + 0.3, (p1_centroid, p1_frequent)


# --------------------------------------------------------------------------- tfds


def test_tfds_round_trip_without_tensorflow(tmp_path, small):
  import tensorflow_datasets as tfds

  from sparsejax.data.xmc_tfds import load_tfds_split
  manual = tmp_path / "manual"
  manual.mkdir()
  train = edge_dataset()
  write_bow(manual / "train.txt", train)
  write_bow(manual / "test.txt", train.take(np.array([2, 0])))
  data_dir = tmp_path / "tfds"
  got = load_tfds_split("xmc_bow/bow", "train", data_dir=data_dir, manual_dir=manual)
  assert_same(got, read_bow(manual / "train.txt"))
  assert_same(load_tfds_split("xmc_bow/bow", "test", data_dir=data_dir),
              read_bow(manual / "test.txt"))
  assert list((data_dir / "xmc_bow" / "bow" / "1.0.0").glob("*test.array_record*"))
  source = tfds.data_source("xmc_bow/bow", split="train", data_dir=data_dir, download=False)
  assert len(source) == 5
  record = source[4]
  np.testing.assert_array_equal(record["feature_ids"], [2, 3])
  np.testing.assert_array_equal(record["label_ids"], [2])
  assert record["index"] == 4
  assert "tensorflow" not in sys.modules


def test_tfds_build_reports_malformed_files(tmp_path):
  from sparsejax.data.xmc_tfds import XmcBow, XmcBowConfig, load_tfds_split
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "tr.txt").write_text("2 5 3\n" + GOOD + "0 7:1\n")
  (manual / "te.txt").write_text("1 5 3\n" + GOOD)
  config = XmcBowConfig(name="broken", train_file="tr.txt", test_file="te.txt")
  with pytest.raises(XMCFormatError, match="feature id 7") as info:
    load_tfds_split(XmcBow(config=config, data_dir=tmp_path / "a"), "train", manual_dir=manual)
  assert info.value.path.endswith("tr.txt") and info.value.line == 3
  (manual / "tr.txt").write_text("1 5 3\n" + GOOD)
  (manual / "te.txt").write_text("1 6 3\n" + GOOD)
  with pytest.raises(XMCFormatError, match=r"header D, L = 6, 3 differ"):
    load_tfds_split(XmcBow(config=config, data_dir=tmp_path / "b"), "train", manual_dir=manual)
