"""The standard-library byte corpus and window sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.data import sample_windows, stdlib_byte_corpus, stdlib_source_files


def test_stdlib_files_sorted_and_without_site_packages():
  files = stdlib_source_files()
  assert len(files) > 500
  assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
  assert files == stdlib_source_files()  # deterministic order


def test_corpus_split_by_file_and_capped():
  corpus = stdlib_byte_corpus(max_train_bytes=100_000, max_val_bytes=20_000)
  assert corpus.train.dtype == np.uint8 and len(corpus.train) == 100_000
  assert len(corpus.val) == 20_000
  files = stdlib_source_files()
  first_val, first_train = files[0].read_bytes(), files[1].read_bytes()
  assert bytes(corpus.val[:len(first_val)]) == first_val[:20_000]
  assert bytes(corpus.train[:len(first_train)]) == first_train[:100_000]
  with pytest.raises(ValueError, match="val_every"):
    stdlib_byte_corpus(val_every=1)


def test_sample_windows_shift_and_determinism():
  data = jnp.arange(1000, dtype=jnp.int32) % 256
  inputs, targets = sample_windows(data, jax.random.key(0), 8, 16)
  assert inputs.shape == targets.shape == (8, 16) and inputs.dtype == jnp.int32
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  np.testing.assert_array_equal((inputs[:, 1:] - inputs[:, :-1]) % 256, 1)
  again, _ = sample_windows(data, jax.random.key(0), 8, 16)
  np.testing.assert_array_equal(inputs, again)
  with pytest.raises(ValueError, match="more than context"):
    sample_windows(data[:10], jax.random.key(0), 2, 16)
