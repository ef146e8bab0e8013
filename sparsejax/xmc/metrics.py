"""Ranking metrics for extreme multi-label classification: P@k, nDCG@k, PSP@k.

The definitions and edge cases follow pyxclib (``xclib.evaluation.xc_metrics``),
the reference the XMC literature reports with:

- ``P@k``: hits among the top ``k`` predictions divided by ``k``, averaged over
  all points. A point with no labels has no hits, so it counts as 0.
- ``nDCG@k``: ``DCG@k = sum_{j <= k} hit_j / log2(j + 1)`` divided by the best
  achievable ``sum_{l <= min(k, |y|)} 1 / log2(l + 1)``, averaged over all
  points. A point with no labels has ``DCG = 0`` and contributes 0 (pyxclib
  divides its zero DCG by the ideal DCG of ``k`` labels).
- ``PSP@k``: a dataset-level ratio. The sum over points of the
  inverse-propensity-weighted hits in the top ``k``, divided by the sum over
  points of the best achievable weighted hits (each point's ``min(k, |y|)``
  labels of largest inverse propensity). pyxclib computes the mean of each and
  takes the ratio, which is the same thing. Points with no labels add 0 to both
  sums.

A point's labels are a set: repeated ids in ``label_ids`` count once. Values
are fractions in [0, 1]; ``format_table`` prints them as percentages, as papers
do. Everything here runs on the host in numpy (float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["RankingMetrics", "format_table", "inverse_propensity", "ranking_metrics"]


def inverse_propensity(label_counts, num_points: int, *, a: float = 0.55,
                       b: float = 1.5) -> np.ndarray:
  """Inverse propensity of each label (Jain et al., 2016), as pyxclib computes it.

  ``1 + C (N_l + B)^(-A)`` with ``C = (ln N - 1) (B + 1)^A``. Typical ``(A, B)``:
  ``(0.55, 1.5)`` by default, ``(0.5, 0.4)`` for Wikipedia, ``(0.6, 2.6)`` for
  Amazon datasets.

  Arguments:
    label_counts: ``(L,)`` training count ``N_l`` of each label, ``>= 0``.
    num_points: ``N``, the number of training points, ``>= 1``.
    a, b: the constants ``A`` and ``B``; ``b >= 0``.

  Returns:
    ``(L,)`` float64 inverse propensities (rare labels weigh more).
  """
  counts = np.asarray(label_counts, np.float64)
  if counts.ndim != 1:
    raise ValueError(f"label_counts must have shape (L,), got {counts.shape}")
  if counts.size and not (np.all(np.isfinite(counts)) and counts.min() >= 0):
    raise ValueError("label_counts must be finite and >= 0")
  if int(num_points) != num_points or num_points < 1:
    raise ValueError(f"num_points must be a positive integer, got {num_points!r}")
  if b < 0:
    raise ValueError(f"b must be >= 0, got {b}")
  c = (np.log(num_points) - 1.0) * (b + 1.0) ** a
  return 1.0 + c * (counts + b) ** (-a)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
  ks = tuple(ks)
  if not ks or any(int(k) != k or k < 1 for k in ks):
    raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
  return tuple(int(k) for k in ks)


class RankingMetrics:
  """Streaming P@k, nDCG@k and PSP@k over batches of predictions.

  Each ``update`` adds one batch's per-point sums, so evaluating a test set
  never needs all scores (or all top-k lists) at once; ``result()`` after
  any split into batches equals ``ranking_metrics`` on the whole set.

  Arguments:
    ks: the cut-offs ``k`` to report.
    inv_propensity: ``(L,)`` inverse propensities (``inverse_propensity``);
      ``PSP@k`` is reported only when given.
  """

  def __init__(self, *, ks: Sequence[int] = (1, 3, 5), inv_propensity=None):
    self.ks = _check_ks(ks)
    self.inv_propensity = None
    if inv_propensity is not None:
      self.inv_propensity = np.asarray(inv_propensity, np.float64)
      if self.inv_propensity.ndim != 1:
        raise ValueError(
            f"inv_propensity must have shape (L,), got {self.inv_propensity.shape}")
    self.num_points = 0
    self._sums = {name: np.zeros(len(self.ks)) for name in ("p", "ndcg", "psp", "psp_best")}

  def update(self, topk_ids, label_ids, label_mask) -> None:
    """Adds one batch.

    Arguments:
      topk_ids: ``(B, >= max(ks))`` integer label ids, best first (e.g. the ids
        from ``chunked_topk``). Ids in a row must be distinct.
      label_ids: ``(B, Lmax)`` integer true label ids, padded.
      label_mask: ``(B, Lmax)`` bool, True where ``label_ids`` holds a label.
    """
    sums = _batch_sums(topk_ids, label_ids, label_mask, self.ks, self.inv_propensity)
    for name, value in sums.items():
      self._sums[name] += value
    self.num_points += np.shape(topk_ids)[0]

  def result(self) -> dict[str, float]:
    """``{"P@k": ..., "nDCG@k": ..., "PSP@k": ...}`` as fractions, for each ``k``.

    ``PSP@k`` is NaN when no point seen so far has a label (0 / 0).
    """
    if self.num_points == 0:
      raise ValueError("RankingMetrics.result() called before any update with points")
    out = {}
    for i, k in enumerate(self.ks):
      out[f"P@{k}"] = float(self._sums["p"][i] / self.num_points)
    for i, k in enumerate(self.ks):
      out[f"nDCG@{k}"] = float(self._sums["ndcg"][i] / self.num_points)
    if self.inv_propensity is not None:
      for i, k in enumerate(self.ks):
        best = self._sums["psp_best"][i]
        out[f"PSP@{k}"] = float(self._sums["psp"][i] / best) if best > 0 else float("nan")
    return out


def ranking_metrics(topk_ids, label_ids, label_mask, *, inv_propensity=None,
                    ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
  """P@k, nDCG@k (and PSP@k with ``inv_propensity``) of one set of predictions.

  Arguments:
    topk_ids: ``(N, >= max(ks))`` integer predicted label ids, best first.
    label_ids: ``(N, Lmax)`` integer true label ids, padded.
    label_mask: ``(N, Lmax)`` bool, True where ``label_ids`` holds a label.
    inv_propensity: optional ``(L,)`` inverse propensities.
    ks: the cut-offs ``k``.

  Returns:
    A dict of fractions, see ``RankingMetrics.result``.
  """
  metrics = RankingMetrics(ks=ks, inv_propensity=inv_propensity)
  metrics.update(topk_ids, label_ids, label_mask)
  return metrics.result()


def _check_batch(topk_ids, label_ids, label_mask, k_max: int, inv_propensity):
  topk_ids, label_ids = np.asarray(topk_ids), np.asarray(label_ids)
  label_mask = np.asarray(label_mask)
  for name, array in (("topk_ids", topk_ids), ("label_ids", label_ids)):
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{name} must be a 2-D integer array, got {array.dtype} {array.shape}")
  if label_mask.dtype != np.bool_ or label_mask.shape != label_ids.shape:
    raise ValueError(f"label_mask must be a bool array of the shape of label_ids "
                     f"{label_ids.shape}, got {label_mask.dtype} {label_mask.shape}")
  if topk_ids.shape[0] != label_ids.shape[0]:
    raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but label_ids has "
                     f"{label_ids.shape[0]}")
  if topk_ids.shape[1] < k_max:
    raise ValueError(f"topk_ids has {topk_ids.shape[1]} columns, fewer than max(ks)={k_max}")
  topk_ids = topk_ids[:, :k_max].astype(np.int64)
  label_ids = label_ids.astype(np.int64)
  num_labels = np.inf if inv_propensity is None else inv_propensity.shape[0]
  if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= num_labels):
    raise ValueError(f"topk_ids must lie in [0, {num_labels}), got values in "
                     f"[{topk_ids.min()}, {topk_ids.max()}]")
  held = label_ids[label_mask]
  if held.size and (held.min() < 0 or held.max() >= num_labels):
    raise ValueError(f"label_ids (where label_mask) must lie in [0, {num_labels}), got "
                     f"values in [{held.min()}, {held.max()}]")
  ordered = np.sort(topk_ids, axis=1)
  repeats = np.any(ordered[:, 1:] == ordered[:, :-1], axis=1)
  if np.any(repeats):
    raise ValueError(f"topk_ids row {int(np.argmax(repeats))} repeats a label id")
  return topk_ids, label_ids, label_mask


def _batch_sums(topk_ids, label_ids, label_mask, ks, inv_propensity) -> dict[str, np.ndarray]:
  """Per-k sums over the batch's points of each metric's numerator."""
  k_max = max(ks)
  topk_ids, label_ids, label_mask = _check_batch(
      topk_ids, label_ids, label_mask, k_max, inv_propensity)
  # Each point's labels as a set: sorted, with padding and repeats set to -1.
  labels = np.sort(np.where(label_mask, label_ids, -1), axis=1)
  first = np.ones_like(labels, dtype=bool)
  first[:, 1:] = labels[:, 1:] != labels[:, :-1]
  labels = np.where(first & (labels >= 0), labels, -1)
  num_true = np.sum(labels >= 0, axis=1)
  hits = np.any(topk_ids[:, :, None] == labels[:, None, :], axis=2).astype(np.float64)

  discount = 1.0 / np.log2(np.arange(2, k_max + 2))
  dcg = np.cumsum(hits * discount, axis=1)
  ideal = np.cumsum(discount)
  sums = {name: np.zeros(len(ks)) for name in ("p", "ndcg", "psp", "psp_best")}
  cum_hits = np.cumsum(hits, axis=1)
  for i, k in enumerate(ks):
    sums["p"][i] = np.sum(cum_hits[:, k - 1]) / k
    has_labels = num_true > 0
    best_dcg = ideal[np.minimum(k, num_true[has_labels]) - 1]
    sums["ndcg"][i] = np.sum(dcg[has_labels, k - 1] / best_dcg)

  if inv_propensity is not None:
    gained = np.cumsum(hits * inv_propensity[topk_ids], axis=1)
    weights = np.where(labels >= 0, inv_propensity[np.maximum(labels, 0)], 0.0)
    best = np.cumsum(-np.sort(-weights, axis=1), axis=1)
    for i, k in enumerate(ks):
      sums["psp"][i] = np.sum(gained[:, k - 1])
      sums["psp_best"][i] = np.sum(best[:, min(k, best.shape[1]) - 1]) if best.shape[1] else 0.0
  return sums


def format_table(results: Mapping, *, digits: int = 2) -> str:
  """A markdown table of metrics, in percent.

  Arguments:
    results: one ``result()`` dict (one row), or a mapping from a row name
      (a model, a run) to such dicts. Columns are the metric names of the
      first row, in order; a metric a row lacks prints as ``-``.
    digits: decimals after the point.

  Returns:
    The table as a string, e.g. ``| P@1 | P@3 |`` / ``|---|---|`` / ``| 45.10 | 30.02 |``.
  """
  if not results:
    raise ValueError("results is empty")
  named = all(isinstance(row, Mapping) for row in results.values())
  rows = results if named else {"": results}
  columns = list(next(iter(rows.values())))

  def cell(row, name):
    return "-" if name not in row else f"{100 * row[name]:.{digits}f}"

  head = ([""] if named else []) + columns
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in rows.items():
    cells = ([str(name)] if named else []) + [cell(row, c) for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
