"""Data utilities: corpora, XMC datasets and batching shared by the experiments.

The tensorflow-datasets builder lives in ``sparsejax.data.xmc_tfds`` (the ``data``
extra); it is not imported here, so the rest works without tfds installed.
"""

from sparsejax.data.synthetic_xmc import signature_features, synthetic_xmc
from sparsejax.data.text import ByteCorpus, sample_windows, stdlib_byte_corpus, stdlib_source_files
from sparsejax.data.xmc import (XMCDataset, XMCFormatError, batches, bow_header,
                                check_train_test, epoch_order, hash_tokenize, iter_bow, pad_points,
                                pad_tokens, read_bow, read_raw_text, split_off, steps_per_epoch,
                                write_bow, write_raw_text)

__all__ = ["ByteCorpus", "XMCDataset", "XMCFormatError", "batches", "bow_header",
           "check_train_test", "epoch_order", "hash_tokenize", "iter_bow", "pad_points",
           "pad_tokens", "read_bow", "read_raw_text", "sample_windows", "signature_features",
           "split_off", "stdlib_byte_corpus", "stdlib_source_files", "steps_per_epoch",
           "synthetic_xmc",
           "write_bow", "write_raw_text"]
