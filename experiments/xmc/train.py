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

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

import sparsejax as sj
from experiments.common import config_flags
from sparsejax.data.synthetic_xmc import synthetic_xmc
from sparsejax.data.xmc import XMCDataset, batches, read_bow, steps_per_epoch
from sparsejax.xmc import (LOSSES, METRIC_NAMES, Layout, XMCModel, aux_weight_at,
                           checkpoint_manager, evaluate, format_table, initial_classifier_bias,
                           inverse_propensity, label_clusters, make_optimizer, make_train_steps,
                           put, resolve_compute_dtype, resolve_label_chunk, restore,
                           rigl_num_candidates, save, to_host)

__all__ = ["Config", "read_config", "load_data", "build", "run", "define_flags", "main"]

# Fields that may change when a run resumes: they do not affect training (``mesh``
# only through the order of floating-point reductions).
_RESUMABLE = {"eval_every", "eval_batch_size", "propensity_a", "propensity_b",
              "checkpoint_every", "step_log", "mesh"}
_field = config_flags.field


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on: one absl flag per field, with the help shown here."""
  # Data.
  dataset: str = _field("synthetic", "'synthetic', or a directory with train.txt and test.txt "
                        "in the Extreme Classification Repository's BoW format")
  num_train: int = _field(20_000, "synthetic data: training points")
  num_test: int = _field(5_000, "synthetic data: test points")
  num_features: int = _field(16_384, "synthetic data: feature vocabulary D")
  num_labels: int = _field(4_096, "synthetic data: labels L")
  data_seed: int = _field(0, "synthetic data: seed of the generator")

  # The model.
  embed_dim: int = _field(128, "width of the embedding bag and of the MLP")
  hidden_layers: int = _field(1, "residual MLP blocks z + Linear(ReLU(z)) after the bag")
  intermediate: int = _field(0, "width of a linear layer before the classifier (0: none)")
  fan_in: int = _field(32, "inputs K of each label of the fixed fan-in classifier "
                       "(0: dense classifier)")
  loss: str = _field("squared_hinge", "'squared_hinge' or 'bce', summed over all labels")
  label_chunk: int = _field(0, "labels scored at once in the loss and the top-k (0: auto, "
                            "65536 on GPU, 4096 on CPU)")
  compute_dtype: str = _field("auto", "dtype of the classifier's input (and of the dense "
                              "classifier's weights) in the logits: 'float32', 'bfloat16' "
                              "or 'auto' (bfloat16 on GPU, float32 on CPU); weights, Adam "
                              "state and loss stay float32")

  # The auxiliary cluster objective.
  aux: bool = _field(False, "auxiliary objective: BCE of a head over label clusters")
  aux_weight: float = _field(0.4, "initial weight a of the auxiliary loss")
  aux_epochs: float = _field(2.0, "epoch at which the cosine-decayed a reaches 0 and the "
                             "head stops being trained")
  cluster_size: int = _field(64, "labels per cluster (balanced k-means of label centroids)")

  # Optimisation.
  epochs: int = _field(10, "passes over the training set")
  batch_size: int = _field(128, "points per step")
  seed: int = _field(0, "seed of the initialisation, the SET rewiring and the data order")
  encoder_lr: float = _field(3e-3, "peak Adam learning rate of everything but the classifier")
  classifier_lr: float = _field(1e-2, "peak Adam learning rate of the classifier")
  warmup_steps: int = _field(100, "linear warm-up of both learning rates, then cosine decay "
                             "to 0 at the end of the run")

  # Rewiring of the fixed fan-in classifier (SET or RigL).
  set_interval: int = _field(50, "SET rewires the fixed fan-in classifier every this many "
                             "steps (0: static topology)")
  set_fraction: float = _field(0.3, "initial fraction of each row that SET prunes and "
                               "regrows (cosine-decayed)")
  set_until: float = _field(0.66, "fraction of the run after which SET stops")
  regrowth: str = _field("random", "how rewiring regrows the pruned slots: 'random' (SET) or "
                         "'rigl' (largest dense gradient)")

  # Evaluation.
  propensity_a: float = _field(0.55, "A of the inverse propensities (PSP@k)")
  propensity_b: float = _field(1.5, "B of the inverse propensities (PSP@k)")
  eval_every: int = _field(1, "evaluate on the test set every this many epochs "
                           "(0: only at the end)")
  eval_batch_size: int = _field(512, "points per forward pass when evaluating")

  # Outputs and devices.
  output_dir: str = _field("runs/xmc", "config, checkpoints, CSVs and metrics.json; a run "
                           "started again here resumes")
  checkpoint_every: int = _field(0, "also checkpoint every this many steps "
                                 "(0: at epoch ends only)")
  step_log: bool = _field(False, "write steps.csv: each step's loss and a CRC of its batch")
  mesh: str = _field("", "device mesh 'data:D,labels:M', e.g. 'data:2,labels:4' (D * M = all "
                     "devices of all processes): each batch is split over D devices, the "
                     "classifier's labels over M; '' trains on one device")

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
  """The ``Config`` saved in a run's ``config.json``."""
  return Config(**json.loads((pathlib.Path(output_dir) / "config.json").read_text()))


