"""A synthetic XMC dataset with long-tailed labels and planted, learnable structure.

How a point is made (every draw comes from ``numpy`` generators seeded by ``seed``:
one stream for the tables below and one per block of 65,536 points):

1. Labels. Label ranks follow Zipf's law, ``P(rank r) ∝ r^(-zipf_exponent)``,
   and a random permutation maps ranks to label ids, so frequency does not
   follow the id. A point draws ``1 + Binomial(max_labels - 1, p)`` labels with
   ``p`` set for a mean of ``mean_labels``; labels drawn twice count once.
2. Signature features. Label ``l`` owns ``signature_size`` feature ids given by
   a seeded integer hash of ``(l, slot)`` (``signature_features``), so nothing of
   size ``num_labels x signature_size`` is stored. Each of the point's labels
   contributes each of its signature features with probability ``signature_keep``.
3. Background features. ``Poisson(mean_background)`` ids drawn from a Zipf law
   (exponent 1) over a random permutation of the features: common "words" that
   carry no signal.
4. Values. Every occurrence has a term count ``1 + Poisson(1)``; repeated ids in
   a point add their counts. The value is ``(1 + ln tf) * idf``, with the smooth
   idf ``ln((1 + N_train) / (1 + df)) + 1`` from training document frequencies,
   and each point is scaled to unit L2 norm.

Train and test points come from the same distribution; test labels that never
occur in training exist, as in real XMC data. Work and memory are
O(num_labels + number of non-zeros): no loop in Python over labels or points.
"""

from __future__ import annotations

import numpy as np

from sparsejax.data.xmc import _INT32_MAX, XMCDataset, _check_int

__all__ = ["synthetic_xmc", "signature_features"]


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser on uint64 arrays (numpy array arithmetic wraps mod 2**64)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _signature_salt(seed: int) -> np.uint64:
  return np.random.default_rng([seed, 1]).integers(0, 2**63, dtype=np.uint64)


def signature_features(label_ids: np.ndarray, *, seed: int, num_features: int,
                       signature_size: int) -> np.ndarray:
  """The signature feature ids of labels, as used by ``synthetic_xmc``.

  Arguments:
    label_ids: ``(n,)`` integer label ids.
    seed, num_features, signature_size: as given to ``synthetic_xmc``.

  Returns:
    ``(n, signature_size)`` int32 ids in ``[0, num_features)`` (ids of one label may
    coincide).
  """
  labels = np.asarray(label_ids, np.uint64)
  keys = labels[:, None] * np.uint64(signature_size) + np.arange(signature_size, dtype=np.uint64)
  return (_mix64(keys ^ _signature_salt(seed)) % np.uint64(num_features)).astype(np.int32)


_BLOCK = 65_536  # points per block; each block has its own random stream


def _zipf_table(rng: np.random.Generator, size: int, exponent: float):
  """CDF over ranks ``(size,)`` float64 and the seeded rank -> id permutation ``(size,)`` int32."""
  cdf = np.cumsum(np.arange(1, size + 1, dtype=np.float64) ** -exponent)
  cdf /= cdf[-1]
  cdf[-1] = 1.0  # rounding must not leave a draw above the last bin
  return cdf, rng.permutation(size).astype(np.int32)


def _zipf_draw(table, rng: np.random.Generator, n: int) -> np.ndarray:
  cdf, id_of_rank = table
  return id_of_rank[np.searchsorted(cdf, rng.random(n), side="right")]


