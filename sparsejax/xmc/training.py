"""Training an ``XMCModel``: the optimizer, the jitted train step and the schedules.

One step (``make_train_step``) encodes the batch, takes the classifier's input
in ``compute_dtype``, and computes the main loss over all labels in label
chunks (``chunked_loss``, or per label shard ``sharded_chunked_loss`` on a
mesh), mixed with the auxiliary cluster loss as ``(1 - a) main + a aux``;
then one optimizer update. The optimizer (``make_optimizer``) is Adam with
warm-up + cosine learning rates, one for the encoder side and one for the
classifier, wrapped for a fixed fan-in classifier by ``sparsejax.set_topology``
(SET or RigL rewiring; RigL's candidates come from the chunked loss of the
rewiring steps, ``chunked_loss_and_candidates``) or ``static_topology``.
``docs/methods.md``, "The XMC recipe", gives the maths.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsejax import nn
from sparsejax.topology import max_pruned_per_row, set_topology, static_topology
from sparsejax.xmc.clusters import cluster_targets
from sparsejax.xmc.label_chunks import chunked_loss, chunked_loss_and_candidates
from sparsejax.xmc.layout import Layout
from sparsejax.xmc.model import CLASSIFIER, XMCModel, in_classifier
from sparsejax.xmc.sharded import sharded_chunked_loss, sharded_chunked_loss_and_candidates

__all__ = ["aux_weight_at", "initial_classifier_bias", "make_optimizer", "make_train_step",
           "make_train_steps", "resolve_compute_dtype", "resolve_label_chunk",
           "rigl_num_candidates"]

_COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def resolve_label_chunk(label_chunk: int = 0) -> int:
  """``label_chunk``, or for 0 (auto) 65,536 labels on a GPU and 4,096 on CPU.

  On a GPU one launch per chunk makes small chunks slow; on CPU a chunk's
  logits stay in cache.
  """
  if label_chunk < 0:
    raise ValueError(f"label_chunk must be positive, or 0 for auto; got {label_chunk}")
  return label_chunk or (65_536 if _on_gpu() else 4_096)


def resolve_compute_dtype(compute_dtype: str = "auto") -> jnp.dtype:
  """``compute_dtype`` (``"float32"``, ``"bfloat16"`` or ``"auto"``) as a dtype.

  ``"auto"`` is bfloat16 on a GPU, float32 on CPU.
  """
  if compute_dtype not in _COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {compute_dtype!r}")
  if compute_dtype == "auto":
    return jnp.dtype(jnp.bfloat16 if _on_gpu() else jnp.float32)
  return jnp.dtype(compute_dtype)


def initial_classifier_bias(loss: str, num_labels: int) -> float:
  """The loss's optimum for a label that is negative everywhere: every label's initial bias.

  ``-1`` for ``"squared_hinge"``, ``-log L`` for ``"bce"`` (about the optimum
  when a label is positive for a ``1 / L`` share of the points).
  """
  return -1.0 if loss == "squared_hinge" else -math.log(num_labels)


def rigl_num_candidates(fan_in: int, set_fraction: float) -> int:
  """RigL regrowth candidates per row: the most slots a row can prune (at least 1)."""
  return max(1, max_pruned_per_row(fan_in, set_fraction))


def aux_weight_at(step: int, *, initial: float, end_step: float) -> float:
  """The auxiliary loss's weight ``a`` at ``step``: cosine from ``initial`` to 0 at ``end_step``.

  0 from ``end_step`` on: the train step then leaves the aux head out.
  """
  if step >= end_step:
    return 0.0
  return initial * 0.5 * (1 + math.cos(math.pi * step / end_step))


def _param_group(params):
  """``CLASSIFIER`` for the classifier's leaves, ``"encoder"`` for all others."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: CLASSIFIER if in_classifier(path) else "encoder", params)


def make_optimizer(model: XMCModel, *, total_steps: int, encoder_lr: float, classifier_lr: float,
                   warmup_steps: int, set_interval: int, set_fraction: float, set_end_step: int,
                   regrowth: str, key: jax.Array, layout: Layout | None = None) -> nnx.Optimizer:
  """The optimizer of an ``XMCModel``: Adam, and for a fixed fan-in classifier SET or RigL.

  Adam with linear warm-up over ``warmup_steps`` (fewer than ``total_steps``)
  then cosine decay to 0 at ``total_steps``, with peak ``classifier_lr`` for
  the classifier's params and ``encoder_lr`` for all others
  (``optax.multi_transform``).

  Arguments:
    model: the model (``model.pad_labels(layout.num_padded)`` first, for a
      sharded run).
    total_steps: optimizer steps of the whole run (the schedules' length).
    encoder_lr, classifier_lr: the two peak learning rates.
    warmup_steps: linear warm-up of both learning rates.
    set_interval: for a fixed fan-in classifier, rewire every this many
      updates (``sparsejax.set_topology``); 0 keeps the topology static
      (``sparsejax.static_topology``).
    set_fraction: initial fraction of each row that rewiring prunes and
      regrows (cosine-decayed to ``set_end_step``).
    set_end_step: the last update that may rewire.
    regrowth: ``"random"`` (SET) or ``"rigl"``.
    key: SET's random regrowth (folded with the step).
    layout: for a sharded run, its ``Layout``: each label shard rewires its
      own rows.

  Returns:
    An ``nnx.Optimizer``; for a fixed fan-in classifier it also updates the
    topology (``wrt=(nnx.Param, sparsejax.nn.Indices)``).
  """
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps = {total_steps}), got "
                     f"{warmup_steps}")

  def adam(peak):
    return optax.adam(optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps))

  tx = optax.multi_transform({"encoder": adam(encoder_lr), CLASSIFIER: adam(classifier_lr)},
                             _param_group)
  if not model.sparse:
    return nnx.Optimizer(model, tx, wrt=nnx.Param)
  if set_interval:
    tx = set_topology(tx, key=key, interval=set_interval, end_step=set_end_step,
                      prune_fraction=set_fraction, regrowth=regrowth,
                      in_features=nn.fixed_fanin_sizes(model),
                      **({} if layout is None else {"mesh": layout.mesh, "row_axis": "labels"}))
  else:
    tx = static_topology(tx)
  return nnx.Optimizer(model, tx, wrt=(nnx.Param, nn.Indices))


