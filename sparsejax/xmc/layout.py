"""How a label-sharded XMC run lays out its arrays on a ``("data", "labels")`` mesh.

The classifier's rows (its params, their Adam moments and SET state) are split
over the ``labels`` axis, each batch over ``data``; everything else (the
encoder, step counts) is replicated. Several processes (hosts) may share the
mesh: each places its own devices' slices of values that every process holds
whole (``put``), and ``to_host`` gathers a sharded array back on every
process.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax.xmc.model import in_classifier
from sparsejax.xmc.sharded import mesh_from_spec, padded_num_labels

__all__ = ["Layout", "put", "to_host"]


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a run on a mesh lays out its arrays on the devices.

  The classifier's arrays have ``num_padded`` rows, ``L`` rounded up to a
  multiple of the label shards; the rows past ``L`` are zero padding that never
  counts in the loss or the top-k (``XMCModel.pad_labels`` adds them).

  Attributes:
    mesh: the ``("data", "labels")`` device mesh.
    num_labels: ``L``.
    num_padded: rows of the classifier's arrays.
  """
  mesh: Mesh
  num_labels: int
  num_padded: int

  @classmethod
  def create(cls, spec: str, num_labels: int, devices=None) -> Layout:
    """The layout of ``spec`` (``"data:2,labels:4"``) over ``devices`` (default: all)."""
    mesh = mesh_from_spec(spec, devices)
    return cls(mesh, num_labels, padded_num_labels(num_labels, mesh.shape["labels"]))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch(self) -> NamedSharding:
    """Batches: points split over the data axis."""
    return NamedSharding(self.mesh, P("data"))

  def shardings(self, state):
    """A ``NamedSharding`` per leaf of ``state`` (model or optimizer state, or its shapes).

    Leaves of the classifier (``sparsejax.xmc.in_classifier``) with
    ``num_padded`` rows (the params, their Adam moments) are split by rows over
    the label axis; all others (the encoder, step counts) are replicated.
    """
    rows = NamedSharding(self.mesh, P("labels"))

    def sharding(path, leaf):
      on_labels = (in_classifier(path) and len(leaf.shape) >= 1
                   and leaf.shape[0] == self.num_padded)
      return rows if on_labels else self.replicated

    return jax.tree_util.tree_map_with_path(sharding, state)


def put(tree, shardings):
  """Global arrays from host values that every process holds whole (``shardings`` per leaf).

  Each process copies only the slices of its own devices, so this works with
  one process or many.
  """
  def place(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(place, tree, shardings)


def to_host(x) -> np.ndarray:
  """The whole value of a (possibly sharded over processes) array, on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
