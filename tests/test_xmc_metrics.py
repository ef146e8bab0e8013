"""XMC ranking metrics: hand-computed cases, a pyxclib-style reference, streaming."""

import math

import numpy as np
import pytest

from sparsejax import xmc

LOG2 = math.log2


def test_inverse_propensity_matches_the_formula():
  counts = np.array([0, 1, 10, 1000])
  got = xmc.inverse_propensity(counts, 5000, a=0.6, b=2.6)
  c = (math.log(5000) - 1) * (2.6 + 1) ** 0.6
  want = [1 + c * (n + 2.6) ** -0.6 for n in counts]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert got.dtype == np.float64
  assert np.all(np.diff(got) < 0)  # rarer labels weigh more


@pytest.mark.parametrize("counts, n, match", [
    ([[1, 2]], 10, "shape"), ([-1, 2], 10, ">= 0"), ([1, 2], 0, "num_points"),
    ([1, 2], 2.5, "num_points"), ([1, np.nan], 10, "finite")])
def test_inverse_propensity_rejects_bad_input(counts, n, match):
  with pytest.raises(ValueError, match=match):
    xmc.inverse_propensity(counts, n)


def _pad(label_sets, width):
  ids = np.zeros((len(label_sets), width), np.int32)
  mask = np.zeros((len(label_sets), width), bool)
  for row, labels in enumerate(label_sets):
    ids[row, :len(labels)], mask[row, :len(labels)] = labels, True
  return ids, mask


def test_hand_computed_precision_and_ndcg():
  # Point 0: hits at ranks 1 and 3 of 2 labels; point 1: no labels (counts 0);
  # point 2: one label, hit at rank 5; point 3: the label 6 repeated counts once.
  topk = np.array([[3, 0, 1, 4, 5], [0, 1, 2, 3, 4], [0, 1, 2, 3, 7], [6, 1, 2, 3, 4]])
  ids, mask = _pad([[1, 3], [], [7], [6, 6]], 3)
  got = xmc.ranking_metrics(topk, ids, mask)
  assert list(got) == ["P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5"]
  ideal2 = 1 + 1 / LOG2(3)
  want = {
      "P@1": (1 + 0 + 0 + 1) / 4,
      "P@3": (2 / 3 + 0 + 0 + 1 / 3) / 4,
      "P@5": (2 / 5 + 0 + 1 / 5 + 1 / 5) / 4,
      "nDCG@1": (1 + 0 + 0 + 1) / 4,
      "nDCG@3": ((1 + 1 / LOG2(4)) / ideal2 + 0 + 0 + 1) / 4,
      "nDCG@5": ((1 + 1 / LOG2(4)) / ideal2 + 0 + (1 / LOG2(6)) / 1 + 1) / 4,
  }
  for name, value in want.items():
    assert got[name] == pytest.approx(value, rel=1e-12), name


def test_hand_computed_psp_with_ties_and_few_labels():
  w = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 8.0])
  # Point 0: labels {1, 3, 4} (3 and 4 tie at weight 5); predicted 3 then 0 then 1.
  # Point 1: label {5} only, predicted at rank 2. Point 2: no labels, adds nothing.
  topk = np.array([[3, 0, 1], [2, 5, 0], [0, 1, 2]])
  ids, mask = _pad([[1, 3, 4], [5], []], 3)
  got = xmc.ranking_metrics(topk, ids, mask, inv_propensity=w, ks=(1, 2, 3))
  assert got["PSP@1"] == pytest.approx((5 + 0) / (5 + 8))
  assert got["PSP@2"] == pytest.approx((5 + 8) / ((5 + 5) + 8))
  assert got["PSP@3"] == pytest.approx((5 + 2 + 8) / ((5 + 5 + 2) + 8))
  assert got["P@2"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)


def test_psp_is_nan_without_any_label():
  ids, mask = _pad([[], []], 2)
  got = xmc.ranking_metrics(np.array([[0], [1]]), ids, mask, inv_propensity=np.ones(3), ks=(1,))
  assert got["P@1"] == 0 and got["nDCG@1"] == 0 and math.isnan(got["PSP@1"])


def _pyxclib_reference(scores, truth, inv_psp, k):
  """P@1..k, nDCG@1..k, PSP@1..k from dense arrays, following pyxclib's xc_metrics."""
  num, _ = truth.shape
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  flags = np.take_along_axis(truth, order, axis=1).astype(np.float64)
  precision = np.mean(np.cumsum(flags, axis=1) / np.arange(1, k + 1), axis=0)
  total = truth.sum(axis=1).astype(np.int64)
  cumsum = np.cumsum(1 / np.log2(np.arange(1, max(total.max(), k) + 1) + 1))
  n = cumsum[total - 1]  # pyxclib: index -1 for a point without labels
  dcg = np.cumsum(flags / np.log2(np.arange(k) + 2), axis=1)
  ndcg = np.array([np.mean(dcg[:, j] / np.minimum(n, cumsum[j])) for j in range(k)])
  weighted = truth * inv_psp
  best = -np.sort(-weighted, axis=1)[:, :k]
  gained = np.take_along_axis(weighted, order, axis=1)
  psp = (np.mean(np.cumsum(gained, axis=1) / np.arange(1, k + 1), axis=0)
         / np.mean(np.cumsum(best, axis=1) / np.arange(1, k + 1), axis=0))
  return precision, ndcg, psp


