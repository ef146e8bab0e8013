"""Trains and evaluates an extreme multi-label classifier (the project's main job).

``python -m experiments.xmc.train`` (or ``python -m experiments.xmc.main``)
trains ``sparsejax.xmc.XMCModel``: an embedding bag over the sparse
features and an MLP, an optional intermediate layer, and a classifier over all
labels that is dense (the baseline) or fixed fan-in, rewired by SET or RigL. The data
is ``--dataset=synthetic`` (``sparsejax.data.synthetic_xmc``, sizes from the
flags) or a directory holding ``train.txt`` and ``test.txt`` in the Extreme
Classification Repository's BoW format.

- Loss: squared hinge or BCE summed over all labels, in label chunks
  (``sparsejax.xmc.chunked_loss``): no step holds the ``(batch, L)`` logits.
  The logits take the classifier's input in ``compute_dtype`` (bfloat16 on a
  GPU by default), with float32 master weights, Adam state and loss.
- Auxiliary objective (``--aux``): balanced k-means clusters of the label
  centroids, a small head trained with BCE on multi-hot cluster targets, mixed
  as ``(1 - a) main + a aux``; ``a`` is cosine-decayed from ``aux_weight`` to 0
  at epoch ``aux_epochs``, after which the step no longer computes the head.
- Optimiser: Adam with separate warm-up + cosine learning rates for the
  encoder side (everything but the classifier) and the classifier
  (``optax.multi_transform``), wrapped by ``sparsejax.set_topology`` for a
  fixed fan-in classifier: SET (random regrowth) or, with ``--regrowth=rigl``,
  RigL, whose candidates come from the chunked loss of the rewiring steps
  (``sparsejax.xmc.chunked_loss_and_candidates``). Each step runs
  one of two compiled executables, chosen on the host with
  ``sparsejax.is_rewire_step``: the plain step, which traces no rewiring, or
  the rewiring step.
- Output directory: ``config.json``; ``checkpoints/`` (orbax, every
  ``checkpoint_every`` steps and at each epoch end; a run restarted in the same
  directory resumes from the latest one, bit for bit: the data order is a
  function of the seed and the step); ``epochs.csv`` (one row per epoch);
  ``metrics.json`` (final P/nDCG/PSP@1,3,5, time, throughput, memory); with
  ``--step_log``, ``steps.csv`` (loss and a CRC of each step's batch).
- Devices (``--mesh``, e.g. ``data:2,labels:4``): by default one device. With
  a mesh the classifier's rows (params and their Adam and SET state) are split
  over the ``labels`` axis and each batch over the ``data`` axis; the encoder
  is replicated (data parallel). The loss and the top-k run per label shard
  (``sparsejax.xmc.sharded_chunked_loss``/``sharded_chunked_topk``, and
  ``sharded_chunked_loss_and_candidates`` for RigL) and each shard's rows are
  rewired on their device. Several processes (hosts) run one command each,
  with ``--coordinator``, ``--num_processes`` and ``--process_id``; every
  process computes the whole (deterministic) data order and places its part of
  each batch; only process 0 writes ``config.json``, the CSVs and
  ``metrics.json``. Checkpoints restore onto any mesh (another shape, one
  device), so ``mesh`` may change when a run resumes: it changes the results
  only by the order of floating-point reductions.

The model, the train step, evaluation, the layout on a mesh and the
checkpoints are ``sparsejax.xmc``'s; this module holds the run's ``Config``,
its data and its loop (epochs, logs, metrics).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import time
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx
from jax.experimental import multihost_utils

import sparsejax as sj
from ..common import config_flags
from ..common.config_flags import ConfigError
from ..common.progress import Progress
from sparsejax.data.synthetic_xmc import synthetic_xmc
from sparsejax.data.xmc import (XMCDataset, batches, check_train_test, read_bow, split_off,
                                steps_per_epoch)
from sparsejax.xmc import (LOSSES, METRIC_NAMES, Layout, XMCModel, aux_weight_at,
                           checkpoint_manager, format_table, initial_classifier_bias,
                           inverse_propensity, label_clusters, make_optimizer, make_train_steps,
                           predict_dataset, put, resolve_compute_dtype, resolve_label_chunk,
                           restore, rigl_num_candidates, save, saved_config, score,
                           supar_classifier, to_host, write_predictions)

__all__ = ["Config", "TrainingDiverged", "check_config", "read_config", "load_data", "build", "run",
           "define_flags", "main"]

# Fields that may change when a run resumes: they do not affect training (``mesh``
# only through the order of floating-point reductions; ``output_dir`` is where the run
# is, so a moved or copied run directory resumes).
_RESUMABLE = {"eval_every", "eval_batch_size", "predict_k", "propensity_a", "propensity_b",
              "checkpoint_every", "step_log", "mesh", "output_dir"}
_field = config_flags.field


GRAD_PRUNE = ("", "mvue:1:2", "mvue:2:4", "mvue_approx:2:4", "greedy:1:2", "greedy:2:4")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on: one absl flag per field, with the help shown here."""
  # Data.
  dataset: str = _field("synthetic", "'synthetic', or a directory with train.txt and test.txt "
                        "in the Extreme Classification Repository's BoW format")
  num_train: int = _field(20_000, "synthetic data: training points", at_least=1)
  num_test: int = _field(5_000, "synthetic data: test points", at_least=1)
  num_features: int = _field(16_384, "synthetic data: feature vocabulary D", at_least=1)
  num_labels: int = _field(4_096, "synthetic data: labels L", at_least=1)
  data_seed: int = _field(0, "synthetic data: seed of the generator (and of the validation "
                          "split)", at_least=0)
  valid_fraction: float = _field(0.1, "share of the training points held out for validation "
                                 "(per-epoch metrics), by a stable hash of each point's index; "
                                 "unused when the dataset directory has a valid.txt; 0: no "
                                 "validation split", at_least=0, at_most=0.5)

  # The model.
  embed_dim: int = _field(0, "width of the embedding bag and of the MLP; 0: auto, 8 x fan_in "
                          "for a fixed fan-in classifier without --intermediate (the recipe: "
                          "K is 1/8 of a wide encoder's output) and 128 otherwise", at_least=0)
  hidden_layers: int = _field(1, "residual MLP blocks z + Linear(ReLU(z)) after the bag",
                              at_least=0)
  intermediate: int = _field(0, "width of a linear layer before the classifier (0: none)",
                             at_least=0)
  fan_in: int = _field(64, "inputs K of each label of the fixed fan-in classifier "
                       "(0: dense classifier); at most the classifier's input width", at_least=0)
  loss: str = _field("squared_hinge", "summed over all labels", choices=LOSSES)
  label_chunk: int = _field(0, "labels scored at once in the loss and the top-k (0: auto, "
                            "65536 on GPU, 4096 on CPU)", at_least=0)
  compute_dtype: str = _field("auto", "dtype of the classifier's input (and of the dense "
                              "classifier's weights) in the logits: 'float32', 'bfloat16' "
                              "or 'auto' (bfloat16 on GPU, float32 on CPU); weights, Adam "
                              "state and loss stay float32",
                              choices=("auto", "float32", "bfloat16"))
  grad_prune: str = _field("", "N:M-prune the neural gradient dY of the encoder's MLP layers "
                           "for their weight gradient, along the batch (Chmiel et al. 2023): "
                           "'' (off) or method:n:m", choices=GRAD_PRUNE)
  supar: bool = _field(False, "SμPar for the fixed fan-in classifier, a hidden layer of density "
                       "K/in against the dense classifier of the same width: its values drawn "
                       "with SμPar's std, its learning rate times in/K")

  # The auxiliary cluster objective.
  aux: bool = _field(False, "auxiliary objective: BCE of a head over label clusters")
  aux_weight: float = _field(0.4, "initial weight a of the auxiliary loss", at_least=0,
                             at_most=1)
  aux_epochs: float = _field(2.0, "epoch at which the cosine-decayed a reaches 0 and the "
                             "head stops being trained", above=0)
  cluster_size: int = _field(64, "labels per cluster (balanced k-means of label centroids)",
                            at_least=1)

  # Optimisation.
  epochs: int = _field(10, "passes over the training set", at_least=1)
  batch_size: int = _field(128, "points per step", at_least=1)
  seed: int = _field(0, "seed of the initialisation, the SET rewiring and the data order",
                     at_least=0)
  encoder_lr: float = _field(3e-3, "peak Adam learning rate of everything but the classifier",
                             above=0)
  classifier_lr: float = _field(1e-2, "peak Adam learning rate of the classifier", above=0)
  warmup_steps: int = _field(100, "linear warm-up of both learning rates, then cosine decay "
                             "to 0 at the end of the run (fewer steps than the run)",
                             at_least=0)

  # Rewiring of the fixed fan-in classifier (SET or RigL).
  set_interval: int = _field(50, "SET rewires the fixed fan-in classifier every this many "
                             "steps (0: static topology)", at_least=0)
  set_fraction: float = _field(0.3, "initial fraction of each row that SET prunes and "
                               "regrows (cosine-decayed)", at_least=0, at_most=1)
  set_until: float = _field(0.66, "fraction of the run after which SET stops", above=0,
                            at_most=1)
  regrowth: str = _field("random", "how rewiring regrows the pruned slots: 'random' (SET) or "
                         "'rigl' (largest dense gradient)", choices=("random", "rigl"))

  # Evaluation.
  propensity_a: float = _field(0.55, "A of the inverse propensities (PSP@k)", above=0)
  propensity_b: float = _field(1.5, "B of the inverse propensities (PSP@k)", at_least=0)
  eval_every: int = _field(1, "evaluate on the validation split every this many epochs "
                           "(0: never; the test set is scored once, at the end)", at_least=0)
  eval_batch_size: int = _field(512, "points per forward pass when evaluating", at_least=1)
  predict_k: int = _field(10, "labels per test point in predictions_test.txt", at_least=5)

  # Outputs and devices.
  output_dir: str = _field("runs/xmc", "config, checkpoints, CSVs and metrics.json; a run "
                           "started again here resumes")
  checkpoint_every: int = _field(0, "also checkpoint every this many steps "
                                 "(0: at epoch ends only)", at_least=0)
  step_log: bool = _field(False, "write steps.csv: each step's loss and a CRC of its batch")
  mesh: str = _field("", "device mesh 'data:D,labels:M', e.g. 'data:2,labels:4' (D * M = all "
                     "devices of all processes): each batch is split over D devices, the "
                     "classifier's labels over M; '' trains on one device")

  @property
  def encoder_width(self) -> int:
    """``embed_dim``, or for 0 (auto) ``8 * fan_in`` (sparse, no intermediate) or 128."""
    if self.embed_dim:
      return self.embed_dim
    return 8 * self.fan_in if self.fan_in and not self.intermediate else 128

  @property
  def rewires(self) -> bool:
    """Whether the optimizer is ``set_topology`` (a rewired fixed fan-in classifier)."""
    return bool(self.fan_in and self.set_interval)

  def set_end_step(self, total_steps: int) -> int:
    """The last update that may rewire."""
    return int(self.set_until * total_steps)

  def num_clusters(self, num_labels: int) -> int:
    """Outputs of the aux head: ``ceil(L / cluster_size)``, or 0 without ``aux``."""
    return -(-num_labels // self.cluster_size) if self.aux else 0


def read_config(output_dir) -> Config:
  """The ``Config`` of a run: its ``config.json``, or without one, its newest checkpoint's.

  Raises:
    ConfigError: ``config.json`` is not a readable config (the message names
      it), or the run has neither.
  """
  path = pathlib.Path(output_dir) / "config.json"
  if path.exists():
    return Config(**_read_config_file(path))
  saved = saved_config(checkpoint_manager(output_dir))
  if saved is None:
    raise ConfigError(f"{output_dir} holds no run: no config.json and no checkpoint")
  return Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})


