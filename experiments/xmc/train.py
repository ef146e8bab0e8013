"""Trains and evaluates an extreme multi-label classifier (the project's main job).

``python -m experiments.xmc.train`` (or ``python -m experiments.xmc.main``)
trains ``experiments.xmc.model.XMCModel``: an embedding bag over the sparse
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
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import pathlib
import resource
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import sparsejax as sj
from experiments.xmc.model import XMCModel
from sparsejax.data.synthetic_xmc import synthetic_xmc
from sparsejax.data.xmc import XMCDataset, batches, pad_points, read_bow, steps_per_epoch
from sparsejax.xmc import (RankingMetrics, balanced_kmeans, chunked_loss,
                           chunked_loss_and_candidates, chunked_topk,
                           cluster_targets, format_table, inverse_propensity, label_centroids,
                           mesh_from_spec, pad_labels, padded_num_labels, sharded_chunked_loss,
                           sharded_chunked_loss_and_candidates, sharded_chunked_topk)

__all__ = ["Config", "Layout", "put", "read_config", "load_data", "label_clusters",
           "resolved_label_chunk", "resolved_compute_dtype", "build", "make_train_step",
           "evaluate", "checkpoint_manager", "restore", "run", "define_flags", "main"]

KS = (1, 3, 5)
METRIC_NAMES = [f"{m}@{k}" for m in ("P", "nDCG", "PSP") for k in KS]
# Fields that may change when a run resumes: they do not affect training (``mesh``
# only through the order of floating-point reductions).
_RESUMABLE = {"eval_every", "eval_batch_size", "propensity_a", "propensity_b",
              "checkpoint_every", "step_log", "mesh"}
_COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def _field(default, doc: str):
  return dataclasses.field(default=default, metadata={"help": doc})


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on: one absl flag per field, with the help shown here."""
  dataset: str = _field("synthetic", "'synthetic', or a directory with train.txt and test.txt "
                        "in the Extreme Classification Repository's BoW format")
  num_train: int = _field(20_000, "synthetic data: training points")
  num_test: int = _field(5_000, "synthetic data: test points")
  num_features: int = _field(16_384, "synthetic data: feature vocabulary D")
  num_labels: int = _field(4_096, "synthetic data: labels L")
  data_seed: int = _field(0, "synthetic data: seed of the generator")
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
  aux: bool = _field(False, "auxiliary objective: BCE of a head over label clusters")
  aux_weight: float = _field(0.4, "initial weight a of the auxiliary loss")
  aux_epochs: float = _field(2.0, "epoch at which the cosine-decayed a reaches 0 and the "
                             "head stops being trained")
  cluster_size: int = _field(64, "labels per cluster (balanced k-means of label centroids)")
  epochs: int = _field(10, "passes over the training set")
  batch_size: int = _field(128, "points per step")
  seed: int = _field(0, "seed of the initialisation, the SET rewiring and the data order")
  encoder_lr: float = _field(3e-3, "peak Adam learning rate of everything but the classifier")
  classifier_lr: float = _field(1e-2, "peak Adam learning rate of the classifier")
  warmup_steps: int = _field(100, "linear warm-up of both learning rates, then cosine decay "
                             "to 0 at the end of the run")
  set_interval: int = _field(50, "SET rewires the fixed fan-in classifier every this many "
                             "steps (0: static topology)")
  set_fraction: float = _field(0.3, "initial fraction of each row that SET prunes and "
                               "regrows (cosine-decayed)")
  set_until: float = _field(0.66, "fraction of the run after which SET stops")
  regrowth: str = _field("random", "how rewiring regrows the pruned slots: 'random' (SET) or "
                         "'rigl' (largest dense gradient)")
  propensity_a: float = _field(0.55, "A of the inverse propensities (PSP@k)")
  propensity_b: float = _field(1.5, "B of the inverse propensities (PSP@k)")
  eval_every: int = _field(1, "evaluate on the test set every this many epochs "
                           "(0: only at the end)")
  eval_batch_size: int = _field(512, "points per forward pass when evaluating")
  output_dir: str = _field("runs/xmc", "config, checkpoints, CSVs and metrics.json; a run "
                           "started again here resumes")
  checkpoint_every: int = _field(0, "also checkpoint every this many steps "
                                 "(0: at epoch ends only)")
  step_log: bool = _field(False, "write steps.csv: each step's loss and a CRC of its batch")
  mesh: str = _field("", "device mesh 'data:D,labels:M', e.g. 'data:2,labels:4' (D * M = all "
                     "devices of all processes): each batch is split over D devices, the "
                     "classifier's labels over M; '' trains on one device")


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