def _csr(rows: np.ndarray, cols: np.ndarray, num_rows: int):
  """Sorted unique (row, col) pairs as CSR.

  Returns:
    ``indptr (num_rows+1,)`` int64, ``cols (nnz,)`` int32, and ``inverse``
    ``(len(rows),)``: the slot of each input pair.
  """
  width = np.int64(cols.max(initial=0)) + 1
  keys, inverse = np.unique(rows.astype(np.int64) * width + cols, return_inverse=True)
  indptr = np.zeros(num_rows + 1, np.int64)
  np.cumsum(np.bincount(keys // width, minlength=num_rows), out=indptr[1:])
  return indptr, (keys % width).astype(np.int32), inverse


def _block(rng, n, label_table, feature_table, *, seed, num_features, max_labels, mean_labels,
           signature_size, signature_keep, mean_background):
  """Labels and term counts of ``n`` points: label CSR, feature CSR and ``tf (nnz_f,)``."""
  p_extra = 0.0 if max_labels == 1 else (mean_labels - 1) / (max_labels - 1)
  label_rows = np.repeat(np.arange(n), 1 + rng.binomial(max_labels - 1, p_extra, size=n))
  label_indptr, label_ids, _ = _csr(label_rows, _zipf_draw(label_table, rng, label_rows.size), n)

  sig = signature_features(label_ids, seed=seed, num_features=num_features,
                           signature_size=signature_size)
  keep = rng.random(sig.shape) < signature_keep
  pair_rows = np.repeat(np.arange(n), np.diff(label_indptr))
  bg_rows = np.repeat(np.arange(n), rng.poisson(mean_background, size=n))
  rows = np.concatenate([np.broadcast_to(pair_rows[:, None], sig.shape)[keep], bg_rows])
  ids = np.concatenate([sig[keep], _zipf_draw(feature_table, rng, bg_rows.size)])

  feature_indptr, feature_ids, inverse = _csr(rows, ids, n)
  tf = np.bincount(inverse, weights=1.0 + rng.poisson(1.0, size=rows.size),
                   minlength=feature_ids.size)
  return label_indptr, label_ids, feature_indptr, feature_ids, tf


def _concat_csr(indptrs: list[np.ndarray]) -> np.ndarray:
  offsets = np.cumsum([0] + [p[-1] for p in indptrs[:-1]])
  return np.concatenate([[0]] + [p[1:] + o for p, o in zip(indptrs, offsets)]).astype(np.int64)


def synthetic_xmc(*, seed: int, num_train: int = 20_000, num_test: int = 5_000,
                  num_features: int = 16_384, num_labels: int = 4_096,
                  zipf_exponent: float = 1.0, mean_labels: float = 3.0, max_labels: int = 8,
                  signature_size: int = 8, signature_keep: float = 0.4,
                  mean_background: float = 30.0) -> tuple[XMCDataset, XMCDataset]:
  """Generates train and test splits (see the module docstring for the model).

  Arguments:
    seed: non-negative; the same seed gives identical arrays.
    num_train, num_test: points per split (``num_train >= 1``, ``num_test >= 0``).
    num_features, num_labels: ``D`` and ``L`` in ``[1, 2**31)``; up to millions of labels.
    zipf_exponent: ``a`` in ``P(rank r) ∝ r^-a``; larger means a heavier head.
    mean_labels, max_labels: mean and maximum labels drawn per point (at least 1).
    signature_size: feature ids owned by each label.
    signature_keep: probability that a point shows each signature feature of
      each of its labels.
    mean_background: mean number of background features per point.

  Integer arguments must be integers and float ones finite; anything out of
  range raises ``ValueError``.

  Returns:
    ``(train, test)`` ``XMCDataset``s with unit-norm feature rows.
  """
  for name, value, low, high in (("seed", seed, 0, None), ("num_train", num_train, 1, None),
                                 ("num_test", num_test, 0, None),
                                 ("num_features", num_features, 1, _INT32_MAX),
                                 ("num_labels", num_labels, 1, _INT32_MAX),
                                 ("max_labels", max_labels, 1, None),
                                 ("signature_size", signature_size, 1, None)):
    _check_int(name, value, low, high)
  # Every comparison below is False for NaN, so NaN is refused too.
  if not 1 <= mean_labels <= max_labels:
    raise ValueError(f"need 1 <= mean_labels <= max_labels, got {mean_labels}, {max_labels}")
  if not 0 < signature_keep <= 1:
    raise ValueError(f"need 0 < signature_keep <= 1, got {signature_keep}")
  for name, value in (("mean_background", mean_background), ("zipf_exponent", zipf_exponent)):
    if not 0 <= value < np.inf:
      raise ValueError(f"{name} must be finite and >= 0, got {value}")
  n = num_train + num_test
  rng = np.random.default_rng([seed, 0])
  label_table = _zipf_table(rng, num_labels, zipf_exponent)
  feature_table = _zipf_table(rng, num_features, 1.0)
  blocks = [_block(np.random.default_rng([seed, 2, b]), min(_BLOCK, n - lo), label_table,
                   feature_table, seed=seed, num_features=num_features, max_labels=max_labels,
                   mean_labels=mean_labels, signature_size=signature_size,
                   signature_keep=signature_keep, mean_background=mean_background)
            for b, lo in enumerate(range(0, n, _BLOCK))]
  label_indptr = _concat_csr([b[0] for b in blocks])
  label_ids = np.concatenate([b[1] for b in blocks])
  feature_indptr = _concat_csr([b[2] for b in blocks])
  feature_ids = np.concatenate([b[3] for b in blocks])
  tf = np.concatenate([b[4] for b in blocks]).astype(np.float32)
  del blocks

  df = np.bincount(feature_ids[:feature_indptr[num_train]], minlength=num_features)
  idf = (np.log((1.0 + num_train) / (1.0 + df)) + 1.0).astype(np.float32)
  values = (1.0 + np.log(tf, out=tf)) * idf[feature_ids]
  del tf
  # Row norms from prefix sums of squares: no (nnz,) row-id array is needed.
  sq = np.concatenate([[0.0], np.cumsum(values.astype(np.float64) ** 2)])
  norms = np.sqrt(sq[feature_indptr[1:]] - sq[feature_indptr[:-1]]).astype(np.float32)
  values /= np.repeat(norms, np.diff(feature_indptr))

  def split(lo: int, hi: int) -> XMCDataset:
    f0, f1, l0, l1 = feature_indptr[lo], feature_indptr[hi], label_indptr[lo], label_indptr[hi]
    return XMCDataset(feature_indptr[lo:hi + 1] - f0, feature_ids[f0:f1], values[f0:f1],
                      label_indptr[lo:hi + 1] - l0, label_ids[l0:l1], num_features, num_labels)
  return split(0, num_train), split(num_train, n)