def _read_config_file(path: pathlib.Path) -> dict:
  """The fields in a ``config.json``; ``ConfigError`` naming the file if it is not one."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is not a readable config ({str(e).splitlines()[0]}); the "
                      "checkpoints hold the run's configuration: delete the file to resume, "
                      "or restore it") from None
  names = {f.name for f in dataclasses.fields(Config)}
  if not isinstance(saved, dict) or not saved.keys() <= names:
    unknown = sorted(saved.keys() - names) if isinstance(saved, dict) else type(saved).__name__
    raise ConfigError(f"{path} is not a config of this trainer (unknown: {unknown}); delete "
                      "the file to resume from the checkpoints, or restore it")
  return saved


class Data(NamedTuple):
  """A run's splits; ``valid`` is None without a validation split."""
  train: XMCDataset
  valid: XMCDataset | None
  test: XMCDataset
  valid_source: str  # where ``valid`` comes from, for the log and metrics.json


def load_data(config: Config) -> Data:
  """The run's splits: generated, or read from ``{dataset}/train.txt``, ``test.txt``, ``valid.txt``.

  The validation split is ``valid.txt`` where the dataset directory has one,
  else the ``valid_fraction`` of the training points that ``split_off`` holds
  out (with ``data_seed``; none for 0). A pair of splits that no run can use
  (no labels, other feature or label counts) is refused
  (``sparsejax.data.xmc.check_train_test``).
  """
  valid, source = None, "none"
  if config.dataset == "synthetic":
    train, test = synthetic_xmc(seed=config.data_seed, num_train=config.num_train,
                                num_test=config.num_test, num_features=config.num_features,
                                num_labels=config.num_labels)
    names = {}
  else:
    root = pathlib.Path(config.dataset)
    train, test = read_bow(root / "train.txt"), read_bow(root / "test.txt")
    names = dict(train_name=str(root / "train.txt"), test_name=str(root / "test.txt"))
    if (root / "valid.txt").is_file():
      valid, source = read_bow(root / "valid.txt"), str(root / "valid.txt")
      check_train_test(train, valid, train_name=names["train_name"], test_name=source)
  check_train_test(train, test, **names)
  if valid is None and config.valid_fraction:
    kept, held = split_off(len(train), config.valid_fraction, seed=config.data_seed)
    if not held.size or not kept.size:
      raise ConfigError(f"--valid_fraction={config.valid_fraction} leaves an empty split of "
                        f"the {len(train)} training points")
    train, valid = train.take(kept), train.take(held)
    source = f"{held.size} of the training points (--valid_fraction={config.valid_fraction})"
  return Data(train, valid, test, source)


