"""Checkpoints of an XMC run (orbax): verified on restore, restored onto any mesh.

A checkpoint holds two items:

- ``state``: the model and optimizer states (as pure dicts), the step and the
  running sums of the epoch in progress. The step fixes everything else: the
  epoch, the position in the epoch's data order, the schedules and SET's next
  rewiring (its key is folded with the step); no stateful random generator
  exists to save. So a run restored from a checkpoint goes on bit for bit as
  the one that wrote it.
- ``meta`` (JSON): the run's configuration and a checksum of every array of
  ``state`` (``checksums``).

``restore`` tries the checkpoints newest first. One that is incomplete (no
commit marker), unreadable (e.g. a truncated manifest) or whose arrays do not
match their checksums is reported in one line naming its step and directory,
moved to ``damaged_checkpoints/`` beside ``checkpoints/`` (kept, not deleted,
so that nothing is lost) and the next older one is tried; when none is intact
it raises ``CheckpointError``. A checkpoint whose configuration differs from
the run's is refused with ``CheckpointError`` naming the settings.

``restore`` reads each array straight into the sharding of the state it
fills, so a checkpoint written on one mesh restores onto another mesh shape or
onto one device; the classifier's padding rows are cut or added to fit. The
checksums are computed on the device, as a sum over the array's words, so they
are the same however the array is split over devices.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax.xmc.model import in_classifier

__all__ = ["CheckpointError", "checkpoint_manager", "checksums", "read_checkpoint", "restore",
           "save", "saved_config"]

# Length of ``epoch_sums``: the sums of the loss, main loss and aux loss, and the step count.
_NUM_SUMS = 4
_FORMAT = 1
# Orbax writes this file last into a finished step directory.
_COMMIT_MARKER = "commit_success.txt"
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointError(ValueError):
  """No intact checkpoint to resume from, or one written by a different configuration."""


def checkpoint_manager(output_dir) -> ocp.CheckpointManager:
  """The orbax manager of ``output_dir/checkpoints`` (keeps the latest two)."""
  # Synchronous saves: the next step donates the state buffers being saved.
  return ocp.CheckpointManager(
      (pathlib.Path(output_dir) / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
      item_names=("state", "meta"),
      item_handlers={"state": ocp.StandardCheckpointHandler(),  # known before a save: metadata
                     "meta": ocp.JsonCheckpointHandler()})


def _is_key(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


def _pure(state) -> dict:
  """``nnx.to_pure_dict(state)`` with PRNG keys (a ``PrunedGrad``'s stream) as their uint32 data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                      nnx.to_pure_dict(state))


def _replace(state, saved: dict) -> None:
  """Fills ``state`` (in place) from a ``_pure`` dict, wrapping key data back into keys."""
  like = nnx.to_pure_dict(state)
  nnx.replace_by_pure_dict(state, jax.tree.map(
      lambda x, old: jax.random.wrap_key_data(x, impl=jax.random.key_impl(old))
      if _is_key(old) else x, saved, like))


def _checkpoint(model_state, opt_state, step: int, epoch_sums: np.ndarray) -> dict:
  """What a checkpoint's ``state`` holds: both states, the step and the running epoch sums."""
  return {"model": _pure(model_state), "optimizer": _pure(opt_state),
          "step": np.asarray(step, np.int64), "epoch_sums": np.asarray(epoch_sums, np.float64)}


def save(manager: ocp.CheckpointManager, step: int, model_state, opt_state,
         epoch_sums: np.ndarray, *, config: Mapping) -> None:
  """Writes the checkpoint of ``step`` with its checksums (synchronously: complete on return).

  Arguments:
    manager: from ``checkpoint_manager``.
    step: the number of updates done.
    model_state, opt_state: the ``nnx.split`` states of the model and optimizer.
    epoch_sums: ``(4,)`` float64 sums over the epoch's steps so far: loss, main
      loss, aux loss, and the count of steps.
    config: the run's configuration (JSON-serialisable), which ``restore``
      compares with the resuming run's.
  """
  state = _checkpoint(model_state, opt_state, step, epoch_sums)
  meta = {"format": _FORMAT, "config": dict(config), "checksums": checksums(state)}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)))