def _train_step(model_def, opt_def, wrt, model_state, opt_state, batch, cluster_of_label,
                aux_weight, *, loss, label_chunk, num_clusters, layout=None,
                compute_dtype=jnp.float32, update_kwargs=(), num_candidates=0):
  """One optimizer step; returns the new states and ``[loss, main loss, aux loss, |grad|]``.

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
    extra["regrowth_candidates"] = {CLASSIFIER: candidates}
  optimizer.update(model, grads, **extra)
  return nnx.state(model), nnx.state(optimizer), jnp.stack([total, main, aux, _norm(grads)])


def _norm(grads) -> jax.Array:
  """The global L2 norm of the float leaves of ``grads`` (the topology's are ``float0``)."""
  leaves = [g for g in jax.tree.leaves(grads) if jnp.issubdtype(g.dtype, jnp.floating)]
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


def make_train_step(model_def, opt_def, wrt, *, loss: str, label_chunk: int,
                    compute_dtype=jnp.float32, num_clusters: int = 0, rewire=None,
                    num_candidates: int = 0, layout: Layout | None = None, state_shardings=None):
  """The jitted train step of an ``XMCModel`` and its optimizer, split with ``nnx.split``.

  Arguments:
    model_def, opt_def: the graph definitions of the model and the optimizer
      (from ``make_optimizer``).
    wrt: the optimizer's ``wrt`` filter (what is differentiated and updated).
    loss: ``"squared_hinge"`` or ``"bce"`` (see ``chunked_loss``).
    label_chunk: labels scored at once (``resolve_label_chunk``).
    compute_dtype: the dtype of the classifier's input (and of the dense
      classifier's weights) in the logits (``resolve_compute_dtype``); the
      weights, Adam state and loss stay float32.
    num_clusters: outputs of the aux head (0 without one).
    rewire: ``None``: the optimizer's update decides (for ``set_topology``:
      it rewires when its update is due, inside the step, ``lax.cond``);
      ``False``: for a ``set_topology`` optimizer only, a step that never
      rewires and traces nothing of it, for the updates that
      ``sparsejax.is_rewire_step`` says are not due (on a due one it would
      skip the rewiring).
    num_candidates: for RigL (with ``rewire=None``), the regrowth candidates
      per row (``rigl_num_candidates``) that the main loss computes and gives
      the update; 0 for none.
    layout: for a sharded run (model padded with ``XMCModel.pad_labels``,
      optimizer from ``make_optimizer(..., layout=layout)``), its ``Layout``;
      None for one device.
    state_shardings: with ``layout``, ``(model, optimizer)`` state shardings
      from ``layout.shardings``: the step's input and output shardings of the
      states. The batch comes split over the data axis (``layout.batch``), the
      clusters and the aux weight replicated; the losses are replicated.

  Returns:
    ``step(model_state, opt_state, batch, cluster_of_label, aux_weight) ->
    (model_state, opt_state, losses)``: ``batch`` as from
    ``sparsejax.data.xmc.batches``, ``cluster_of_label`` ``(L,)`` or None (no
    aux head in this step), ``aux_weight`` a float32 scalar, ``losses`` the
    float32 ``[loss, main loss, aux loss, gradient norm]`` (the global L2 norm of
    the float gradients, for the caller's divergence check). Both states are
    donated.
  """
  if rewire not in (None, False):
    raise ValueError(f"rewire must be None or False, got {rewire!r}")
  step = functools.partial(
      _train_step, model_def, opt_def, wrt, loss=loss, label_chunk=label_chunk,
      num_clusters=num_clusters, layout=layout, compute_dtype=compute_dtype,
      update_kwargs=(("rewire", False),) if rewire is False else (),
      num_candidates=num_candidates)
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


def make_train_steps(model_def, opt_def, wrt, *, rewires: bool, num_candidates: int = 0,
                     **step_args) -> dict[bool, Callable]:
  """A run's train steps, keyed by whether the update rewires.

  Arguments:
    model_def, opt_def, wrt: as in ``make_train_step``.
    rewires: whether the optimizer is ``set_topology`` (a rewired fixed
      fan-in classifier).
    num_candidates: for RigL, the regrowth candidates per row of the rewiring
      step (``rigl_num_candidates``); 0 for SET.
    **step_args: the other arguments of ``make_train_step`` (``loss``,
      ``label_chunk``, ``compute_dtype``, ``num_clusters``, ``layout``,
      ``state_shardings``).

  Returns:
    ``{False: step}`` without rewiring; with it, ``{False: a step that traces
    no rewiring, True: the rewiring step}``: update ``t`` runs
    ``steps[sparsejax.is_rewire_step(t, interval=..., end_step=...)]``.
  """
  steps = {False: make_train_step(model_def, opt_def, wrt, rewire=False if rewires else None,
                                  **step_args)}
  if rewires:
    steps[True] = make_train_step(model_def, opt_def, wrt, num_candidates=num_candidates,
                                  **step_args)
  return steps
