"""Data utilities: corpora and batching shared by the experiments."""

from sparsejax.data.text import ByteCorpus, sample_windows, stdlib_byte_corpus, stdlib_source_files

__all__ = ["ByteCorpus", "sample_windows", "stdlib_byte_corpus", "stdlib_source_files"]