def saved_config(manager: ocp.CheckpointManager) -> dict | None:
  """The configuration stored in the newest readable checkpoint, or None if there is none."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return _read_meta(manager, step)["config"]
    except _Damaged:
      continue
  return None


def restore(manager: ocp.CheckpointManager, model_state, opt_state, *,
            config: Mapping | None = None,
            report: Callable[[str], None] = print) -> tuple[int, np.ndarray]:
  """Loads the newest intact checkpoint into the states (in place), with their shardings.

  Each array is read straight into the sharding of the state's array, so a
  checkpoint written on one mesh restores onto another mesh shape or onto one
  device. Where the classifier's padded row count differs (another number of
  label shards), its arrays are cut or zero-padded to the state's rows: the
  rows past ``L`` are padding on both sides. Every array is checked against
  its checksum before any of it is used.

  Arguments:
    manager: from ``checkpoint_manager``.
    model_state, opt_state: the states to fill, of the run's model and
      optimizer (placed with their shardings, or on one device).
    config: the settings that must equal those the checkpoint was written with
      (a mapping of some of its config's fields), or None to accept any.
    report: called with one line for each damaged checkpoint passed over.

  Returns:
    ``(step, epoch_sums)`` (see ``save``): ``(0, zeros)`` when there is no
    checkpoint.

  Raises:
    CheckpointError: checkpoints exist but none is intact, or the newest
      intact one was written with other ``config`` values.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      meta = _read_meta(manager, step)
      _check_config(meta["config"], config, manager, step)
      restored = _restore_state(manager, step, model_state, opt_state, meta["checksums"])
    except _Damaged as e:
      report(f"checkpoint {_step_dir(manager, step)} (step {step}) is damaged: {e}; moved to "
             f"{_damaged_dir(manager)}, trying the one before")
      _set_aside(manager, step)
      damaged.append(step)
      continue
    return restored
  if damaged:
    raise CheckpointError(f"no intact checkpoint in {manager.directory}: the checkpoints of "
                          f"steps {sorted(damaged)} are damaged (moved to "
                          f"{_damaged_dir(manager)}); start a new run in another output_dir")
  return 0, np.zeros(_NUM_SUMS)


def read_checkpoint(output_dir, step: int | None = None) -> tuple[int, dict]:
  """A run's checkpoint as saved, every array on this process's first device, verified.

  For inspecting a run (tests, notebooks): no model is needed, and a sharded
  run's arrays come whole, padding rows included.

  Arguments:
    output_dir: the run's directory (holding ``checkpoints/``).
    step: the checkpoint's step, or None for the newest.

  Returns:
    ``(step, {"model", "optimizer", "step", "epoch_sums"})``.

  Raises:
    CheckpointError: no such checkpoint, or it is damaged.
  """
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with checkpoint_manager(output_dir) as manager:
    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
      raise CheckpointError(f"{manager.directory} holds no checkpoint of step {step}")
    try:
      meta = _read_meta(manager, step)
      # Host (numpy) leaves were saved without a sharding and come back as numpy.
      state = _read_state(manager, step, jax.tree.map(
          lambda m: (np.zeros(m.shape, m.dtype) if m.sharding is None
                     else jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one)),
          _state_metadata(manager, step), is_leaf=lambda x: hasattr(x, "shape")),
          meta["checksums"])
    except _Damaged as e:
      raise CheckpointError(f"checkpoint {_step_dir(manager, step)} is damaged: {e}") from None
  return step, state


class _Damaged(Exception):
  """A checkpoint that is incomplete, unreadable or fails its checksums (the reason)."""