def _num_clusters(config: Config, num_labels: int) -> int:
  return -(-num_labels // config.cluster_size) if config.aux else 0


def _keys(config: Config):
  """Keys of the model init, the SET rewiring and the label clustering."""
  return jax.random.split(jax.random.key(config.seed), 3)


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def resolved_label_chunk(config: Config) -> int:
  """``config.label_chunk``, or for 0 (auto) 65,536 labels on a GPU and 4,096 on CPU."""
  return config.label_chunk or (65_536 if _on_gpu() else 4_096)


def resolved_compute_dtype(config: Config) -> jnp.dtype:
  """``config.compute_dtype`` as a dtype; ``"auto"`` is bfloat16 on a GPU, float32 on CPU."""
  if config.compute_dtype == "auto":
    return jnp.dtype(jnp.bfloat16 if _on_gpu() else jnp.float32)
  return jnp.dtype(config.compute_dtype)


def _check_config(config: Config) -> None:
  """Refuses values of ``config`` that no run can use."""
  if config.loss not in sj.xmc.LOSSES:
    raise ValueError(f"loss must be one of {sj.xmc.LOSSES}, got {config.loss!r}")
  if config.compute_dtype not in _COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got "
                     f"{config.compute_dtype!r}")
  if config.label_chunk < 0:
    raise ValueError(f"label_chunk must be positive, or 0 for auto; got {config.label_chunk}")
  if config.regrowth not in ("random", "rigl"):
    raise ValueError(f"regrowth must be 'random' or 'rigl', got {config.regrowth!r}")
  if config.regrowth == "rigl" and not (config.fan_in and config.set_interval):
    raise ValueError("regrowth='rigl' rewires the fixed fan-in classifier: it needs "
                     f"fan_in > 0 and set_interval > 0 (got {config.fan_in}, "
                     f"{config.set_interval})")


def _uses_set(config: Config) -> bool:
  """Whether the optimizer is ``set_topology`` (a rewired fixed fan-in classifier)."""
  return bool(config.fan_in and config.set_interval)


def _set_end_step(config: Config, total_steps: int) -> int:
  """The last update that may rewire."""
  return int(config.set_until * total_steps)


def _num_candidates(config: Config) -> int:
  """RigL candidates per row: the most slots a row can prune (at least 1)."""
  return max(1, sj.topology.max_pruned_per_row(config.fan_in, config.set_fraction))


def label_clusters(config: Config, train: XMCDataset) -> np.ndarray:
  """``(L,)`` int32 cluster of each label: balanced k-means of training label centroids."""
  key = _keys(config)[2]
  centroids = label_centroids(train.feature_indptr, train.feature_ids, train.feature_values,
                              train.label_indptr, train.label_ids,
                              num_features=train.num_features, num_labels=train.num_labels,
                              dim=64, key=jax.random.fold_in(key, 0))  # 64: plenty to cluster
  return balanced_kmeans(centroids, _num_clusters(config, train.num_labels),
                         key=jax.random.fold_in(key, 1))