def load_data(config: Config) -> tuple[XMCDataset, XMCDataset]:
  """``(train, test)``: generated, or read from ``{dataset}/train.txt`` and ``test.txt``."""
  if config.dataset == "synthetic":
    return synthetic_xmc(seed=config.data_seed, num_train=config.num_train,
                         num_test=config.num_test, num_features=config.num_features,
                         num_labels=config.num_labels)
  root = pathlib.Path(config.dataset)
  return read_bow(root / "train.txt"), read_bow(root / "test.txt")


def _keys(config: Config):
  """Keys of the model init, the SET rewiring and the label clustering."""
  return jax.random.split(jax.random.key(config.seed), 3)


def _check_config(config: Config) -> None:
  """Refuses values of ``config`` that no run can use."""
  if config.loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {config.loss!r}")
  resolve_compute_dtype(config.compute_dtype)
  resolve_label_chunk(config.label_chunk)
  if config.regrowth not in ("random", "rigl"):
    raise ValueError(f"regrowth must be 'random' or 'rigl', got {config.regrowth!r}")
  if config.regrowth == "rigl" and not config.rewires:
    raise ValueError("regrowth='rigl' rewires the fixed fan-in classifier: it needs "
                     f"fan_in > 0 and set_interval > 0 (got {config.fan_in}, "
                     f"{config.set_interval})")


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
  _check_config(config)
  model_key, set_key, _ = _keys(config)
  model = XMCModel(num_features=num_features, num_labels=num_labels,
                   embed_dim=config.embed_dim, hidden_layers=config.hidden_layers,
                   intermediate=config.intermediate, fan_in=config.fan_in,
                   num_clusters=config.num_clusters(num_labels),
                   classifier_bias=initial_classifier_bias(config.loss, num_labels),
                   rngs=nnx.Rngs(model_key))
  if layout is not None:
    # Padded after the init, so that the real labels start as on one device.
    model.pad_labels(layout.num_padded)
  optimizer = make_optimizer(
      model, total_steps=total_steps, encoder_lr=config.encoder_lr,
      classifier_lr=config.classifier_lr, warmup_steps=config.warmup_steps,
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
  """Writes ``config.json`` (process 0); refuses to resume a run made with a different config."""
  path = output_dir / "config.json"
  if path.exists():
    saved = json.loads(path.read_text())
    differ = sorted(name for name, value in dataclasses.asdict(config).items()
                    if name not in _RESUMABLE and saved.get(name) != value)
    if differ:
      raise ValueError(f"{output_dir} holds a run with a different config ({', '.join(differ)}"
                       "); use another output_dir")
  _sync("xmc: config checked")  # every process read the old file before it is replaced
  if jax.process_index() == 0:
    path.write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")


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


def run(config: Config, *, devices=None) -> dict:
  """Trains (resuming from ``output_dir`` when it holds checkpoints) and evaluates.

  With several processes (``jax.distributed.initialize`` first), every process
  calls it with the same config; process 0 alone writes the config, the CSVs
  and ``metrics.json``.

  Arguments:
    config: the run's configuration.
    devices: the devices of ``config.mesh`` (default: all devices of all
      processes); unused without a mesh.

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
  """
  _check_config(config)
  out = pathlib.Path(config.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  _write_config(out, config)
  train, test = load_data(config)
  per_epoch = steps_per_epoch(len(train), batch_size=config.batch_size)
  if per_epoch < 1:
    raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train)} training points")
  total_steps = config.epochs * per_epoch
  layout = Layout.create(config.mesh, train.num_labels, devices) if config.mesh else None
  if layout is not None and config.batch_size % layout.mesh.shape["data"]:
    raise ValueError(f"batch_size {config.batch_size} is not a multiple of the "
                     f"{layout.mesh.shape['data']} data shards of mesh {config.mesh!r}")
  primary = jax.process_index() == 0
  model, optimizer = build(config, train.num_features, train.num_labels, total_steps,
                           layout=layout)
  initial_topology = (np.asarray(model.classifier.indices[...])[:train.num_labels]
                      if model.sparse else None)
  clusters = (jnp.asarray(label_clusters(train, config.num_clusters(train.num_labels),
                                         key=_keys(config)[2])) if config.aux else None)
  inv_propensity = inverse_propensity(train.label_counts(), len(train), a=config.propensity_a,
                                      b=config.propensity_b)
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
    if clusters is not None:
      clusters = put(clusters, layout.replicated)
  manager = checkpoint_manager(out)
  step, sums = restore(manager, model_state, opt_state)
  last_saved = step

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
    # One host sync per call: adds the pending steps' losses to the epoch sums.
    if pending:
      window = np.asarray(jnp.stack(pending), np.float64)
      sums[:] += np.append(window.sum(0), len(window))
    return []

  def checkpoint():
    save(manager, step, model_state, opt_state, sums)
    return step

  def score(model):
    return evaluate(model, test, inv_propensity=inv_propensity,
                    batch_size=config.eval_batch_size, label_chunk=label_chunk,
                    layout=layout, compute_dtype=compute_dtype)

  def on_devices(batch):
    # Every process holds the whole batch and places its devices' part of it.
    return batch if layout is None else put(batch, {name: layout.batch for name in batch})

  fields = ["epoch", "step", "loss", "main_loss", "aux_loss", "aux_weight", "train_seconds",
            "samples_per_s", "topology_changed", *METRIC_NAMES]
  epoch_log = _CsvLog(out / "epochs.csv", fields, step) if primary else None
  step_log = (_CsvLog(out / "steps.csv", ["step", "epoch", "loss", "batch_crc"], step)
              if config.step_log and primary else None)
  bar = tqdm(total=total_steps, initial=step, desc="xmc", unit="step",
             disable=None if primary else True)
  final = None
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
        model_state, opt_state, losses = compiled_step(with_aux, rewiring, placed)(
            model_state, opt_state, placed, clusters if with_aux else None, np.float32(a))
        step, steps_run = step + 1, steps_run + 1
        pending.append(losses)
        if step_log:
          step_log.write(dict(step=step, epoch=epoch, loss=float(losses[0]),
                              batch_crc=_batch_crc(batch)))
        if step % 10 == 0:
          rate = steps_run * config.batch_size / (train_clock() - start)
          bar.set_postfix(loss=f"{float(jnp.mean(jnp.stack(pending)[:, 0])):.4f}",
                          samples_s=f"{rate:.0f}")
          pending = flush(pending)
        bar.update(1)
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
      if (config.eval_every and (epoch + 1) % config.eval_every == 0) or step == total_steps:
        final = score(model)
        row.update(final)
      if primary:
        epoch_log.write(row)
        tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f}, "
                   f"{row['samples_per_s']:.0f} samples/s"
                   + (f", P@1 {row['P@1']:.4f}" if "P@1" in row else ""))
      sums[:] = 0
      if step != last_saved:
        last_saved = checkpoint()
  finally:
    bar.close()
    manager.wait_until_finished()
    if epoch_log:
      epoch_log.close()
    if step_log:
      step_log.close()

  model = nnx.merge(model_def, model_state)
  if final is None:  # the run was already complete: evaluate the restored model
    final = score(model)
  _sync("xmc: epochs.csv written")
  with open(out / "epochs.csv", newline="") as f:
    epochs = list(csv.DictReader(f))
  timed = [float(r["train_seconds"]) for r in epochs]
  step_memory = {("with_aux" if aux else "main") + ("_rewire" if rewiring else ""):
                 sj.memory.compiled_bytes(c) for (aux, rewiring), c in compiled.items()}
  results = {
      "config": dataclasses.asdict(config), "metrics": final, "epochs": epochs,
      "seconds_per_epoch": float(np.mean(timed)) if timed else None,
      "samples_per_s": float(np.mean([float(r["samples_per_s"]) for r in epochs]))
      if epochs else None,
      "compile_seconds": round(compile_seconds, 2),
      "memory": {"train_step": step_memory, **sj.memory.peak_memory()},
      "label_chunk": label_chunk, "compute_dtype": compute_dtype.name,
      "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
      "mesh": None if layout is None else dict(layout.mesh.shape),
      "processes": jax.process_count(),
      "num_params": model.num_params(),
      "steps": step,
  }
  if primary:
    (out / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(final))
  return results