def _keys(config: Config):
  """Keys of the model init, the SET rewiring and the label clustering."""
  return jax.random.split(jax.random.key(config.seed), 3)


def check_config(config: Config) -> None:
  """Refuses, before any work, values of ``config`` that no run can use.

  Each field's range (``experiments.common.config_flags.check``), then the
  rules between fields and the dataset directory.

  Raises:
    ConfigError: naming the flag, the allowed values and the fix.
  """
  config_flags.check(config)
  if config.dataset != "synthetic":
    root = pathlib.Path(config.dataset)
    missing = [name for name in ("train.txt", "test.txt") if not (root / name).is_file()]
    if missing:
      where = "does not exist" if not root.exists() else f"has no {' and no '.join(missing)}"
      raise ConfigError(f"--dataset={config.dataset}: the directory {where}; give 'synthetic' "
                        "or a directory with train.txt and test.txt (BoW format)")
  width = config.intermediate or config.encoder_width
  if config.fan_in > width:
    source = "--intermediate" if config.intermediate else "--embed_dim"
    raise ConfigError(f"--fan_in={config.fan_in} exceeds the classifier's input width {width} "
                      f"({source}); use --fan_in <= {width}, or 0 for a dense classifier")
  if config.regrowth == "rigl" and not config.rewires:
    raise ConfigError("--regrowth=rigl rewires the fixed fan-in classifier: it needs "
                      f"--fan_in > 0 and --set_interval > 0 (got {config.fan_in}, "
                      f"{config.set_interval})")
  if config.supar and not config.fan_in:
    raise ConfigError("--supar scales the fixed fan-in classifier: it needs --fan_in > 0")
  if config.grad_prune:
    if not config.hidden_layers:
      raise ConfigError(f"--grad_prune={config.grad_prune} prunes the MLP layers' gradients: "
                        "it needs --hidden_layers > 0")
    m = int(config.grad_prune.split(":")[2])
    if config.batch_size % m:
      raise ConfigError(f"--grad_prune={config.grad_prune} prunes along the batch in groups of "
                        f"{m}: --batch_size={config.batch_size} must be a multiple of {m}")
  if not config.output_dir:
    raise ConfigError("--output_dir must not be empty")


