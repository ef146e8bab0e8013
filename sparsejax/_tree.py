"""Finding sparse layers and naming leaves in arbitrary pytrees.

The optax transforms work on any params pytree: plain dicts, ``FixedFanIn``
nodes, or the ``nnx.State`` of a Flax model. They find a fixed fan-in layer as
either a ``FixedFanIn`` node or a mapping with ``"values"`` and ``"indices"``
entries (the NNX ``FixedFanInLinear`` state, or a hand-made dict), and name a
leaf by its path, ``"encoder/layers/0/values"``, which is the same for all of
these layouts.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax import tree_util

from sparsejax.fixed_fanin import FixedFanIn


def path_name(path) -> str:
  """``"a/b/0"`` for the key path ``['a'].b[0]`` or the NNX graph path ``("a", "b", 0)``.

  The one join of path entries into a layer name: SET's ``in_features``
  lookup, SμPar's spec table and ``sparsejax.nn.fixed_fanin_sizes`` all name
  layers with it, so their names agree.
  """
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def is_sparse_layer(node) -> bool:
  """A ``FixedFanIn`` node or a mapping holding ``values`` and ``indices``."""
  return isinstance(node, FixedFanIn) or (
      isinstance(node, Mapping) and "values" in node and "indices" in node)


def values_without_indices(tree) -> list[str]:
  """Names of the mappings in ``tree`` that hold ``values`` but no ``indices``.

  The trace of a sparse layer whose topology was filtered out, e.g. the NNX
  state that ``nnx.Optimizer(..., wrt=nnx.Param)`` gives its transformation.
  """
  nodes, _ = tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda node: isinstance(node, Mapping) and "values" in node)
  return [path_name(path) or "<root>" for path, node in nodes
          if isinstance(node, Mapping) and "values" in node and "indices" not in node]


def field(layer, name: str):
  return getattr(layer, name) if isinstance(layer, FixedFanIn) else layer[name]


def replace_fields(layer, **fields):
  """A copy of a sparse layer node with some fields replaced (no validation)."""
  if isinstance(layer, FixedFanIn):
    leaves = {name: getattr(layer, name) for name in ("values", "indices", "bias")}
    leaves.update(fields)
    return FixedFanIn.tree_unflatten(
        layer.in_features, (leaves["values"], leaves["indices"], leaves["bias"]))
  return type(layer)({**layer, **fields})


def values_key(layer):
  """The key of the ``values`` child of a sparse layer node."""
  if isinstance(layer, FixedFanIn):
    return tree_util.GetAttrKey("values")
  return tree_util.DictKey("values")


def sparse_layers(tree):
  """``[(path, layer)]`` for every sparse layer node of ``tree``, in flatten order."""
  leaves, _ = tree_util.tree_flatten_with_path(tree, is_leaf=is_sparse_layer)
  return [(path, node) for path, node in leaves if is_sparse_layer(node)]


def sparse_layer_names(tree) -> list[str]:
  """Names (``"a/b"``) of the sparse layers in a params pytree, e.g. for RigL's ``layer_io``."""
  return [path_name(path) for path, _ in sparse_layers(tree)]


def flatten_layers(tree):
  """Flattens ``tree`` with each sparse layer node kept whole as one leaf."""
  return jax.tree.flatten(tree, is_leaf=is_sparse_layer)