def _param_group(params):
  """``"classifier"`` for the classifier's leaves, ``"encoder"`` for all others."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "classifier" if getattr(path[0], "key", None) == "classifier"
      else "encoder", params)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a run with ``Config.mesh`` lays out its arrays on the devices.

  The classifier's arrays have ``num_padded`` rows, ``L`` rounded up to a
  multiple of the label shards; the rows past ``L`` are zero padding that never
  counts in the loss or the top-k.

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

    Leaves under a ``classifier`` key with ``num_padded`` rows (the params, their
    Adam moments) are split by rows over the label axis; all others (the
    encoder, step counts) are replicated.
    """
    rows = NamedSharding(self.mesh, P("labels"))

    def sharding(path, leaf):
      on_labels = (any(getattr(key, "key", None) == "classifier" for key in path)
                   and len(leaf.shape) >= 1 and leaf.shape[0] == self.num_padded)
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


def _host(x) -> np.ndarray:
  """The whole value of a (possibly sharded over processes) array, on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def build(config: Config, num_features: int, num_labels: int, total_steps: int, *,
          layout: Layout | None = None) -> tuple[XMCModel, nnx.Optimizer]:
  """The freshly initialised model and its optimizer, a function of ``config`` only.

  Arguments:
    config: the run's configuration.
    num_features, num_labels: the data's ``D`` and ``L``.
    total_steps: optimizer steps of the whole run (the schedules' length).
    layout: for a sharded run, its ``Layout``: the classifier's arrays get
      ``layout.num_padded`` rows (zeros past ``L``; the first ``L`` are those
      of the unsharded model, and ``classifier.out_features`` stays ``L``),
      and SET rewires each label shard's rows. Nothing is placed on devices
      yet: ``Layout.shardings`` and ``put`` do that to the split states.

  Returns:
    ``(model, optimizer)``. For a fixed fan-in classifier the optimizer also
    updates the topology (``wrt=(nnx.Param, sparsejax.nn.Indices)``).
  """
  _check_config(config)
  model_key, set_key, _ = _keys(config)
  model = XMCModel(num_features=num_features, num_labels=num_labels,
                   embed_dim=config.embed_dim, hidden_layers=config.hidden_layers,
                   intermediate=config.intermediate, fan_in=config.fan_in,
                   num_clusters=_num_clusters(config, num_labels),
                   classifier_bias=(-1.0 if config.loss == "squared_hinge"
                                    else -math.log(num_labels)),
                   rngs=nnx.Rngs(model_key))
  if layout is not None:
    # Padded after the init, so that the real labels start as on one device.
    padded = pad_labels(model.classifier_params(), layout.num_padded)
    for name, value in padded.items():
      getattr(model.classifier, name).set_value(value)

  def adam(peak):
    warmup = min(config.warmup_steps, total_steps - 1)
    return optax.adam(optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps))

  tx = optax.multi_transform({"encoder": adam(config.encoder_lr),
                              "classifier": adam(config.classifier_lr)}, _param_group)
  if not model.sparse:
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
  if config.set_interval:
    tx = sj.set_topology(tx, key=set_key, interval=config.set_interval,
                         end_step=_set_end_step(config, total_steps),
                         prune_fraction=config.set_fraction, regrowth=config.regrowth,
                         in_features=sj.nn.fixed_fanin_sizes(model),
                         **({} if layout is None else {"mesh": layout.mesh, "row_axis": "labels"}))
  else:
    tx = sj.static_topology(tx)
  return model, nnx.Optimizer(model, tx, wrt=(nnx.Param, sj.nn.Indices))


def _train_step(model_def, opt_def, wrt, model_state, opt_state, batch, cluster_of_label,
                aux_weight, *, loss, label_chunk, num_clusters, layout=None,
                compute_dtype=jnp.float32, update_kwargs=(), num_candidates=0):
  """One optimizer step; returns the new states and ``[loss, main loss, aux loss]``.

  ``cluster_of_label=None`` leaves the auxiliary head out of the step.
  ``update_kwargs`` (pairs) go to the optimizer's update; with
  ``num_candidates``, the main loss also gives each label's RigL regrowth
  candidates, which go to it as ``regrowth_candidates``.
  """
  model, optimizer = nnx.merge(model_def, model_state), nnx.merge(opt_def, opt_state)
  if layout is None:
    main_loss = functools.partial(chunked_loss, loss=loss, chunk_size=label_chunk)
    candidates_loss = functools.partial(chunked_loss_and_candidates, loss=loss,
                                        chunk_size=label_chunk, num_candidates=num_candidates)
  else:
    sharded = dict(mesh=layout.mesh, num_labels=layout.num_labels, loss=loss,
                   chunk_size=label_chunk)
    main_loss = functools.partial(sharded_chunked_loss, **sharded)
    candidates_loss = functools.partial(sharded_chunked_loss_and_candidates, **sharded,
                                        num_candidates=num_candidates)

  def objective(model):
    z = model.encode(batch["feature_ids"], batch["feature_values"], batch["feature_mask"])
    h = model.classifier_input(z).astype(compute_dtype)
    if num_candidates:
      main, candidates = candidates_loss(model.classifier_params(), h, batch["label_ids"],
                                         batch["label_mask"])
    else:
      main, candidates = main_loss(model.logits_fn, model.classifier_params(),
                                   h, batch["label_ids"], batch["label_mask"]), None
    if cluster_of_label is None:
      return main, (main, jnp.zeros_like(main), candidates)
    targets = cluster_targets(batch["label_ids"], batch["label_mask"], cluster_of_label,
                              num_clusters)
    aux = optax.sigmoid_binary_cross_entropy(model.aux_head(z), targets).sum(-1).mean()
    return (1 - aux_weight) * main + aux_weight * aux, (main, aux, candidates)

  (total, (main, aux, candidates)), grads = nnx.value_and_grad(
      objective, argnums=nnx.DiffState(0, wrt), has_aux=True, allow_int=True)(model)
  extra = dict(update_kwargs)
  if candidates is not None:
    if cluster_of_label is not None:
      # The classifier's gradient is (1 - a) times the main loss's, whose scores these are.
      candidates = candidates._replace(scores=(1 - aux_weight) * candidates.scores)
    extra["regrowth_candidates"] = {"classifier": candidates}
  optimizer.update(model, grads, **extra)
  return nnx.state(model), nnx.state(optimizer), jnp.stack([total, main, aux])


def make_train_step(config: Config, model_def, opt_def, wrt, *, num_clusters: int,
                    layout: Layout | None = None, state_shardings=None, rewire=None):
  """The jitted train step of a model and optimizer split with ``nnx.split``.

  Arguments:
    config: gives the loss, the label chunk, the compute dtype and the regrowth.
    model_def, opt_def: the graph definitions of the model and the optimizer.
    wrt: the optimizer's ``wrt`` filter (what is differentiated and updated).
    num_clusters: outputs of the aux head (0 without one).
    layout: for a sharded run (model and optimizer from ``build(...,
      layout=layout)``), its ``Layout``; None for one device.
    state_shardings: with ``layout``, ``(model, optimizer)`` state shardings
      from ``layout.shardings``: the step's input and output shardings of the
      states. The batch comes split over the data axis (``layout.batch``), the
      clusters and the aux weight replicated; the losses are replicated.
    rewire: for a rewired classifier (``set_topology``), ``None``: the step
      rewires when its update is due (decided inside, ``lax.cond``; with
      RigL it computes the regrowth candidates every time); ``False``: a
      step that never rewires and traces nothing of it, for the updates that
      ``sparsejax.is_rewire_step`` says are not due (on a due one it would
      skip the rewiring). Other models never rewire; it changes nothing there.

  Returns:
    ``step(model_state, opt_state, batch, cluster_of_label, aux_weight) ->
    (model_state, opt_state, losses)``: ``batch`` as from
    ``sparsejax.data.xmc.batches``, ``cluster_of_label`` ``(L,)`` or None (no
    aux head in this step), ``aux_weight`` a float32 scalar, ``losses`` the
    float32 ``[loss, main loss, aux loss]``. Both states are donated.
  """
  if rewire not in (None, False):
    raise ValueError(f"rewire must be None or False, got {rewire!r}")
  rewires = _uses_set(config)
  step = functools.partial(
      _train_step, model_def, opt_def, wrt, loss=config.loss,
      label_chunk=resolved_label_chunk(config), num_clusters=num_clusters, layout=layout,
      compute_dtype=resolved_compute_dtype(config),
      update_kwargs=(("rewire", False),) if rewires and rewire is False else (),
      num_candidates=(_num_candidates(config)
                      if rewires and config.regrowth == "rigl" and rewire is None else 0))
  if layout is None:
    return jax.jit(step, donate_argnums=(0, 1))
  if state_shardings is None:
    raise ValueError("a sharded train step needs state_shardings=(model, optimizer) from "
                     "layout.shardings")
  model_sharding, opt_sharding = state_shardings
  return jax.jit(step, donate_argnums=(0, 1),
                 in_shardings=(model_sharding, opt_sharding, layout.batch, layout.replicated,
                               layout.replicated),
                 out_shardings=(model_sharding, opt_sharding, layout.replicated))


@functools.partial(jax.jit, static_argnames=("model_def", "k", "label_chunk", "layout",
                                             "compute_dtype"))
def _predict(model_def, model_state, batch, *, k, label_chunk, layout=None,
             compute_dtype=jnp.dtype(jnp.float32)):
  """``(B, k)`` int32 ids of the best labels of each point, best first."""
  model = nnx.merge(model_def, model_state)
  z = model.encode(batch["feature_ids"], batch["feature_values"], batch["feature_mask"])
  h = model.classifier_input(z).astype(compute_dtype)
  if layout is None:
    return chunked_topk(model.logits_fn, model.classifier_params(), h, k=k,
                        chunk_size=label_chunk)[1]
  return sharded_chunked_topk(model.logits_fn, model.classifier_params(), h, mesh=layout.mesh,
                              num_labels=layout.num_labels, k=k, chunk_size=label_chunk)[1]


def evaluate(model: XMCModel, dataset: XMCDataset, *, inv_propensity: np.ndarray,
             batch_size: int, label_chunk: int, layout: Layout | None = None,
             compute_dtype=jnp.float32) -> dict[str, float]:
  """P@k, nDCG@k and PSP@k (k = 1, 3, 5) of ``model`` on every point of ``dataset``.

  Points go through in order, ``batch_size`` at a time (the last batch is
  padded with copies, so one executable serves all); labels are scored in
  chunks with a streaming top-k, so no ``(batch, L)`` array exists.

  Arguments:
    model: the trained model.
    dataset: the points to score, with the model's number of labels.
    inv_propensity: ``(L,)`` inverse propensities from the training label counts.
    batch_size: points per forward pass (with ``layout``, rounded up to a
      multiple of the data shards).
    label_chunk: labels scored at once.
    layout: for a model placed on a mesh (``build(..., layout=layout)``),
      its ``Layout``: each label shard streams its own top-k, the shards'
      are merged, and every process gets all the ids.
    compute_dtype: the dtype of the logits' inputs, as in training
      (``resolved_compute_dtype``).

  Returns:
    ``{"P@1": ..., "nDCG@1": ..., "PSP@1": ..., ...}`` as fractions.
  """
  if dataset.num_labels != model.classifier.out_features:
    raise ValueError(f"the data has {dataset.num_labels} labels, the model "
                     f"{model.classifier.out_features}")
  model_def, model_state = nnx.split(model)
  metrics = RankingMetrics(ks=KS, inv_propensity=inv_propensity)
  size = min(batch_size, len(dataset))
  if layout is not None:
    size = -(-size // layout.mesh.shape["data"]) * layout.mesh.shape["data"]
  widths = dict(max_features=max(dataset.max_features_per_point(), 1),
                max_labels=max(dataset.max_labels_per_point(), 1))
  for start in range(0, len(dataset), size):
    rows = np.arange(start, min(start + size, len(dataset)))
    batch = pad_points(dataset, np.pad(rows, (0, size - rows.size), mode="edge"), **widths)
    features = {name: batch[name] for name in ("feature_ids", "feature_values", "feature_mask")}
    if layout is not None:
      features = put(features, {name: layout.batch for name in features})
    ids = _host(_predict(model_def, model_state, features, k=max(KS), label_chunk=label_chunk,
                         layout=layout, compute_dtype=jnp.dtype(compute_dtype)))[:rows.size]
    metrics.update(ids, batch["label_ids"][:rows.size], batch["label_mask"][:rows.size])
  return metrics.result()


def _propensities(config: Config, train: XMCDataset) -> np.ndarray:
  return inverse_propensity(train.label_counts(), len(train), a=config.propensity_a,
                            b=config.propensity_b)


def checkpoint_manager(output_dir) -> ocp.CheckpointManager:
  """The orbax manager of ``output_dir/checkpoints`` (keeps the latest two)."""
  # Synchronous saves: the next step donates the state buffers being saved.
  return ocp.CheckpointManager(
      (pathlib.Path(output_dir) / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
      item_handlers=ocp.StandardCheckpointHandler())  # known before a save: item_metadata


def _checkpoint(model_state, opt_state, step: int, sums: np.ndarray) -> dict:
  """What a checkpoint holds: both states, the step and the running epoch sums.

  The step fixes everything else: the epoch, the position in the epoch's data
  order, the schedules and SET's next rewiring (its key is folded with the
  step). No stateful random generator exists to save.
  """
  return {"model": nnx.to_pure_dict(model_state), "optimizer": nnx.to_pure_dict(opt_state),
          "step": np.asarray(step, np.int64), "epoch_sums": np.asarray(sums, np.float64)}


def restore(manager: ocp.CheckpointManager, model_state, opt_state):
  """Loads the latest checkpoint into the states (in place), with their shardings.

  Each array is read straight into the sharding of the state's array, so a
  checkpoint written on one mesh restores onto another mesh shape or onto one
  device. Where the classifier's padded row count differs (another number of
  label shards), its arrays are cut or zero-padded to the state's rows: the
  rows past ``L`` are padding on both sides.

  Returns:
    ``(step, epoch_sums)``: ``(0, zeros)`` when there is no checkpoint.
  """
  latest = manager.latest_step()
  if latest is None:
    return 0, np.zeros(4)
  target = _checkpoint(model_state, opt_state, 0, np.zeros(4))
  saved_shapes = {_path_key(path): tuple(meta.shape) for path, meta in
                  jax.tree_util.tree_leaves_with_path(manager.item_metadata(latest).tree,
                                                      is_leaf=lambda x: hasattr(x, "shape"))}
  padding = {}

  def abstract(path, x):
    if isinstance(x, np.ndarray):
      return x
    sharding, saved_shape = x.sharding, saved_shapes[_path_key(path)]
    if saved_shape != x.shape:
      if saved_shape[1:] != x.shape[1:] or "classifier" not in _path_key(path):
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


def _compiled_bytes(compiled) -> dict[str, int]:
  """Memory XLA planned for a compiled executable (arguments, outputs, temporaries)."""
  stats = compiled.memory_analysis()
  out = {"argument_bytes": stats.argument_size_in_bytes, "output_bytes": stats.output_size_in_bytes,
         "temp_bytes": stats.temp_size_in_bytes, "alias_bytes": stats.alias_size_in_bytes}
  out = {name: int(value) for name, value in out.items()}
  # Donated state is an argument and an output in one buffer: count it once.
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out


def _memory_report(step_memory: dict[str, dict[str, int]]) -> dict:
  """Compiled memory of the train steps, process peak RSS and, on GPU, the device peak."""
  report = {"train_step": step_memory,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    report["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  return report


def _aux_weight(config: Config, step: int, per_epoch: int) -> float:
  """``a`` at ``step``: cosine from ``aux_weight`` to 0 at epoch ``aux_epochs``; 0 after."""
  cutoff = config.aux_epochs * per_epoch
  if not config.aux or step >= cutoff:
    return 0.0
  return config.aux_weight * 0.5 * (1 + math.cos(math.pi * step / cutoff))


def _batch_crc(batch: dict) -> int:
  """A CRC-32 of a batch's feature and label ids, to compare data orders across runs."""
  crc = zlib.crc32(np.ascontiguousarray(batch["feature_ids"]).tobytes())
  return zlib.crc32(np.ascontiguousarray(batch["label_ids"]).tobytes(), crc)


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
  clusters = jnp.asarray(label_clusters(config, train)) if config.aux else None
  inv_propensity = _propensities(config, train)
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
  step_kind = dict(num_clusters=_num_clusters(config, train.num_labels), layout=layout,
                   state_shardings=state_shardings)
  step_fns = {False: make_train_step(config, model_def, opt_def, wrt, rewire=False, **step_kind)}
  if _uses_set(config):
    step_fns[True] = make_train_step(config, model_def, opt_def, wrt, rewire=None, **step_kind)
  end_step = _set_end_step(config, total_steps)
  widths = dict(max_features=train.max_features_per_point(),
                max_labels=train.max_labels_per_point())
  label_chunk, compute_dtype = resolved_label_chunk(config), resolved_compute_dtype(config)
  compiled, compile_seconds = {}, 0.0

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

  def save():
    manager.save(step, args=ocp.args.StandardSave(
        _checkpoint(model_state, opt_state, step, sums)))
    return step

  def score(model):
    return evaluate(model, test, inv_propensity=inv_propensity,
                    batch_size=config.eval_batch_size, label_chunk=label_chunk,
                    layout=layout, compute_dtype=compute_dtype)

  def on_devices(batch):
    # Every process holds the whole batch and places its devices' part of it.
    return batch if layout is None else put(batch, {name: layout.batch for name in batch})

  fields = ["epoch", "step", "loss", "main_loss", "aux_loss", "aux_weight", "train_seconds",
            "samples_per_s", "topology_changed"] + METRIC_NAMES
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
        a = _aux_weight(config, step, per_epoch)
        with_aux = a > 0
        rewiring = _uses_set(config) and sj.is_rewire_step(
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
          last_saved = save()
      pending = flush(pending)
      seconds = train_clock() - start
      model = nnx.merge(model_def, model_state)
      row = dict(epoch=epoch + 1, step=step, loss=sums[0] / sums[3], main_loss=sums[1] / sums[3],
                 aux_loss=sums[2] / sums[3], aux_weight=_aux_weight(config, step - 1, per_epoch),
                 train_seconds=round(seconds, 3),
                 samples_per_s=round(steps_run * config.batch_size / seconds, 1),
                 topology_changed="" if initial_topology is None else float(np.mean(
                     _host(model.classifier.indices[...])[:train.num_labels]
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
        last_saved = save()
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
  params = nnx.state(model, nnx.Param)
  classifier = jax.tree.leaves(nnx.state(model.classifier, nnx.Param))
  unpadded = lambda x: x.size // x.shape[0] * train.num_labels  # classifier leaves: (rows, ...)
  results = {
      "config": dataclasses.asdict(config), "metrics": final, "epochs": epochs,
      "seconds_per_epoch": float(np.mean(timed)) if timed else None,
      "samples_per_s": float(np.mean([float(r["samples_per_s"]) for r in epochs]))
      if epochs else None,
      "compile_seconds": round(compile_seconds, 2),
      "memory": _memory_report({("with_aux" if aux else "main") + ("_rewire" if rewiring else ""):
                                _compiled_bytes(c) for (aux, rewiring), c in compiled.items()}),
      "label_chunk": label_chunk, "compute_dtype": compute_dtype.name,
      "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
      "mesh": None if layout is None else dict(layout.mesh.shape),
      "processes": jax.process_count(),
      "num_params": {
          "total": int(sum(x.size for x in jax.tree.leaves(params))
                       - sum(x.size - unpadded(x) for x in classifier)),
          "classifier": int(sum(unpadded(x) for x in classifier))},
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
  define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
            str: flags.DEFINE_string}
  for field in dataclasses.fields(Config):
    define[type(field.default)](field.name, field.default, field.metadata["help"])
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
  config = Config(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Config)})
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