def _steps(config: Config, train: XMCDataset, layout: Layout | None) -> tuple[int, int]:
  """``(steps per epoch, total steps)``; ``ConfigError`` where the data does not fit the flags."""
  if config.batch_size > len(train):
    raise ConfigError(f"--batch_size={config.batch_size} exceeds the {len(train)} training "
                      "points")
  per_epoch = steps_per_epoch(len(train), batch_size=config.batch_size)
  total = config.epochs * per_epoch
  if layout is not None and config.batch_size % layout.mesh.shape["data"]:
    raise ConfigError(f"--batch_size={config.batch_size} is not a multiple of the "
                      f"{layout.mesh.shape['data']} data shards of --mesh={config.mesh}")
  if config.warmup_steps >= total:
    raise ConfigError(f"--warmup_steps={config.warmup_steps} must be below the run's {total} "
                      f"steps ({config.epochs} epochs of {per_epoch})")
  return per_epoch, total


def build(config: Config, num_features: int, num_labels: int, total_steps: int, *,
          layout: Layout | None = None) -> tuple[XMCModel, nnx.Optimizer]:
  """The freshly initialised model and its optimizer, a function of ``config`` only.

  Arguments:
    config: the run's configuration.
    num_features, num_labels: the data's ``D`` and ``L``.
    total_steps: optimizer steps of the whole run (the schedules' length).
    layout: for a sharded run, its ``Layout``: the classifier's arrays get
      ``layout.num_padded`` rows (``XMCModel.pad_labels``) and SET rewires each
      label shard's rows. Nothing is placed on devices yet:
      ``Layout.shardings`` and ``put`` do that to the split states.

  Returns:
    ``(model, optimizer)`` (see ``sparsejax.xmc.make_optimizer``).
  """
  model_key, set_key, _ = _keys(config)
  model = XMCModel(num_features=num_features, num_labels=num_labels,
                   embed_dim=config.encoder_width, hidden_layers=config.hidden_layers,
                   intermediate=config.intermediate, fan_in=config.fan_in,
                   num_clusters=config.num_clusters(num_labels), grad_prune=config.grad_prune,
                   classifier_bias=initial_classifier_bias(config.loss, num_labels),
                   rngs=nnx.Rngs(model_key))
  classifier_lr = config.classifier_lr
  if config.supar:
    classifier_lr *= supar_classifier(model, key=jax.random.fold_in(model_key, 1))
  if layout is not None:
    # Padded after the init, so that the real labels start as on one device.
    model.pad_labels(layout.num_padded)
  optimizer = make_optimizer(
      model, total_steps=total_steps, encoder_lr=config.encoder_lr,
      classifier_lr=classifier_lr, warmup_steps=config.warmup_steps,
      set_interval=config.set_interval, set_fraction=config.set_fraction,
      set_end_step=config.set_end_step(total_steps), regrowth=config.regrowth, key=set_key,
      layout=layout)
  return model, optimizer