def define_flags() -> None:
  """One absl flag per ``Config`` field, with the field's default, and the process flags.

  ``--coordinator``, ``--num_processes`` and ``--process_id`` say where this
  process runs, not what it trains, so they are not ``Config`` fields: a run
  may resume with another number of processes.
  """
  config_flags.define_flags(Config)
  flags.DEFINE_string("coordinator", None, "several processes (hosts): 'host:port' of process "
                      "0, the same for all; each process runs the same command with its own "
                      "--process_id, and --mesh spans the devices of all of them")
  flags.DEFINE_integer("num_processes", 1, "several processes: how many")
  flags.DEFINE_integer("process_id", 0, "several processes: this one's rank, 0 to "
                       "num_processes - 1")


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.coordinator:
    # Before anything starts a backend. On CPU the processes' collectives go over gloo (TCP).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = config_flags.config_from_flags(Config)
  results = run(config)
  if jax.process_index():
    return
  memory = results["memory"]
  compiled = max((m["total_bytes"] for m in memory["train_step"].values()), default=0)
  print(f"time per epoch {results['seconds_per_epoch']:.1f} s, "
        f"{results['samples_per_s']:.0f} samples/s, train step {compiled / 2**20:.1f} MiB "
        f"(compiled), peak RSS {memory['max_rss_bytes'] / 2**20:.0f} MiB; "
        f"results in {config.output_dir}/metrics.json")


if __name__ == "__main__":
  define_flags()
  app.run(main)