def _step_dir(manager, step: int) -> pathlib.Path:
  return pathlib.Path(manager.directory) / str(step)


def _damaged_dir(manager) -> pathlib.Path:
  return pathlib.Path(manager.directory).parent / DAMAGED_DIR


def _set_aside(manager, step: int) -> None:
  """Moves a damaged step directory out of ``checkpoints/`` (process 0; all processes wait)."""
  if jax.process_index() == 0:
    target = _damaged_dir(manager) / str(step)
    target.parent.mkdir(exist_ok=True)
    if target.exists():
      shutil.rmtree(target)
    _step_dir(manager, step).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"xmc: damaged checkpoint {step} set aside")
  manager.reload()


def _read_meta(manager, step: int) -> dict:
  """A checkpoint's ``meta`` item, or ``_Damaged`` if the checkpoint is incomplete or unreadable."""
  directory = _step_dir(manager, step)
  if not (directory / _COMMIT_MARKER).exists():
    raise _Damaged(f"incomplete, no {_COMMIT_MARKER}")
  path = directory / "meta" / "metadata"
  try:
    meta = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise _Damaged(f"{path} is unreadable ({_first_line(e)})") from None
  if not isinstance(meta, dict) or meta.get("format") != _FORMAT or not {
      "config", "checksums"} <= meta.keys():
    raise _Damaged(f"{path} holds no checksums (written by another sparsejax version?)")
  return meta


def _check_config(saved: Mapping, config: Mapping | None, manager, step: int) -> None:
  if config is None:
    return
  differ = sorted(name for name, value in config.items() if saved.get(name) != value)
  if differ:
    changes = ", ".join(f"{name}: {saved.get(name)!r} -> {config[name]!r}" for name in differ)
    raise CheckpointError(f"{manager.directory} (step {step}) was written by a run with other "
                          f"settings ({changes}); resume with the run's settings or use another "
                          "output_dir")


def _restore_state(manager, step: int, model_state, opt_state,
                   expected: Mapping[str, str]) -> tuple[int, np.ndarray]:
  """Reads the ``state`` item of ``step`` into the states after checking every checksum."""
  target = _checkpoint(model_state, opt_state, 0, np.zeros(_NUM_SUMS))
  saved_shapes = {_path_key(path): tuple(meta.shape) for path, meta in
                  jax.tree_util.tree_leaves_with_path(_state_metadata(manager, step),
                                                      is_leaf=lambda x: hasattr(x, "shape"))}
  padding = {}

  def abstract(path, x):
    if isinstance(x, np.ndarray):
      return x
    if _path_key(path) not in saved_shapes:
      raise CheckpointError(f"checkpoint {step} has no {jax.tree_util.keystr(path)}; was it "
                            "written by another model?")
    sharding, saved_shape = x.sharding, saved_shapes[_path_key(path)]
    if saved_shape != x.shape:
      if saved_shape[1:] != x.shape[1:] or not in_classifier(path):
        raise CheckpointError(f"checkpoint {step}: {jax.tree_util.keystr(path)} has shape "
                              f"{saved_shape}, the model {x.shape}; was it written by another "
                              "config?")
      padding[path] = x.shape[0], sharding
      if not _divides(sharding, saved_shape):  # e.g. 204 rows onto 8 shards: read whole
        sharding = NamedSharding(sharding.mesh, P())
    return jax.ShapeDtypeStruct(saved_shape, x.dtype, sharding=sharding)

  saved = _read_state(manager, step, jax.tree_util.tree_map_with_path(abstract, target),
                      expected)
  saved = jax.tree_util.tree_map_with_path(
      lambda path, x: _fit_rows(x, *padding[path]) if path in padding else x, saved)
  _replace(model_state, saved["model"])
  _replace(opt_state, saved["optimizer"])
  return int(saved["step"]), np.array(saved["epoch_sums"], np.float64)  # a writable copy