def _batch_crc(batch: dict) -> int:
  """A CRC-32 of a batch's feature and label ids, to compare data orders across runs."""
  crc = zlib.crc32(np.ascontiguousarray(batch["feature_ids"]).tobytes())
  return zlib.crc32(np.ascontiguousarray(batch["label_ids"]).tobytes(), crc)


def _sync(name: str) -> None:
  """A barrier of all processes (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _write_config(output_dir: pathlib.Path, config: Config) -> None:
  """Writes ``config.json`` (process 0), once the run is sure to start.

  What the run resumes is checked against the checkpoints (they hold the
  configuration), so a ``config.json`` left by a start that failed before its
  first checkpoint is replaced.
  """
  _sync("xmc: config checked")  # every process read the old file before it is replaced
  if jax.process_index() == 0:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")


class _CsvLog:
  """An append-only CSV that drops rows past the restored step when a run resumes."""

  def __init__(self, path: pathlib.Path, fields: list[str], resume_step: int):
    rows = []
    if path.exists():
      with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    self.file = open(path, "w", newline="")
    self.writer = csv.DictWriter(self.file, fields)
    self.writer.writeheader()
    self.writer.writerows(rows)
    self.file.flush()

  def write(self, row: dict) -> None:
    self.writer.writerow(row)
    self.file.flush()

  def close(self) -> None:
    self.file.close()


class TrainingDiverged(FloatingPointError):
  """A loss, the gradient norm or the parameters became NaN or infinite."""


# What each entry of a step's output is, for the divergence message.
_STEP_OUTPUTS = ("loss", "main loss", "aux loss", "gradient norm")


def _check_finite(window: np.ndarray, first_step: int, last_saved: int, out) -> None:
  """Raises ``TrainingDiverged`` at the first step of ``window`` with a non-finite output."""
  bad = ~np.isfinite(window)
  if bad.any():
    row, column = np.argwhere(bad)[0]
    raise TrainingDiverged(
        f"training diverged: the {_STEP_OUTPUTS[column]} is {window[row, column]} at step "
        f"{first_step + row}; stopped, the last checkpoint (step {last_saved}) in "
        f"{out / 'checkpoints'} is kept; lower --encoder_lr / --classifier_lr or lengthen "
        "--warmup_steps")


@jax.jit
def _all_finite(state) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def run(config: Config, *, devices=None, report=print) -> dict:
  """Trains (resuming from ``output_dir`` when it holds checkpoints) and evaluates.

  Everything the run needs is checked before any work: the flags
  (``check_config``), the data and, on resume, that the newest intact
  checkpoint was written with the same settings (damaged ones are passed
  over, each reported in one line). A run that is already complete only says
  so and leaves its files as they are. Training stops with
  ``TrainingDiverged`` at the first non-finite loss or gradient norm (checked
  on the host every 10 steps and before each checkpoint, so no checkpoint
  holds a diverged state).

  With several processes (``jax.distributed.initialize`` first), every process
  calls it with the same config; process 0 alone writes the config, the CSVs
  and ``metrics.json``.

  Arguments:
    config: the run's configuration.
    devices: the devices of ``config.mesh`` (default: all devices of all
      processes); unused without a mesh.
    report: called with each line about the run's state (damaged checkpoints
      passed over, a run already complete).

  Returns:
    The content of ``metrics.json``: ``config``, final ``metrics`` (fractions),
    ``epochs`` (the rows of ``epochs.csv``), ``seconds_per_epoch``,
    ``samples_per_s``, ``compile_seconds``, ``memory`` (bytes, per device;
    ``train_step`` has one entry per executable: ``main``/``with_aux``, the
    plain steps without and with the aux head, and ``main_rewire``/
    ``with_aux_rewire``, the rewiring steps), ``label_chunk`` and
    ``compute_dtype`` (as resolved for the backend), ``device``, ``mesh``
    (axis sizes, or None), ``processes``, ``num_params`` (without padding)
    and ``steps``.

  Raises:
    ConfigError, sparsejax.data.xmc.XMCFormatError, sparsejax.xmc.CheckpointError
    (all ``ValueError``): bad flags, data or checkpoints, before training.
    TrainingDiverged: a non-finite loss or gradient.
  """
  check_config(config)
  out = pathlib.Path(config.output_dir)
  report(f"loading the data ({config.dataset})")
  train, valid, test, valid_source = load_data(config)
  report(f"data: {len(train)} training points, {len(test)} test points, validation: "
         f"{valid_source}; {train.num_features} features, {train.num_labels} labels")
  try:
    layout = Layout.create(config.mesh, train.num_labels, devices) if config.mesh else None
  except ValueError as e:
    raise ConfigError(f"--mesh={config.mesh}: {e}") from None
  per_epoch, total_steps = _steps(config, train, layout)
  primary = jax.process_index() == 0
  report(f"building the model ({'fixed fan-in K ' + str(config.fan_in) if config.fan_in else 'dense'}"
         f" classifier over {train.num_labels} labels)")
  model, optimizer = build(config, train.num_features, train.num_labels, total_steps,
                           layout=layout)
  initial_topology = (np.asarray(model.classifier.indices[...])[:train.num_labels]
                      if model.sparse else None)
  model_def, model_state = nnx.split(model)
  opt_def, opt_state = nnx.split(optimizer)
  wrt = optimizer.wrt
  # From here the states hold the arrays; with a mesh, placed copies replace these
  # one-device ones, which must not stay alive (a whole classifier on one device).
  del model, optimizer
  state_shardings = None
  if layout is not None:
    state_shardings = layout.shardings(model_state), layout.shardings(opt_state)
    model_state = put(model_state, state_shardings[0])
    opt_state = put(opt_state, state_shardings[1])
  manager = checkpoint_manager(out)
  settings = {name: value for name, value in dataclasses.asdict(config).items()
              if name not in _RESUMABLE}
  step, sums = restore(manager, model_state, opt_state, config=settings, report=report)
  if (out / "config.json").exists():
    _read_config_file(out / "config.json")  # a damaged one is named, not overwritten
  if step == total_steps and (out / "metrics.json").exists():
    report(f"{out}: the run is complete at step {step}; its results are in "
           f"{out / 'metrics.json'} (left as they are)")
    return json.loads((out / "metrics.json").read_text())
  _write_config(out, config)
  if step:
    report(f"{out}: resuming at step {step} of {total_steps}")
  last_saved = step
  if config.aux:
    report(f"clustering the labels into {config.num_clusters(train.num_labels)} clusters")
  clusters = (jnp.asarray(label_clusters(train, config.num_clusters(train.num_labels),
                                         key=_keys(config)[2])) if config.aux else None)
  if clusters is not None and layout is not None:
    clusters = put(clusters, layout.replicated)
  inv_propensity = inverse_propensity(train.label_counts(), len(train), a=config.propensity_a,
                                      b=config.propensity_b)

  # The plain step traces no rewiring; the rewiring one runs on the updates that
  # set_topology rewires, picked on the host by its own rule.
  label_chunk = resolve_label_chunk(config.label_chunk)
  compute_dtype = resolve_compute_dtype(config.compute_dtype)
  step_args = dict(loss=config.loss, label_chunk=label_chunk, compute_dtype=compute_dtype,
                   num_clusters=config.num_clusters(train.num_labels), layout=layout,
                   state_shardings=state_shardings)
  step_fns = make_train_steps(
      model_def, opt_def, wrt, **step_args, rewires=config.rewires,
      num_candidates=(rigl_num_candidates(config.fan_in, config.set_fraction)
                      if config.regrowth == "rigl" else 0))
  end_step = config.set_end_step(total_steps)
  widths = dict(max_features=train.max_features_per_point(),
                max_labels=train.max_labels_per_point())
  compiled, compile_seconds = {}, 0.0

  def aux_weight(step):
    return aux_weight_at(step, initial=config.aux_weight if config.aux else 0.0,
                         end_step=config.aux_epochs * per_epoch)

  def compiled_step(with_aux: bool, rewiring: bool, batch):
    # Ahead-of-time: gives the memory analysis and keeps compiling out of the timings.
    nonlocal compile_seconds
    if (with_aux, rewiring) not in compiled:
      progress.write(f"compiling the {'rewiring' if rewiring else 'plain'} train step"
                     + (" with the aux head" if with_aux else ""))
      start = time.perf_counter()
      compiled[with_aux, rewiring] = step_fns[rewiring].lower(
          model_state, opt_state, batch, clusters if with_aux else None,
          np.float32(0)).compile()
      compile_seconds += time.perf_counter() - start
    return compiled[with_aux, rewiring]

  def train_clock():
    # Seconds without the time spent compiling.
    return time.perf_counter() - compile_seconds

  def flush(pending):
    # One host sync per call: checks the pending steps' outputs and adds their losses
    # to the epoch sums.
    if pending:
      window = np.asarray(jnp.stack(pending), np.float64)
      _check_finite(window, step - len(window) + 1, last_saved, out)
      sums[:] += np.append(window[:, :3].sum(0), len(window))
    return []

  def checkpoint():
    if not bool(_all_finite(model_state)):
      raise TrainingDiverged(f"training diverged: the parameters hold NaN or inf after step "
                             f"{step}; stopped, the last checkpoint (step {last_saved}) in "
                             f"{out / 'checkpoints'} is kept")
    save(manager, step, model_state, opt_state, sums, config=dataclasses.asdict(config))
    return step

  def ranked(model, dataset, k):
    return predict_dataset(model, dataset, k=k, batch_size=config.eval_batch_size,
                           label_chunk=label_chunk, layout=layout, compute_dtype=compute_dtype)

  def on_devices(batch):
    # Every process holds the whole batch and places its devices' part of it.
    return batch if layout is None else put(batch, {name: layout.batch for name in batch})

  fields = ["epoch", "step", "loss", "main_loss", "aux_loss", "aux_weight", "train_seconds",
            "samples_per_s", "topology_changed", *(f"valid_{m}" for m in METRIC_NAMES)]
  epoch_log = _CsvLog(out / "epochs.csv", fields, step) if primary else None
  step_log = (_CsvLog(out / "steps.csv", ["step", "epoch", "loss", "batch_crc"], step)
              if config.step_log and primary else None)
  progress = Progress(total_steps, initial=step, desc="xmc", enabled=primary)
  try:
    while step < total_steps:
      epoch = step // per_epoch
      start, steps_run, pending = train_clock(), 0, []
      for batch in batches(train, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                           start_step=step % per_epoch, **widths):
        a = aux_weight(step)
        with_aux = a > 0
        rewiring = config.rewires and sj.is_rewire_step(
            step + 1, interval=config.set_interval, end_step=end_step)
        placed = on_devices(batch)
        model_state, opt_state, outputs = compiled_step(with_aux, rewiring, placed)(
            model_state, opt_state, placed, clusters if with_aux else None, np.float32(a))
        step, steps_run = step + 1, steps_run + 1
        pending.append(outputs)
        if step_log:
          step_log.write(dict(step=step, epoch=epoch, loss=float(outputs[0]),
                              batch_crc=_batch_crc(batch)))
        if step % 10 == 0 or steps_run == 1:
          pending = flush(pending)
          rate = steps_run * config.batch_size / max(train_clock() - start, 1e-9)
          progress.update(step, loss=f"{sums[0] / max(sums[3], 1):.4f}",
                          samples_s=f"{rate:.0f}")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
          pending = flush(pending)
          last_saved = checkpoint()
      pending = flush(pending)
      seconds = train_clock() - start
      model = nnx.merge(model_def, model_state)
      row = dict(epoch=epoch + 1, step=step, loss=sums[0] / sums[3], main_loss=sums[1] / sums[3],
                 aux_loss=sums[2] / sums[3], aux_weight=aux_weight(step - 1),
                 train_seconds=round(seconds, 3),
                 samples_per_s=round(steps_run * config.batch_size / seconds, 1),
                 topology_changed="" if initial_topology is None else float(np.mean(
                     to_host(model.classifier.indices[...])[:train.num_labels]
                     != initial_topology)))
      if valid is not None and config.eval_every and (epoch + 1) % config.eval_every == 0:
        metrics = score(ranked(model, valid, 5)[0], valid, inv_propensity=inv_propensity)
        row.update({f"valid_{name}": value for name, value in metrics.items()})
      if primary:
        epoch_log.write(row)
        progress.write(f"epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f}, "
                       f"{row['samples_per_s']:.0f} samples/s"
                       + (f", validation P@1 {row['valid_P@1']:.4f}" if "valid_P@1" in row
                          else ""))
      sums[:] = 0
      if step != last_saved:
        last_saved = checkpoint()
  finally:
    progress.close()
    manager.wait_until_finished()
    if epoch_log:
      epoch_log.close()
    if step_log:
      step_log.close()

  # The test set is scored once, at the end.
  model = nnx.merge(model_def, model_state)
  ids, scores = ranked(model, test, config.predict_k)
  final = score(ids, test, inv_propensity=inv_propensity)
  if primary:
    write_predictions(out / "predictions_test.txt", ids, scores, num_labels=test.num_labels)
  _sync("xmc: epochs.csv written")
  with open(out / "epochs.csv", newline="") as f:
    epochs = list(csv.DictReader(f))
  timed = [float(r["train_seconds"]) for r in epochs]
  step_memory = {("with_aux" if aux else "main") + ("_rewire" if rewiring else ""):
                 sj.memory.compiled_bytes(c) for (aux, rewiring), c in compiled.items()}
  results = {
      "config": dataclasses.asdict(config), "metrics": final, "epochs": epochs,
      "validation": valid_source, "predictions": str(out / "predictions_test.txt"),
      "seconds_per_epoch": float(np.mean(timed)) if timed else None,
      "samples_per_s": float(np.mean([float(r["samples_per_s"]) for r in epochs]))
      if epochs else None,
      "compile_seconds": round(compile_seconds, 2),
      "memory": {"train_step": step_memory, **sj.memory.peak_memory()},
      "label_chunk": label_chunk, "compute_dtype": compute_dtype.name,
      "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
      "mesh": None if layout is None else dict(layout.mesh.shape),
      "processes": jax.process_count(),
      "num_params": nnx.merge(model_def, model_state).num_params(),
      "steps": step,
  }
  if primary:
    (out / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    compiled_total = max((m["total_bytes"] for m in step_memory.values()), default=0)
    report(format_table(final))
    report(f"time per epoch {results['seconds_per_epoch']:.1f} s, "
           f"{results['samples_per_s']:.0f} samples/s, train step "
           f"{compiled_total / 2**20:.1f} MiB (compiled), peak RSS "
           f"{results['memory']['max_rss_bytes'] / 2**20:.0f} MiB; results in "
           f"{out / 'metrics.json'}")
  return results


def define_flags() -> None:
  """One absl flag per ``Config`` field, with the field's default, and the process flags.

  ``--coordinator``, ``--num_processes`` and ``--process_id`` say where this
  process runs, not what it trains, so they are not ``Config`` fields: a run
  may resume with another number of processes. ``--debug`` prints the
  traceback of an error instead of its one line.
  """
  config_flags.define_flags(Config)
  flags.DEFINE_string("coordinator", None, "several processes (hosts): 'host:port' of process "
                      "0, the same for all; each process runs the same command with its own "
                      "--process_id, and --mesh spans the devices of all of them")
  flags.DEFINE_integer("num_processes", 1, "several processes: how many")
  flags.DEFINE_integer("process_id", 0, "several processes: this one's rank, 0 to "
                       "num_processes - 1")
  flags.DEFINE_boolean("debug", False, "on an error, print its traceback (default: one line)")


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS
  with config_flags.one_line_errors(debug=FLAGS.debug):
    if FLAGS.coordinator:
      # Before anything starts a backend. On CPU the processes' collectives go over gloo (TCP).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=FLAGS.coordinator,
                                 num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    run(config_flags.config_from_flags(Config))


def run_script() -> None:
  """The console script: parses the flags and runs ``main``."""
  config_flags.launch(define_flags, main)


if __name__ == "__main__":
  run_script()
