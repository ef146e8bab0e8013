"""Checkpoints of an XMC run (orbax), restored onto any mesh.

A checkpoint holds the model and optimizer states (as pure dicts), the step
and the running sums of the epoch in progress. The step fixes everything else:
the epoch, the position in the epoch's data order, the schedules and SET's
next rewiring (its key is folded with the step); no stateful random generator
exists to save. So a run restored from a checkpoint goes on bit for bit as the
one that wrote it.

``restore`` reads each array straight into the sharding of the state it
fills, so a checkpoint written on one mesh restores onto another mesh shape or
onto one device; the classifier's padding rows are cut or added to fit.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax.xmc.model import in_classifier

__all__ = ["checkpoint_manager", "restore", "save"]

# Length of ``epoch_sums``: the sums of the loss, main loss and aux loss, and the step count.
_NUM_SUMS = 4


def checkpoint_manager(output_dir) -> ocp.CheckpointManager:
  """The orbax manager of ``output_dir/checkpoints`` (keeps the latest two)."""
  # Synchronous saves: the next step donates the state buffers being saved.
  return ocp.CheckpointManager(
      (pathlib.Path(output_dir) / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
      item_handlers=ocp.StandardCheckpointHandler())  # known before a save: item_metadata


def _checkpoint(model_state, opt_state, step: int, epoch_sums: np.ndarray) -> dict:
  """What a checkpoint holds: both states, the step and the running epoch sums."""
  return {"model": nnx.to_pure_dict(model_state), "optimizer": nnx.to_pure_dict(opt_state),
          "step": np.asarray(step, np.int64), "epoch_sums": np.asarray(epoch_sums, np.float64)}


def save(manager: ocp.CheckpointManager, step: int, model_state, opt_state,
         epoch_sums: np.ndarray) -> None:
  """Writes the checkpoint of ``step`` (synchronously: it is complete on return).

  Arguments:
    manager: from ``checkpoint_manager``.
    step: the number of updates done.
    model_state, opt_state: the ``nnx.split`` states of the model and optimizer.
    epoch_sums: ``(4,)`` float64 sums over the epoch's steps so far: loss, main
      loss, aux loss, and the count of steps.
  """
  manager.save(step, args=ocp.args.StandardSave(
      _checkpoint(model_state, opt_state, step, epoch_sums)))


def restore(manager: ocp.CheckpointManager, model_state, opt_state) -> tuple[int, np.ndarray]:
  """Loads the latest checkpoint into the states (in place), with their shardings.

  Each array is read straight into the sharding of the state's array, so a
  checkpoint written on one mesh restores onto another mesh shape or onto one
  device. Where the classifier's padded row count differs (another number of
  label shards), its arrays are cut or zero-padded to the state's rows: the
  rows past ``L`` are padding on both sides.

  Arguments:
    manager: from ``checkpoint_manager``.
    model_state, opt_state: the states to fill, of the run's model and
      optimizer (placed with their shardings, or on one device).

  Returns:
    ``(step, epoch_sums)`` (see ``save``): ``(0, zeros)`` when there is no
    checkpoint.
  """
  latest = manager.latest_step()
  if latest is None:
    return 0, np.zeros(_NUM_SUMS)
  target = _checkpoint(model_state, opt_state, 0, np.zeros(_NUM_SUMS))
  saved_shapes = {_path_key(path): tuple(meta.shape) for path, meta in
                  jax.tree_util.tree_leaves_with_path(manager.item_metadata(latest).tree,
                                                      is_leaf=lambda x: hasattr(x, "shape"))}
  padding = {}

  def abstract(path, x):
    if isinstance(x, np.ndarray):
      return x
    sharding, saved_shape = x.sharding, saved_shapes[_path_key(path)]
    if saved_shape != x.shape:
      if saved_shape[1:] != x.shape[1:] or not in_classifier(path):
        raise ValueError(f"checkpoint {latest}: {jax.tree_util.keystr(path)} has shape "
                         f"{saved_shape}, the model {x.shape}; was it written by another "
                         "config?")
      padding[path] = x.shape[0], sharding
      if not _divides(sharding, saved_shape):  # e.g. 204 rows onto 8 shards: read whole
        sharding = NamedSharding(sharding.mesh, P())
    return jax.ShapeDtypeStruct(saved_shape, x.dtype, sharding=sharding)

  abstract_target = jax.tree_util.tree_map_with_path(abstract, target)
  saved = manager.restore(latest, args=ocp.args.StandardRestore(abstract_target))
  saved = jax.tree_util.tree_map_with_path(
      lambda path, x: _fit_rows(x, *padding[path]) if path in padding else x, saved)
  nnx.replace_by_pure_dict(model_state, saved["model"])
  nnx.replace_by_pure_dict(opt_state, saved["optimizer"])
  return int(saved["step"]), np.array(saved["epoch_sums"], np.float64)  # a writable copy


def _path_key(path) -> tuple[str, ...]:
  """A checkpoint path as strings (the metadata's dict keys are strings, the state's may not)."""
  return tuple(str(key.key) for key in path)


def _divides(sharding, shape) -> bool:
  """Whether ``sharding`` splits an array of ``shape`` evenly."""
  try:
    sharding.shard_shape(shape)
  except ValueError:
    return False
  return True


def _fit_rows(x: jax.Array, rows: int, sharding) -> jax.Array:
  """``x`` cut or zero-padded to ``rows`` rows, placed with ``sharding``."""
  def fit(x):
    x = x[:rows]
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return jax.jit(fit, out_shardings=sharding)(x)
