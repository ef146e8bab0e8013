"""A tensorflow-datasets builder for Extreme Classification Repository BoW data.

``XmcBow`` (registered as ``xmc_bow``) reads ``train.txt`` and ``test.txt`` in BoW
format (``sparsejax.data.xmc``) from the manual directory and writes
``array_record`` files, which ``tfds.data_source`` serves by random access.
Building and reading need ``tensorflow-datasets`` and ``array-record``, not
TensorFlow (the builder is always created with ``file_format="array_record"``).

Every point is one record: ``index`` (its 0-based line among the points),
``label_ids``, ``feature_ids`` and ``feature_values``. ``D`` and ``L`` of the
headers are kept in the dataset's metadata (``info.metadata``).

    train = load_tfds_split("xmc_bow/eurlex-4k", "train", data_dir="/data/tfds",
                            manual_dir="/data/xmc/Eurlex")   # an XMCDataset
    source = tfds.data_source("xmc_bow/eurlex-4k", split="test", data_dir="/data/tfds")
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from sparsejax.data.xmc import XMCDataset, XMCFormatError, bow_header, iter_bow

__all__ = ["XmcBow", "XmcBowConfig", "load_tfds_split"]

_READ_CHUNK = 4096  # records deserialised per call


@dataclasses.dataclass(eq=False)
class XmcBowConfig(tfds.core.BuilderConfig):
  """One BoW dataset: its name picks the output folder, the files are in the manual dir.

  Attributes:
    train_file, test_file: file names inside the manual directory.
  """
  train_file: str = "train.txt"
  test_file: str = "test.txt"


def _config(name: str, description: str) -> XmcBowConfig:
  return XmcBowConfig(name=name, version="1.0.0", description=description)


class XmcBow(tfds.core.GeneratorBasedBuilder):
  """BoW train/test files of the Extreme Classification Repository as array_record."""

  name = "xmc_bow"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    _config("bow", "Any BoW train.txt/test.txt pair (the default)."),
    _config("eurlex-4k", "EURLex-4K, BoW features."),
    _config("wiki10-31k", "Wiki10-31K, BoW features."),
    _config("amazoncat-13k", "AmazonCat-13K, BoW features."),
    _config("amazon-670k", "Amazon-670K, BoW features."),
    _config("wiki-500k", "Wiki-500K, BoW features."),
    _config("amazon-3m", "Amazon-3M, BoW features."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the dataset's BoW archive from the Extreme Classification Repository "
    "(http://manikvarma.org/downloads/XC/XMLRepository.html), extract it, and pass the "
    "folder that holds train.txt and test.txt (header 'N D L', then 'l1,l2 f:v ...' "
    "lines) as DownloadConfig(manual_dir=...).")

  def __init__(self, **kwargs):
    if kwargs.setdefault("file_format", "array_record") != "array_record":
      raise ValueError(f"XmcBow writes array_record only, got file_format={kwargs['file_format']!r}")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Extreme multi-label data: sparse BoW features and label sets per point.",
      features=tfds.features.FeaturesDict({
        "index": tfds.features.Scalar(np.int64),
        "label_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "feature_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "feature_values": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      }),
      homepage="http://manikvarma.org/downloads/XC/XMLRepository.html",
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    paths = {"train": dl_manager.manual_dir / self.builder_config.train_file,
             "test": dl_manager.manual_dir / self.builder_config.test_file}
    headers = {split: bow_header(path) for split, path in paths.items()}
    _, num_features, num_labels = headers["train"]
    _, test_features, test_labels = headers["test"]
    if (test_features, test_labels) != (num_features, num_labels):
      raise XMCFormatError(paths["test"], 1, f"header D, L = {test_features}, {test_labels} differ "
                           f"from {paths['train']}'s {num_features}, {num_labels}")
    self.info.metadata.update(num_features=num_features, num_labels=num_labels)
    return {split: self._generate_examples(path) for split, path in paths.items()}

  def _generate_examples(self, path):
    for i, (label_ids, feature_ids, feature_values) in enumerate(iter_bow(path)):
      yield i, {"index": i, "label_ids": label_ids, "feature_ids": feature_ids,
                "feature_values": feature_values}


def load_tfds_split(name_or_builder: str | tfds.core.DatasetBuilder, split: str,
                    data_dir: str | os.PathLike | None = None,
                    manual_dir: str | os.PathLike | None = None) -> XMCDataset:
  """Prepares (if needed) and reads one split through ``tfds.data_source``.

  Arguments:
    name_or_builder: a name such as ``"xmc_bow/eurlex-4k"``, or a builder
      (e.g. ``XmcBow(config=XmcBowConfig(name="mine"), data_dir=...)``).
    split: ``"train"`` or ``"test"``; a tfds slice must start at the first point
      (``"train[:1000]"``).
    data_dir: where tfds keeps prepared data (with a name only).
    manual_dir: the folder with the BoW files, used when the split is not prepared yet.

  Returns:
    The split as an ``XMCDataset``, points in file order.
  """
  if isinstance(name_or_builder, str):
    builder = tfds.builder(name_or_builder, data_dir=data_dir)
  elif data_dir is not None:
    raise ValueError("data_dir is set on the builder; pass it there, not here")
  else:
    builder = name_or_builder
  # The same steps as tfds.data_source(name, split=...), keeping the builder for its metadata.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  source, info = builder.as_data_source(split=split), builder.info

  def rows():
    for lo in range(0, len(source), _READ_CHUNK):
      keys = list(range(lo, min(lo + _READ_CHUNK, len(source))))
      for key, record in zip(keys, source.__getitems__(keys)):
        if record["index"] != key:
          raise ValueError(f"split {split!r} of {info.full_name}: record {key} holds point "
                           f"{record['index']} (pass a whole split, not a slice)")
        yield record["label_ids"], record["feature_ids"], record["feature_values"]
  return XMCDataset.from_rows(rows(), info.metadata["num_features"], info.metadata["num_labels"])