def test_random_scores_match_a_pyxclib_style_reference():
  rng = np.random.default_rng(0)
  num, num_labels, k = 200, 30, 5
  scores = rng.normal(size=(num, num_labels))
  truth = rng.random((num, num_labels)) < rng.uniform(0, 0.2, (num, 1))
  truth[:10] = False  # some points without labels
  truth[10, :2] = True  # and some with fewer than k
  truth[10, 2:] = False
  inv_psp = xmc.inverse_propensity(rng.integers(0, 50, num_labels), 1000)
  topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  lmax = truth.sum(axis=1).max()
  ids, mask = _pad([np.flatnonzero(row) for row in truth], lmax)
  got = xmc.ranking_metrics(topk, ids, mask, inv_propensity=inv_psp, ks=range(1, k + 1))
  precision, ndcg, psp = _pyxclib_reference(scores, truth, inv_psp, k)
  for j in range(k):
    assert got[f"P@{j + 1}"] == pytest.approx(precision[j], rel=1e-12)
    assert got[f"nDCG@{j + 1}"] == pytest.approx(ndcg[j], rel=1e-12)
    assert got[f"PSP@{j + 1}"] == pytest.approx(psp[j], rel=1e-12)


def test_streaming_over_uneven_batches_equals_one_shot():
  rng = np.random.default_rng(1)
  num, num_labels = 101, 40
  topk = np.stack([rng.permutation(num_labels)[:5] for _ in range(num)])
  ids = rng.integers(0, num_labels, (num, 6))
  mask = rng.random((num, 6)) < 0.5
  w = rng.uniform(1, 4, num_labels)
  whole = xmc.ranking_metrics(topk, ids, mask, inv_propensity=w)
  metrics = xmc.RankingMetrics(inv_propensity=w)
  for lo, hi in [(0, 1), (1, 40), (40, 40), (40, 101)]:
    metrics.update(topk[lo:hi], ids[lo:hi], mask[lo:hi])
  assert metrics.num_points == num
  streamed = metrics.result()
  assert list(streamed) == list(whole)
  for name in whole:
    assert streamed[name] == pytest.approx(whole[name], rel=1e-12)


@pytest.mark.parametrize("case, match", [
    ("few_columns", "fewer than max"), ("repeat", "repeats a label"),
    ("label_range", "label_ids"), ("pred_range", "topk_ids must lie"),
    ("mask_dtype", "label_mask"), ("rows", "rows")])
def test_bad_batches_raise(case, match):
  topk, ids, mask = np.array([[0, 1, 2]]), np.array([[0, 1]]), np.array([[True, False]])
  w = np.ones(4)
  if case == "few_columns":
    topk = topk[:, :2]
  elif case == "repeat":
    topk = np.array([[0, 1, 0]])
  elif case == "label_range":
    ids = np.array([[4, 1]])
  elif case == "pred_range":
    topk = np.array([[0, 1, 9]])
  elif case == "mask_dtype":
    mask = mask.astype(int)
  elif case == "rows":
    ids, mask = np.zeros((2, 2), int), np.zeros((2, 2), bool)
  with pytest.raises(ValueError, match=match):
    xmc.ranking_metrics(topk, ids, mask, inv_propensity=w, ks=(1, 3))


def test_masked_out_label_ids_are_ignored():
  # Padding may hold any id, even one out of range: only masked-in ids are labels.
  got = xmc.ranking_metrics(np.array([[2]]), np.array([[2, 99]]), np.array([[True, False]]),
                            inv_propensity=np.ones(3), ks=(1,))
  assert got == {"P@1": 1.0, "nDCG@1": 1.0, "PSP@1": 1.0}


def test_result_needs_points_and_ks_must_be_positive():
  with pytest.raises(ValueError, match="before any update"):
    xmc.RankingMetrics().result()
  with pytest.raises(ValueError, match="ks"):
    xmc.RankingMetrics(ks=(0, 1))


def test_format_table():
  one = {"P@1": 0.5, "P@3": 0.12346}
  assert xmc.format_table(one) == "| P@1 | P@3 |\n|---|---|\n| 50.00 | 12.35 |"
  rows = {"dense": one, "fan-in 64": {"P@1": 0.25}}
  assert xmc.format_table(rows, digits=1).splitlines() == [
      "|  | P@1 | P@3 |", "|---|---|---|", "| dense | 50.0 | 12.3 |", "| fan-in 64 | 25.0 | - |"]
  with pytest.raises(ValueError, match="empty"):
    xmc.format_table({})
