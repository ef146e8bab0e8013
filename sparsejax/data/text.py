"""A byte-level language-modelling corpus that every Python installation has.

The corpus is the Python standard library's own ``.py`` files, found through
``sysconfig``. Files are read in sorted path order and split by file: every
``val_every``-th file is held out for validation. The corpus therefore
depends only on the Python version.
"""

from __future__ import annotations

import pathlib
import sysconfig
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ByteCorpus", "stdlib_source_files", "stdlib_byte_corpus", "sample_windows"]


class ByteCorpus(NamedTuple):
  """Train and validation bytes, each a 1-D ``uint8`` array (files concatenated)."""
  train: np.ndarray
  val: np.ndarray


def stdlib_source_files() -> list[pathlib.Path]:
  """The standard library's ``.py`` files (not site-packages), sorted by relative path."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
  if not files:
    raise FileNotFoundError(f"no .py files under the standard library path {root}")
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_byte_corpus(*, val_every: int = 10, max_train_bytes: int | None = None,
                       max_val_bytes: int | None = None) -> ByteCorpus:
  """Reads the standard library's sources as bytes, split by file.

  Arguments:
    val_every: file ``i`` (in sorted order) goes to validation when
      ``i % val_every == 0``.
    max_train_bytes, max_val_bytes: keep at most this many bytes of each split
      (the first files in order); ``None`` keeps all (~30 MB in total).

  Returns:
    A ``ByteCorpus``.
  """
  if val_every < 2:
    raise ValueError(f"val_every must be >= 2, got {val_every}")
  splits = {"train": [], "val": []}
  budget = {"train": max_train_bytes, "val": max_val_bytes}
  used = {"train": 0, "val": 0}
  for i, path in enumerate(stdlib_source_files()):
    split = "val" if i % val_every == 0 else "train"
    if budget[split] is not None and used[split] >= budget[split]:
      continue
    data = path.read_bytes()
    splits[split].append(data)
    used[split] += len(data)
  train, val = (np.frombuffer(b"".join(splits[s]), np.uint8) for s in ("train", "val"))
  return ByteCorpus(train[:max_train_bytes], val[:max_val_bytes])


def sample_windows(data: jax.Array, key: jax.Array, batch: int, context: int):
  """Random windows for next-byte prediction.

  Arguments:
    data: 1-D integer array of bytes (pass it as a jit argument, not a constant).
    key: PRNG key choosing the window starts.
    batch, context: number and length of windows.

  Returns:
    ``(inputs, targets)``, int32 ``(batch, context)``, targets shifted by one.
  """
  if data.shape[0] <= context + 1:
    raise ValueError(f"need more than context + 1 = {context + 1} bytes, got {data.shape[0]}")
  starts = jax.random.randint(key, (batch,), 0, data.shape[0] - context - 1)
  offsets = starts[:, None] + jnp.arange(context + 1)
  windows = data[offsets].astype(jnp.int32)
  return windows[:, :-1], windows[:, 1:]