def _state_metadata(manager, step: int):
  """The ``state`` item's tree of array metadata (shapes, dtypes), or ``_Damaged``."""
  _check_database(_step_dir(manager, step) / "state")
  try:
    return manager.item_metadata(step)["state"]
  except Exception as e:  # orbax and tensorstore raise many types for a damaged file
    raise _Damaged(f"its metadata is unreadable ({_first_line(e)})") from None


def _read_state(manager, step: int, target, expected: Mapping[str, str]):
  """The ``state`` item read into ``target``'s shapes and shardings, checked, or ``_Damaged``."""
  try:
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # orbax and tensorstore raise many types for a damaged file
    raise _Damaged(f"its arrays are unreadable ({_first_line(e)})") from None
  _verify(state, expected)
  return state


def _verify(state, expected: Mapping[str, str]) -> None:
  """``_Damaged`` naming the arrays of ``state`` whose checksum is not the saved one."""
  got = checksums(state)
  bad = sorted(name for name in expected.keys() | got.keys() if expected.get(name) != got.get(name))
  if bad:
    raise _Damaged(f"{len(bad)} array(s) fail their checksum: {', '.join(bad[:3])}"
                   + (", ..." if len(bad) > 3 else ""))


def _check_database(directory: pathlib.Path) -> None:
  """Lists the keys of the item's OCDBT database: ``_Damaged`` if its manifest or index is.

  Orbax would meet a damaged manifest inside its asynchronous readers, whose
  error comes buried in event-loop tracebacks; this reads it synchronously
  first (the data files themselves are checked by the checksums).
  """
  try:
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{directory}/"}).result()
    store.list().result()
  except ValueError as e:
    raise _Damaged(f"its array database is unreadable ({_first_line(e)})") from None


def checksums(tree) -> dict[str, str]:
  """A checksum of every array leaf of ``tree``, keyed by its path (``"model/embed/..."``).

  Device arrays get two 32-bit sums over their words, each word mixed with its
  position first (so a change or a swap of words changes them); the sums are
  integers, so they do not depend on how the array is split over devices, and
  they run on the devices that hold the array. Host (numpy) arrays get a
  SHA-256 of their bytes.

  Returns:
    ``{path: hex string}``.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  on_device = [(path, x) for path, x in leaves if isinstance(x, jax.Array)]
  sums = _device_checksums([x for _, x in on_device])
  out = {"/".join(_path_key(path)): f"{int(a):08x}{int(b):08x}"
         for (path, _), (a, b) in zip(on_device, jax.device_get(sums))}
  for path, x in leaves:
    if not isinstance(x, jax.Array):
      x = np.ascontiguousarray(x)
      out["/".join(_path_key(path))] = hashlib.sha256(
          x.dtype.str.encode() + str(x.shape).encode() + x.tobytes()).hexdigest()[:16]
  return out


def _fmix32(h):
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bytes of ``x`` as uint32 words (one per element of up to 4 bytes, two for 8)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
  if size == 8:
    return lax.bitcast_convert_type(x, jnp.uint32).ravel()
  return lax.bitcast_convert_type(x, unsigned[size]).astype(jnp.uint32)


@jax.jit
def _device_checksums(arrays):
  def one(x):
    words = _words(x)
    position = jnp.arange(words.shape[0], dtype=jnp.uint32)
    mixed = _fmix32(words ^ _fmix32(position * np.uint32(0x9E3779B9) + np.uint32(1)))
    return (jnp.sum(mixed, dtype=jnp.uint32),
            jnp.sum(_fmix32(mixed ^ np.uint32(0x5BD1E995)), dtype=jnp.uint32))
  return [one(x) for x in arrays]


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  return line if len(line) <= 200 else line[:197] + "..."


def _path_key(path) -> tuple[str, ...]:
  """A checkpoint path as strings (the metadata's dict keys are strings, the state's may not)."""
  return tuple(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


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
