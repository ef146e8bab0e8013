"""SμPar reproduction: does the optimal learning rate transfer across sparsity?

``python -m experiments.supar.sweep`` trains the byte-level GPT of
``experiments.common.byte_lm`` on the Python standard library's sources
(``sparsejax.data.stdlib_byte_corpus``, validation split by file):

1. Tunes the base LR and the input multiplier ``alpha_in`` once on a small
   dense μP proxy (width ``base_width``) over a coarse grid.
2. At the target width, for every hidden density (attention q/k/v/o and MLP
   sparse, ``MaskedLinear`` or ``FixedFanInLinear``; embeddings, norms and the
   head dense) and every parameterization (SP, μP, SμPar from
   ``sparsejax.supar``: init, forward multipliers, attention ``1/d_head``, LR
   multipliers), sweeps the LR over ``base_lr * 2^k`` with the base init
   std, for several seeds, and records the final validation loss.
3. Runs the coordinate check (``sparsejax.supar.coord_check``) on the same
   model across densities.

All seeds and LRs of one (parameterization, density) train at once: one
compiled step, vmapped over the runs (each keeps its own keys, topology and
LR, so its losses are those of a run on its own). Every call appends its runs
to ``runs.csv`` as it ends; a rerun of the same command skips the runs already
there (``experiments.supar.groups``), and ``--time_budget_s`` stops before a
call that would not finish. Groups run in order of information: the proxy,
then the sparsest and the densest density, then the rest.

Outputs in ``--output_dir``: ``runs.csv`` (every run), ``config.json`` (the
settings the runs depend on), ``lr_sweep.png`` (validation loss vs LR, one
panel per parameterization, one curve per density with its seed band,
optimum starred), ``best_vs_density.png``, ``coord_check.csv`` and
``coord_check.png``, and ``sweep.md`` (command, machine, run time, optimum
table, the measured drift and loss gaps). ``--report_only`` redraws them
from ``runs.csv`` alone, also for a partial sweep.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fractions
import math
import os
import pathlib
import sys
import time
from collections import Counter
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

import sparsejax as sj
from ..common import config_flags
from ..common.byte_lm import ByteLM, LinearFactory, dense_linear
from ..common.config_flags import field
from ..common.progress import Progress
from ..common.tables import mean_std, read_csv, write_csv
from . import coord_output, groups
from sparsejax import supar
from sparsejax.data import ByteCorpus, sample_windows, stdlib_byte_corpus

LAYERS = ("masked", "fixed_fanin")
# Which ByteLM parameters are not hidden; everything else of ndim 2 is hidden.
ROLES = {"^embed/": "embedding", "^position$": "embedding", "^head/": "output"}
NAMES = {"sp": "SP", "mup": "μP", "supar": "SμPar"}
_HIDDEN_LAYERS = ("qkv", "proj", "fc", "out")
_VAL_KEY = 12345  # the fixed validation windows


def _density_label(density: float) -> str:
  """``1/16`` for 0.0625: how densities show in flags and tables."""
  return str(fractions.Fraction(density).limit_denominator(1 << 20))


def _fraction(text: str) -> float:
  """A density flag entry: a number or a fraction like ``1/16``."""
  return float(fractions.Fraction(text))


@dataclasses.dataclass(frozen=True)
class Config:
  """The sweep: one flag per field (``experiments.common.config_flags``), with the help here.

  The defaults took 20 minutes on 2 shared CPU cores (docs/supar_transfer).
  """
  # The models.
  width: int = field(64, "width of the swept models (densities are swept at this width)")
  base_width: int = field(32, "width of the dense μP proxy; m_d = width / base_width")
  depth: int = field(2, "transformer blocks")
  heads: int = field(2, "attention heads")
  context: int = field(64, "context length in bytes (of every window)")

  # Training.
  batch: int = field(16, "windows per step")
  steps: int = field(200, "Adam steps")
  warmup: int = field(20, "steps of linear LR warmup, then cosine decay to 0")
  init_std: float = field(0.02, "base init std s (not tuned)")
  alpha_in: float = field(1.0, "μP/SμPar embedding multiplier when base_lr is given")
  alpha_out: float = field(1.0, "μP/SμPar output multiplier (not tuned)")
  weight_decay: float = field(0.0, "AdamW decay, coupled to the LR multipliers "
                              "(sparsejax.scale_by_supar)")

  # What is swept.
  layer: str = field("masked", "hidden sparse layer", choices=LAYERS)
  densities: tuple[float, ...] = field((1, 1 / 2, 1 / 4, 1 / 8, 1 / 16),
                                       "hidden densities, numbers or fractions like 1/16 "
                                       "(1 is dense: nnx.Linear)",
                                       parse=_fraction, format=_density_label)
  parameterizations: tuple[str, ...] = field(supar.PARAMETERIZATIONS,
                                             "subset of sp, mup, supar")
  proxy_log2_lrs: tuple[int, ...] = field((-11, -10, -9, -8, -7, -6, -5, -4, -3),
                                          "the proxy's LR grid, 2^k")
  proxy_alpha_in: tuple[float, ...] = field((1, 4, 16), "the proxy's alpha_in grid (tuned "
                                            "jointly with the LR)", parse=float)
  lr_steps: tuple[int, ...] = field((-2, -1, 0, 1, 2, 3, 4), "the sweep's LR grid, "
                                    "base_lr * 2^k")
  base_lr: float = field(0.0, "if > 0, use it (and alpha_in) and skip the proxy")

  # Seeds, data and the coordinate check.
  seeds: int = field(2, "seeds per setting (init, topology and data order)")
  train_bytes: int = field(4_000_000, "bytes of the training corpus")
  val_bytes: int = field(400_000, "bytes of the validation corpus")
  val_batches: int = field(8, "validation: val_batches * batch fixed windows")
  coord_steps: int = field(3, "coordinate check: Adam steps (0: skip it)")
  coord_lr: float = field(1e-2, "coordinate check: learning rate")
  coord_seeds: int = field(2, "coordinate check: seeds")
  seed: int = field(0, "root PRNG seed")

  # How the runs are executed (none of these changes a run's result but dtype).
  dtype: str = field("float32", "compute dtype of the forward and backward pass (params and "
                     "Adam stay float32)", choices=("float32", "bfloat16"))
  models_per_call: int = field(0, "runs of a group trained at once, vmapped (0: all); "
                               "calls go round-robin over the groups, the sparsest and "
                               "densest first",
                               at_least=0)
  time_budget_s: float = field(0.0, "stop before a call whose estimated end passes this many "
                               "seconds since the start (0: no limit); rerun to resume",
                               at_least=0)

  def __post_init__(self):
    config_flags.check(self)
    if self.layer not in LAYERS:
      raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
    if not self.densities or not all(0 < d <= 1 for d in self.densities):
      raise ValueError(f"densities must be in (0, 1], got {self.densities!r}")
    for name in self.parameterizations:
      if name not in supar.PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {name!r}")
    if self.steps < 1 or self.seeds < 1 or not self.lr_steps or not self.proxy_alpha_in:
      raise ValueError("need steps >= 1, seeds >= 1 and non-empty lr_steps and proxy_alpha_in")


def sparse_linear(density: float, layer: str) -> LinearFactory:
  """Factory of hidden layers with ``round(density * in)`` inputs per output.

  Density 1 gives ``nnx.Linear`` (the same function as a full mask, cheaper).
  """
  if density == 1:
    return dense_linear
  cls = {"masked": sj.nn.MaskedLinear, "fixed_fanin": sj.nn.FixedFanInLinear}[layer]
  return lambda n_in, n_out, rngs: cls(n_in, n_out, max(1, round(density * n_in)), rngs=rngs)


def build_model(config: Config, p: sj.SuPar, density: float, *, key: jax.Array,
                attention_density: float | None = None
                ) -> tuple[ByteLM, dict[str, supar.ParamSpec]]:
  """A ByteLM of width ``p.width`` with sparse hidden layers, initialised under ``p``.

  Arguments:
    config: model size and layer type.
    p: the parameterization (its width is the model's).
    density: density of the MLP layers (and the attention layers by default).
    key: draws the topology, then the weights (``supar.initialize``).
    attention_density: density of the q/k/v and attention output layers.

  Returns:
    ``(model, specs)``: the model, whose forward applies ``p``'s multipliers,
    and ``{param name: ParamSpec}`` for ``scale_by_supar``.
  """
  topology_key, init_key = jax.random.split(key)
  attention_density = density if attention_density is None else attention_density
  model = ByteLM(width=p.width, depth=config.depth, heads=config.heads, context=config.context,
                 linear=sparse_linear(density, config.layer),
                 attention_linear=sparse_linear(attention_density, config.layer),
                 head=dense_linear, parameterization=p, rngs=nnx.Rngs(params=topology_key))
  specs = supar.infer_specs(model, roles=ROLES)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  nnx.update(model, supar.initialize(params, specs, p, key=init_key))
  return model, specs


def split_model(model: ByteLM):
  """``(graphdef, params, rest)``: pure params and pure non-params (masks, indices)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


def make_optimizer(specs, p: sj.SuPar, config: Config) -> optax.GradientTransformation:
  """Adam, SμPar LR multipliers (and decay), warmup-cosine schedule of peak 1.

  The training step multiplies the result by ``-lr``, so one compiled step
  serves every LR.
  """
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, config.warmup, config.steps)
  return optax.chain(optax.scale_by_adam(),
                     sj.scale_by_supar(specs, p, weight_decay=config.weight_decay),
                     optax.scale_by_schedule(schedule))


def _cast_floats(tree, dtype):
  """``tree`` with its float leaves in ``dtype`` (masks and indices untouched)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def steps_per_call(steps: int, most: int = 100) -> int:
  """Steps per compiled call: the largest divisor of ``steps`` up to ``most``.

  A divisor, so that every call has the same length (one compile). Between
  calls the progress shows and a group whose runs all diverged stops.
  """
  return max(k for k in range(1, min(steps, most) + 1) if steps % k == 0)


class RunFns(NamedTuple):
  """One run's training and evaluation as pure functions, for ``jax.vmap`` over runs.

  Attributes:
    init: ``params -> opt_state``.
    train: ``(params, opt_state, rest, data, key, lr, start) -> ((params,
      opt_state), losses)``: Adam steps ``start ... start + steps - 1`` (``run_fns``).
      Step ``t`` trains on ``sample_windows(data, fold_in(key, t))`` and
      applies ``-lr`` times the optimizer's update; ``losses`` holds the
      ``(steps,)`` training losses.
    evaluate: ``(params, rest, inputs, targets) -> loss``: mean cross-entropy
      over validation windows ``(val_batches, batch, context)``, one batch at a time.
  """
  init: Callable
  train: Callable
  evaluate: Callable


def run_fns(graphdef, tx: optax.GradientTransformation, config: Config, *,
            steps: int | None = None) -> RunFns:
  """``RunFns`` of the model ``graphdef`` trained by ``tx`` (``make_optimizer``).

  Arguments:
    graphdef, tx: the model's graph and its optimizer.
    config: batch, context and compute dtype.
    steps: Adam steps per ``train`` call (default ``steps_per_call(config.steps)``).

  The forward and backward pass run in ``config.dtype``; params, gradients,
  Adam and the loss stay float32.
  """
  compute = jnp.dtype(config.dtype)
  steps = steps or steps_per_call(config.steps)

  def loss_fn(params, rest, inputs, targets):
    logits = nnx.merge(graphdef, _cast_floats(params, compute), rest)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           targets).mean()

  def train(params, opt_state, rest, data, key, lr, start):
    def step(state, t):
      params, opt_state = state
      inputs, targets = sample_windows(data, jax.random.fold_in(key, t), config.batch,
                                       config.context)
      loss, grads = jax.value_and_grad(loss_fn)(params, rest, inputs, targets)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
      return (params, opt_state), loss

    return jax.lax.scan(step, (params, opt_state), start + jnp.arange(steps))

  def evaluate(params, rest, inputs, targets):
    return jnp.mean(jax.lax.map(lambda batch: loss_fn(params, rest, *batch), (inputs, targets)))

  return RunFns(tx.init, train, evaluate)


class Data(NamedTuple):
  """The training bytes and the fixed validation windows.

  Attributes:
    train: ``(bytes,)`` uint8.
    val: ``(inputs, targets)``, each ``(val_batches, batch, context)`` int32.
  """
  train: jax.Array
  val: tuple[jax.Array, jax.Array]


def make_data(config: Config, corpus: ByteCorpus) -> Data:
  """``Data`` of ``corpus``: its training bytes and ``val_batches`` batches of fixed windows."""
  windows = sample_windows(jnp.asarray(corpus.val), jax.random.key(_VAL_KEY),
                           config.val_batches * config.batch, config.context)
  shape = (config.val_batches, config.batch, config.context)
  return Data(jnp.asarray(corpus.train), tuple(w.reshape(shape) for w in windows))


def _root_keys(config: Config) -> tuple[jax.Array, jax.Array]:
  """``(sweep key, coordinate-check key)``."""
  sweep_key, coord_key = jax.random.split(jax.random.key(config.seed))
  return sweep_key, coord_key


def _seed_keys(config: Config, seed: int) -> tuple[jax.Array, jax.Array]:
  """``(model key, data key)`` of a seed: the same for every LR and parameterization."""
  model_key, data_key = jax.random.split(jax.random.fold_in(_root_keys(config)[0], seed))
  return model_key, data_key


def _stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


class PreparedCall(NamedTuple):
  """A vmapped call ready to train: its runs' initial state and the compiled functions.

  Attributes:
    p, density, runs: as given to ``prepare_call``.
    state: ``(params, opt_state, rest, keys, lrs)``, each with a leading run axis.
    train, evaluate: ``RunFns.train`` and ``RunFns.evaluate`` vmapped over the
      runs, compiled.
    seconds: how long building the models and compiling took.
  """
  p: sj.SuPar
  density: float
  runs: list
  state: tuple
  train: Callable
  evaluate: Callable
  seconds: float


def prepare_call(config: Config, p: sj.SuPar, density: float, runs, data: Data) -> PreparedCall:
  """Builds the models of ``runs`` and compiles their vmapped training (thread-safe).

  Arguments:
    config: the sweep (model size, steps, dtype).
    p: the parameterization at the width to train.
    density: hidden density.
    runs: ``[(seed, lr_step, lr)]``; each run's model, topology and data order
      come from its seed (``_seed_keys``), as if it trained on its own.
    data: training bytes and validation windows (for their shapes).
  """
  began = time.monotonic()
  split = {}
  for seed in dict.fromkeys(seed for seed, _, _ in runs):
    model, specs = build_model(config, p, density, key=_seed_keys(config, seed)[0])
    split[seed] = split_model(model)
  graphdef = split[runs[0][0]][0]  # topologies differ by seed, the graph does not
  fns = run_fns(graphdef, make_optimizer(specs, p, config), config)
  params = _stack([split[seed][1] for seed, _, _ in runs])
  rest = _stack([split[seed][2] for seed, _, _ in runs])
  keys = jnp.stack([_seed_keys(config, seed)[1] for seed, _, _ in runs])
  lrs = jnp.asarray([lr for _, _, lr in runs], jnp.float32)
  opt_state = jax.jit(jax.vmap(fns.init))(params)
  train = jax.jit(jax.vmap(fns.train, in_axes=(0, 0, 0, None, 0, 0, None)),
                  donate_argnums=(0, 1)).lower(params, opt_state, rest, data.train, keys, lrs,
                                               jnp.int32(0)).compile()
  evaluate = jax.jit(jax.vmap(fns.evaluate, in_axes=(0, 0, None, None))).lower(
      params, rest, *data.val).compile()
  return PreparedCall(p, density, list(runs), (params, opt_state, rest, keys, lrs), train,
                      evaluate, time.monotonic() - began)


def train_call(config: Config, call: PreparedCall, data: Data, *, stage: str,
               advance: Callable[[int], None] = lambda run_steps: None) -> list[dict]:
  """Trains a prepared call's runs at once and evaluates them.

  Arguments:
    config: the sweep (steps).
    call: from ``prepare_call`` (its donated state is used up).
    data: training bytes and validation windows.
    stage: ``"proxy"`` or ``"sweep"``, recorded in the rows.
    advance: called with the run-steps done after every compiled call.

  Returns:
    One row per run with ``groups.COLUMNS``; the train loss is the mean of
    the last 10 % of steps; both losses are NaN once a run diverged.
  """
  began = time.monotonic()
  params, opt_state, rest, keys, lrs = call.state
  chunk, losses = steps_per_call(config.steps), []
  for start in range(0, config.steps, chunk):
    (params, opt_state), loss = call.train(params, opt_state, rest, data.train, keys, lrs,
                                           jnp.int32(start))
    losses.append(np.asarray(loss))
    advance(chunk * len(call.runs))
    if not np.isfinite(losses[-1][:, -1]).any():
      break  # every run diverged: no need to finish
  losses = np.concatenate(losses, axis=1)
  tail = losses[:, -max(1, config.steps // 10):].mean(axis=1)
  if losses.shape[1] < config.steps:
    tail[:] = math.nan
  val = np.asarray(call.evaluate(params, rest, *data.val))
  seconds, device, p = time.monotonic() - began, jax.devices()[0].device_kind, call.p
  rows = []
  for (seed, lr_step, lr), train_loss, val_loss in zip(call.runs, tail, val):
    finite = bool(np.isfinite(train_loss) and np.isfinite(val_loss))
    rows.append(dict(stage=stage, parameterization=p.parameterization, width=p.width,
                     alpha_in=p.alpha_in, density=call.density, layer=config.layer, lr=lr,
                     lr_step=lr_step, seed=seed,
                     train_loss=float(train_loss) if finite else math.nan,
                     val_loss=float(val_loss) if finite else math.nan,
                     seconds=round(seconds, 2), compile_seconds=round(call.seconds, 2),
                     runs_in_call=len(call.runs), device=device))
  return rows


def _seed_losses(rows: list[dict]) -> dict[tuple, dict[float, dict[int, float]]]:
  """``{(stage, parameterization, alpha_in, density): {lr: {seed: val loss}}}``, LRs sorted."""
  by_key = {}
  for r in rows:
    curve = by_key.setdefault((r["stage"], r["parameterization"], r["alpha_in"], r["density"]),
                              {})
    curve.setdefault(r["lr"], {})[r["seed"]] = r["val_loss"]
  return {key: dict(sorted(curve.items())) for key, curve in by_key.items()}


def _curves(rows: list[dict]) -> dict[tuple, dict[float, float]]:
  """``{(stage, parameterization, alpha_in, density): {lr: mean val loss over seeds}}``.

  The mean is NaN where any seed diverged, which rules that LR out.
  """
  return {key: {lr: float(np.mean(list(v.values()))) for lr, v in curve.items()}
          for key, curve in _seed_losses(rows).items()}


def _argmin(curve: dict[float, float], what) -> float:
  """The LR of the lowest finite loss."""
  finite = {lr: loss for lr, loss in curve.items() if np.isfinite(loss)}
  if not finite:
    raise FloatingPointError(f"every LR diverged for {what}")
  return min(finite, key=finite.get)


class SweepResult(NamedTuple):
  """What ``run`` measured.

  Attributes:
    rows: one dict per run (``stage`` "proxy" or "sweep"), ``groups.COLUMNS``.
    base_lr, alpha_in: the proxy's best LR and input multiplier (or the
      ``Config``'s when ``base_lr`` is given); the best so far while the proxy
      is unfinished, NaN before any proxy run.
    coord_rows: ``supar.coord_check`` rows (empty if skipped).
  """
  rows: list[dict]
  base_lr: float
  alpha_in: float
  coord_rows: list[dict]


def _parameterization(config: Config, name: str, width: int, alpha_in: float) -> sj.SuPar:
  return sj.SuPar(name, width=width, base_width=config.base_width, init_std=config.init_std,
                  alpha_in=alpha_in, alpha_out=config.alpha_out)


# Config fields that only choose which runs to do, or how: a rerun may change
# them and keep the runs already in runs.csv. Every other field must match.
_FREE_FIELDS = ("densities", "parameterizations", "lr_steps", "coord_steps", "coord_lr",
                "coord_seeds", "models_per_call", "time_budget_s")


def plan(config: Config, alpha_in: float) -> list[tuple[groups.Group, list[tuple[int, int]]]]:
  """Every group of the sweep in the order it runs, with its ``(lr_step, seed)`` runs.

  The proxy's groups (unless ``config.base_lr`` is given; one per ``alpha_in``
  of its grid, ``lr_step`` = log2 LR) come first, then the sweep's at
  ``alpha_in`` (``lr_step`` = log2(LR / base LR)): densities in
  ``groups.density_order``, each for every parameterization. A group's runs
  are seed-major, so a call of ``len(lr_steps)`` runs is one seed's LR curve.
  """
  seeds = range(config.seeds)
  proxy = [(groups.Group("proxy", "mup", config.base_width, float(a), 1.0, config.layer),
            [(k, s) for s in seeds for k in config.proxy_log2_lrs])
           for a in config.proxy_alpha_in] if config.base_lr <= 0 else []
  sweep = [(groups.Group("sweep", name, config.width, float(alpha_in), float(d), config.layer),
            [(k, s) for s in seeds for k in config.lr_steps])
           for d in groups.density_order(config.densities) for name in config.parameterizations]
  return proxy + sweep


def proxy_optimum(rows: list[dict]) -> tuple[float, float]:
  """``(base_lr, alpha_in)``: the proxy rows' best mean validation loss over seeds."""
  curves = _curves([r for r in rows if r["stage"] == "proxy"])
  best = {key: (lr := _argmin(curve, key), curve[lr]) for key, curve in curves.items()}
  key = min(best, key=lambda k: best[k][1])
  return best[key][0], key[2]


def _pending(config: Config, done: set, alpha_in: float) -> list[tuple[groups.Group, list]]:
  """The groups of ``plan`` with their runs missing from ``done`` (``groups.run_key``s)."""
  return [(group, runs) for group, runs in
          ((g, [(k, s) for k, s in runs if (g, k, s) not in done]) for g, runs in
           plan(config, alpha_in)) if runs]


def gpt_coord_batch(config: Config, corpus: ByteCorpus) -> tuple[tuple[jax.Array, jax.Array],
                                                                  jax.Array]:
  """The coordinate check's fixed batch and model key (``experiments.supar.coord_check`` too).

  Returns:
    ``((inputs, targets), model key)``: ``config.batch`` training windows of
    ``config.context`` bytes, both ``(batch, context)``, and the key whose
    ``fold_in(key, seed)`` builds each seed's model.
  """
  data_key, model_key = jax.random.split(_root_keys(config)[1])
  return sample_windows(jnp.asarray(corpus.train), data_key, config.batch,
                        config.context), model_key


def gpt_coord_check(config: Config, corpus: ByteCorpus, alpha_in: float) -> list[dict]:
  """``supar.coord_check`` of the GPT across ``config.densities`` at ``config.width``.

  Records the mean |output| of the embedding, of every hidden layer (q/k/v,
  attention output, MLP in and out of each block) and of the logits, on one
  fixed training batch.
  """
  def build(p, density, *, key):
    model, specs = build_model(config, p, density, key=key)
    graphdef, params, rest = split_model(model)

    def forward(params, batch):
      model = nnx.merge(graphdef, params, rest)
      logits, captured = nnx.capture(model, nnx.Intermediate,
                                     method_outputs=nnx.Intermediate)(batch[0])
      acts = {"logits": logits}
      for path, value in jax.tree_util.tree_flatten_with_path(nnx.as_pure(captured))[0]:
        # path: (module..., "__call__", 0); keep the embedding and the hidden layers.
        module = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:-2]]
        if module == ["embed"] or (module and module[-1] in _HIDDEN_LAYERS):
          acts["/".join(module)] = value
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
      return loss, acts

    return supar.CoordCheckModel(params, specs, forward)

  batch, model_key = gpt_coord_batch(config, corpus)
  base = _parameterization(config, "supar", config.base_width, alpha_in)
  return supar.coord_check(build, batch, base=base, parameterizations=config.parameterizations,
                           widths=(config.width,), densities=config.densities,
                           steps=config.coord_steps, learning_rate=config.coord_lr,
                           seeds=config.coord_seeds, key=model_key)


def _transfer(config: Config, rows: list[dict]) -> tuple[float, float]:
  """``(base_lr, alpha_in)``: the given ones, the proxy's optimum once ``rows`` hold all
  its runs, else NaNs."""
  if config.base_lr > 0:
    return config.base_lr, config.alpha_in
  done = {groups.run_key(r) for r in rows}
  if any(g.stage == "proxy" for g, _ in _pending(config, done, math.nan)):
    return math.nan, math.nan
  return proxy_optimum(rows)


def pending_runs(config: Config, rows: list[dict], alpha_in: float) -> int:
  """How many runs of ``config``'s grid ``rows`` lacks (the sweep's at ``alpha_in``)."""
  return sum(len(runs) for _, runs in _pending(config, {groups.run_key(r) for r in rows},
                                                alpha_in))


def run(config: Config, out_dir: pathlib.Path, *, progress: bool = True) -> SweepResult:
  """Proxy tuning (unless ``config.base_lr``), the density x LR sweep and the coordinate check.

  Resumable: the runs already in ``out_dir/runs.csv`` are skipped, and each
  vmapped call appends its runs there as it ends. With ``time_budget_s`` the
  sweep stops before a call whose estimated end (``groups.estimate_seconds``)
  passes the budget; the coordinate check runs once the sweep is complete.

  Arguments:
    config: the sweep.
    out_dir: where ``runs.csv`` and ``config.json`` are (``config`` must match
      the stored one except for ``_FREE_FIELDS``).
    progress: show progress on stderr.

  Returns:
    A ``SweepResult`` with every row of runs.csv.
  """
  began = time.monotonic()
  groups.check_resume(config, out_dir / "config.json", _FREE_FIELDS)
  log = groups.RunsFile(out_dir / "runs.csv")
  corpus = stdlib_byte_corpus(max_train_bytes=config.train_bytes,
                              max_val_bytes=config.val_bytes)
  data = make_data(config, corpus)
  per_run = {w: config.steps * groups.flops_per_step(width=w, depth=config.depth,
                                                    context=config.context, batch=config.batch)
             for w in (config.width, config.base_width)}
  timed = groups.timed_calls(log.rows, per_run.__getitem__)
  bar = Progress(config.steps * pending_runs(config, log.rows, _transfer(config, log.rows)[1]),
                 desc="sweep", enabled=progress)
  done_steps = 0

  def advance(run_steps):
    nonlocal done_steps
    done_steps += run_steps
    bar.update(done_steps)

  def train_stage(stage: str, alpha_in: float, base_lr: float) -> bool:
    """Trains the stage's missing runs; False if the time budget stopped it.

    While one call trains, a second thread builds and compiles the next one
    (with a budget: if both are estimated to fit it).
    """
    # All seeds at the sparsest and densest settings (the drift and the gap) before the rest.
    extremes = (min(config.densities), max(config.densities))
    calls = []
    for group, runs in groups.interleaved_calls(
        [(g, r) for g, r in _pending(config, log.done, alpha_in) if g.stage == stage],
        config.models_per_call, tier=lambda g: g.density not in extremes):
      p = _parameterization(config, group.parameterization, group.width, group.alpha_in)
      calls.append((group, p, [(seed, k, 2.0**k if stage == "proxy" else base_lr * 2.0**k)
                               for k, seed in runs]))

    def estimate(i):
      group, _, runs = calls[i]
      return groups.estimate_seconds(group.width, len(runs) * per_run[group.width], timed)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      prepare = lambda i: pool.submit(prepare_call, config, calls[i][1], calls[i][0].density,
                                      calls[i][2], data)
      prefetched = None
      for i, (group, p, runs) in enumerate(calls):
        elapsed = time.monotonic() - began
        if not groups.fits(elapsed, estimate(i), config.time_budget_s):
          bar.write(f"time budget: {elapsed:.0f} s used, the next call needs ~{estimate(i):.0f} s "
                    f"of {config.time_budget_s:g} s; stopping (rerun to resume)")
          return False
        prepared = (prefetched or prepare(i)).result()
        # With a budget, prefetch only what is known to fit: the stop would wait for it.
        budget, last = config.time_budget_s, i + 1 == len(calls)
        later = None if last else estimate(i + 1)
        known_to_fit = later is not None and groups.fits(elapsed + (estimate(i) or 0.0), later,
                                                         budget)
        prefetched = None if last or (budget and not known_to_fit) else prepare(i + 1)
        rows = train_call(config, prepared, data, stage=stage, advance=advance)
        log.append(rows)
        timed.append(groups.CallTime(group.width, len(runs) * per_run[group.width],
                                     rows[0]["seconds"], rows[0]["compile_seconds"]))
        losses = [r["val_loss"] for r in rows if np.isfinite(r["val_loss"])]
        bar.write(f"{stage} {NAMES[p.parameterization]} width {p.width} α_in {p.alpha_in:g} "
                  f"density {_density_label(group.density)}: {len(runs)} runs trained in "
                  f"{rows[0]['seconds']:.0f} s (built and compiled in "
                  f"{rows[0]['compile_seconds']:.0f} s), best val loss "
                  f"{min(losses, default=math.nan):.4f}")
    return True

  if train_stage("proxy", math.nan, math.nan):
    base_lr, alpha_in = _transfer(config, log.rows)
    train_stage("sweep", alpha_in, base_lr)
  bar.close()
  base_lr, alpha_in = _transfer(config, log.rows)
  complete = not pending_runs(config, log.rows, alpha_in)
  coord_rows = (gpt_coord_check(config, corpus, alpha_in)
                if config.coord_steps > 0 and complete else [])
  if math.isnan(base_lr) and log.rows:
    base_lr, alpha_in = proxy_optimum(log.rows)  # the proxy's best so far, for the report
  return SweepResult(list(log.rows), base_lr, alpha_in, coord_rows)


def paired_seeds(sweep: list[dict]) -> dict[float, list[int]]:
  """Per density, the seeds trained at every LR by every parameterization trained there.

  The tables compare parameterizations at a density over these seeds only: in a partial
  sweep one parameterization can be a seed ahead of another, and no gap may mix seed sets.

  Raises:
    ValueError: no seed is trained by every parameterization at some density.
  """
  lrs = {r["lr"] for r in sweep}
  got = {}
  for r in sweep:
    got.setdefault(r["density"], {}).setdefault(r["parameterization"], {}).setdefault(
        r["seed"], set()).add(r["lr"])
  paired = {}
  for density, cells in got.items():
    complete = [{seed for seed, seed_lrs in seeds.items() if seed_lrs == lrs}
                for seeds in cells.values()]
    paired[density] = sorted(set.intersection(*complete))
    if not paired[density]:
      raise ValueError(f"density {_density_label(density)}: no seed is trained at every LR by "
                       f"every parameterization ({', '.join(sorted(cells))}); nothing to compare")
  return paired


def paired_rows(rows: list[dict]) -> list[dict]:
  """``rows`` less the sweep runs of seeds that ``paired_seeds`` leaves out (proxy rows stay)."""
  sweep = [r for r in rows if r["stage"] == "sweep"]
  paired = paired_seeds(sweep) if sweep else {}
  return [r for r in rows if r["stage"] != "sweep" or r["seed"] in paired[r["density"]]]


def optimum_table(rows: list[dict]) -> list[dict]:
  """Per (parameterization, density) of the sweep: the optimal LR and the losses.

  At each density only the seeds of ``paired_seeds`` count.

  Returns:
    Rows ``{parameterization, density, best_step, best_lr, at_edge, best_loss,
    base_loss, drift, seeds, spread, best_by_seed, base_by_seed, left_out}``: the
    optimum's grid step ``log2(lr / base_lr)``, whether it lies on the grid's
    edge (the true optimum may be beyond), the mean val loss there and at the
    base LR (step 0, the transferred hyperparameters; NaN if step 0 is not in
    the grid), ``drift`` = best step minus the best step at the highest
    density, the seeds compared and their range (max - min) of val loss at the
    optimum, ``{seed: val loss}`` at the optimum and at the base LR, and the
    seeds trained but left out (not yet paired).
  """
  sweep = [r for r in rows if r["stage"] == "sweep"]
  steps = {r["lr"]: r["lr_step"] for r in sweep}
  base_lr = next((lr for lr, k in steps.items() if k == 0), None)
  edges = (min(steps.values()), max(steps.values()))
  kept = paired_rows(sweep)
  curves, seed_losses = _curves(kept), _seed_losses(kept)
  table = []
  for name in dict.fromkeys(r["parameterization"] for r in sweep):
    own = sorted(((key, curve) for key, curve in curves.items() if key[1] == name),
                 key=lambda item: -item[0][3])  # densest first
    reference = steps[_argmin(own[0][1], (name, own[0][0][3]))]
    for key, curve in own:
      best, density = _argmin(curve, (name, key[3])), key[3]
      at_best = seed_losses[key][best]  # a paired seed has every LR, diverged or not
      trained = {r["seed"] for r in sweep if (r["parameterization"], r["density"]) == (name,
                                                                                      density)}
      table.append(dict(parameterization=name, density=density, best_step=steps[best],
                        best_lr=best, at_edge=steps[best] in edges, best_loss=curve[best],
                        base_loss=curve.get(base_lr, math.nan),
                        drift=steps[best] - reference, seeds=sorted(at_best),
                        spread=max(at_best.values()) - min(at_best.values()),
                        best_by_seed=at_best, base_by_seed=seed_losses[key].get(base_lr, {}),
                        left_out=sorted(trained - at_best.keys())))
  return table


def _paired_gap(minuend: dict[int, float], subtrahend: dict[int, float]) -> dict[int, float]:
  """``{s: minuend[s] - subtrahend[s]}`` for every seed ``s`` in both, in seed order."""
  return {s: minuend[s] - subtrahend[s] for s in sorted(minuend.keys() & subtrahend.keys())}


def outcome(table: list[dict]) -> dict:
  """The headline numbers: optimum drift per parameterization, gaps at the sparsest density.

  Returns:
    ``{"drift": {name: (min drift, max drift)}, "sparsest": density, "seeds": [...],
    "loss": {name: {"best": ..., "base": ..., "best_by_seed": {seed: ...},
    "base_by_seed": {seed: ...}}}}`` at the sparsest density, over its paired seeds.
  """
  sparsest = min(r["density"] for r in table)
  at_sparsest = [r for r in table if r["density"] == sparsest]
  return dict(
      drift={r["parameterization"]: (min(q["drift"] for q in table
                                         if q["parameterization"] == r["parameterization"]),
                                     max(q["drift"] for q in table
                                         if q["parameterization"] == r["parameterization"]))
             for r in table},
      sparsest=sparsest, seeds=at_sparsest[0]["seeds"],
      loss={r["parameterization"]: dict(best=r["best_loss"], base=r["base_loss"],
                                        best_by_seed=r["best_by_seed"],
                                        base_by_seed=r["base_by_seed"]) for r in at_sparsest})


def markdown_tables(table: list[dict]) -> str:
  """Optimal LR step and val losses per density (rows) and parameterization (columns).

  A partial sweep leaves cells it has not trained as "—", and says which trained
  seeds it leaves out of the comparison.
  """
  names = list(dict.fromkeys(r["parameterization"] for r in table))
  cell = {(r["parameterization"], r["density"]): r for r in table}
  densities = sorted({r["density"] for r in table}, reverse=True)
  head = "| density | " + " | ".join(NAMES[n] for n in names) + " | seeds |"
  rule = "|---|" + "---:|" * len(names) + "---|"

  def rows(text):
    return [f"| {_density_label(d)} | " + " | ".join(
        text(cell[n, d]) if (n, d) in cell else "—" for n in names)
        + f" | {', '.join(map(str, next(r['seeds'] for r in table if r['density'] == d)))} |"
        for d in densities]

  left_out = [f"{NAMES[r['parameterization']]} at {_density_label(r['density'])}: seed"
              f"{'s' if len(r['left_out']) > 1 else ''} {', '.join(map(str, r['left_out']))}"
              for r in table if r["left_out"]]
  note = ([f"Trained but left out until every parameterization at that density has them: "
           f"{'; '.join(left_out)}.", ""] if left_out else [])
  return "\n".join([
      "Optimal LR: grid step log2(LR / base LR) (0 is the proxy's optimum), its LR; * on the "
      "grid's edge. At each density the seeds column lists the seeds that every "
      "parameterization there has trained; only those count.", "", *note, head, rule,
      *rows(lambda c: f"{c['best_step']:+d}{'*' if c['at_edge'] else ''} ({c['best_lr']:.2e})"),
      "", "Validation loss (nats/byte, mean over the seeds): at the optimum / at the base LR "
      "(the proxy's LR, no re-tuning), and the gap between them.", "",
      head, rule,
      *rows(lambda c: f"{c['best_loss']:.4f} / {c['base_loss']:.4f} "
                      f"({c['base_loss'] - c['best_loss']:+.4f})"),
      "", "Seed range (max − min over seeds) of the validation loss at the optimum.", "",
      head, rule, *rows(lambda c: f"{c['spread']:.4f}"), *_gap_tables(table)])


def _gap_tables(table: list[dict]) -> list[str]:
  """Markdown lines: gaps paired by seed at every density, to SμPar and to the densest model.

  Each cell is ``mean ± sample std`` over the paired seeds (the mean alone for one seed).
  """
  names = list(dict.fromkeys(r["parameterization"] for r in table))
  cell = {(r["parameterization"], r["density"]): r for r in table}
  densities = sorted({r["density"] for r in table}, reverse=True)
  lines = []
  others = [n for n in names if n != "supar"]
  if "supar" in names and others:
    whats = (("base", "proxy's LR"), ("best", "own optimum"))
    lines += ["", "Gap to SμPar at every density, paired by seed (other − SμPar, nats/byte; "
              "% of the other's loss), at the proxy's LR and each at its own optimal LR.", "",
              "| density | " + " | ".join(f"{NAMES[n]}, {label}" for n in others
                                          for _, label in whats) + " | seeds |",
              "|---|" + "---:|" * (2 * len(others)) + "---|"]
    for d in densities:
      cells = []
      for n in others:
        for which, _ in whats:
          if (n, d) not in cell or ("supar", d) not in cell:
            cells.append("—")
            continue
          gap = list(_paired_gap(cell[n, d][f"{which}_by_seed"],
                                 cell["supar", d][f"{which}_by_seed"]).values())
          theirs = cell[n, d][f"{which}_loss"]  # the mean over the same paired seeds
          cells.append(f"{mean_std(gap, 4, '+')} ({100 * np.mean(gap) / theirs:.1f} %)"
                       if gap else "—")  # no gap at the proxy's LR if the grid lacks step 0
      seeds = next(r["seeds"] for r in table if r["density"] == d)
      lines.append(f"| {_density_label(d)} | " + " | ".join(cells)
                   + f" | {', '.join(map(str, seeds))} |")
  if len(densities) < 2:
    return lines
  densest = densities[0]
  lines += ["", f"Loss vs density: each at its own optimal LR, minus the same "
            f"parameterization's at density {_density_label(densest)}, paired by seed "
            "(nats/byte; the seeds in parentheses).", "",
            "| density | " + " | ".join(NAMES[n] for n in names) + " |",
            "|---|" + "---:|" * len(names)]
  for d in densities[1:]:
    cells = []
    for n in names:
      if (n, d) not in cell or (n, densest) not in cell:
        cells.append("—")
        continue
      gap = _paired_gap(cell[n, d]["best_by_seed"], cell[n, densest]["best_by_seed"])
      cells.append(f"{mean_std(list(gap.values()), 4, '+')} ({', '.join(map(str, gap))})"
                   if gap else "—")
    lines.append(f"| {_density_label(d)} | " + " | ".join(cells) + " |")
  return lines


def outcome_lines(table: list[dict]) -> list[str]:
  """Plain sentences with the measured drift and loss gaps (paired by seed)."""
  o = outcome(table)
  lines = [f"- {NAMES[n]}: the optimal LR moves by {lo:+d} to {hi:+d} grid steps (factors of 2) "
           "from the densest model's." for n, (lo, hi) in o["drift"].items()]
  sparsest, seeds = _density_label(o["sparsest"]), ", ".join(map(str, o["seeds"]))
  for n, loss in o["loss"].items():
    gap = loss["base"] - loss["best"]
    lines.append(f"- {NAMES[n]}, density {sparsest}: the proxy's LR "
                 f"(step 0) costs {gap:.4f} nats/byte ({100 * gap / loss['best']:.1f} %) over "
                 f"its own optimal LR ({loss['base']:.4f} vs {loss['best']:.4f}).")
  if "supar" in o["loss"]:
    ours = o["loss"]["supar"]
    for n in (n for n in o["loss"] if n != "supar"):
      for which, label in (("base", "at the base LR (no re-tuning)"),
                           ("best", "each at its own optimal LR")):
        theirs = o["loss"][n][which]
        per_seed = list(_paired_gap(o["loss"][n][f"{which}_by_seed"],
                                    ours[f"{which}_by_seed"]).values())
        gap = theirs - ours[which]
        paired = (f" ({NAMES[n]} − SμPar per seed: {mean_std(per_seed, 4, '+')}, seeds {seeds})"
                  if len(per_seed) > 1 else "")
        lines.append(f"- Density {sparsest}, {label}: SμPar "
                     f"{ours[which]:.4f}, {NAMES[n]} {theirs:.4f} nats/byte; SμPar is "
                     f"{abs(gap):.4f} ({100 * abs(gap) / theirs:.1f} %) "
                     f"{'lower' if gap > 0 else 'higher'}{paired}.")
  return lines


def plot_lr_sweep(rows: list[dict], base_lr: float):
  """Val loss vs log2(LR / base LR): one panel per parameterization, one curve per density.

  A last panel shows the proxy, one curve per ``alpha_in``. Curves are means
  over seeds, bands span the seeds' min to max (diverged seeds left out),
  and stars mark each curve's optimum.

  Returns:
    A ``matplotlib.figure.Figure`` (no pyplot state, so it suits scripts and notebooks).
  """
  from matplotlib.figure import Figure

  curves, seed_losses = _curves(rows), _seed_losses(rows)
  panels = list(dict.fromkeys((stage, name) for stage, name, _, _ in curves))
  panels.sort(key=lambda panel: panel[0] == "proxy")  # the proxy last
  fig = Figure(figsize=(4.2 * len(panels), 3.8))
  axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
  finite = [v for curve in curves.values() for v in curve.values() if np.isfinite(v)]
  for ax, (stage, name) in zip(axes, panels):
    # Sweep panels: densest first; proxy panel: one curve per alpha_in.
    own = sorted((key for key in curves if key[:2] == (stage, name)),
                 key=lambda key: (-key[3], key[2]))
    for i, key in enumerate(own):
      curve, color = curves[key], _color(i, len(own))
      label = (f"density {_density_label(key[3])}" if stage == "sweep"
               else f"α_in = {key[2]:g}")
      x = [math.log2(lr / base_lr) for lr in curve]
      ax.plot(x, list(curve.values()), marker="o", ms=3, color=color, label=label)
      finite_seeds = [[v for v in seeds.values() if np.isfinite(v)]
                      for seeds in seed_losses[key].values()]
      ax.fill_between(x, [min(v, default=math.nan) for v in finite_seeds],
                      [max(v, default=math.nan) for v in finite_seeds], color=color, alpha=0.2,
                      lw=0)
      best = _argmin(curve, key)
      ax.plot(math.log2(best / base_lr), curve[best], marker="*", ms=14, color=color,
              markeredgecolor="k")
    width = next(r["width"] for r in rows if (r["stage"], r["parameterization"]) == (stage, name))
    title = NAMES[name] if stage == "sweep" else "dense μP proxy"
    ax.set(title=f"{title} (width {width})", xlabel=f"log2(LR / {base_lr:.2e})")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7)
  # Zoom on the basins: diverged or barely-trained runs would flatten them.
  axes[0].set(ylabel="final val loss (nats/byte), band: seeds",
              ylim=(min(finite) - 0.05, min(max(finite), min(finite) + 1.0) + 0.05))
  fig.tight_layout()
  return fig


def _color(i: int, n: int):
  """The ``i``-th of ``n`` viridis colours (dense = dark, sparsest = light)."""
  import matplotlib
  return matplotlib.colormaps["viridis"](0.9 * i / max(1, n - 1))


def plot_best_vs_density(table: list[dict]):
  """Best val loss (solid) and val loss at the base LR (dashed) vs log2 density; a Figure."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5.5, 3.8))
  ax = fig.subplots()
  for i, name in enumerate(dict.fromkeys(r["parameterization"] for r in table)):
    own = sorted((r for r in table if r["parameterization"] == name), key=lambda r: r["density"])
    x = [math.log2(r["density"]) for r in own]
    ax.plot(x, [r["best_loss"] for r in own], marker="o", color=f"C{i}",
            label=f"{NAMES[name]} at its optimal LR")
    ax.plot(x, [r["base_loss"] for r in own], marker="x", ls="--", color=f"C{i}",
            label=f"{NAMES[name]} at the base LR")
  ax.set(xlabel="log2 density", ylabel="final val loss (nats/byte)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def _base(rows: list[dict]) -> tuple[float, float]:
  """``(base_lr, alpha_in)`` of runs.csv rows: a sweep row's, else the proxy's best so far."""
  row = next((r for r in rows if r["stage"] == "sweep"), None)
  if row is None:
    return proxy_optimum(rows)
  return row["lr"] / 2.0 ** row["lr_step"], row["alpha_in"]


def load_result(out_dir: pathlib.Path) -> SweepResult:
  """A ``SweepResult`` from ``runs.csv`` (and ``coord_check.csv`` if present) in ``out_dir``.

  A partial sweep loads too; without sweep rows the base LR is the proxy's best so far.
  """
  rows = read_csv(out_dir / "runs.csv")
  coord = out_dir / "coord_check.csv"
  return SweepResult(rows, *_base(rows), read_csv(coord) if coord.exists() else [])


def _compute_lines(rows: list[dict]) -> list[str]:
  """Where and how long the runs trained, from runs.csv's timing columns (if it has them)."""
  if not rows or "seconds" not in rows[0]:
    return []
  calls = groups.timed_calls(rows, lambda width: 1.0)
  devices = ", ".join(f"{d} ({n} runs)" for d, n in
                      Counter(r["device"] for r in rows).items())
  train, build = (sum(c.seconds for c in calls), sum(c.compile_seconds for c in calls))
  return [f"- Compute: {len(calls)} vmapped calls trained for {train:.0f} s and were built and "
          f"compiled in {build:.0f} s (each call but a stage's first while the previous one "
          f"trained), on {devices}"]


def write_outputs(result: SweepResult, config: Config, out_dir: pathlib.Path, command: str,
                  seconds: float | None) -> str:
  """Writes runs.csv, the plots, the coordinate check and sweep.md; returns sweep.md's text.

  ``seconds``: this command's wall time (``None``: a report redrawn from runs.csv).
  A partial sweep gets the tables and plots of what it has, and a line
  counting the runs still to train for ``config``.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  write_csv(result.rows, out_dir / "runs.csv")
  has_sweep = any(r["stage"] == "sweep" for r in result.rows)
  table = optimum_table(result.rows) if has_sweep else []
  # The plot shows what the tables compare.
  plot_lr_sweep(paired_rows(result.rows), result.base_lr).savefig(out_dir / "lr_sweep.png",
                                                                  dpi=120)
  if table:
    plot_best_vs_density(table).savefig(out_dir / "best_vs_density.png", dpi=120)
  # Counted for resumable runs.csv files only: older ones keyed the proxy's LRs otherwise.
  resumable = set(result.rows[0]) == set(groups.COLUMNS)
  pending = pending_runs(config, result.rows, result.alpha_in) if resumable else 0
  status = ([f"- **Partial**: {pending} runs of this config still to train (rerun the command "
             "to resume)."] if pending else [])
  outcome_text = ([*outcome_lines(table), "", markdown_tables(table), "",
                   "![validation loss vs LR](lr_sweep.png)", "",
                   "![best loss vs density](best_vs_density.png)"] if table
                  else ["No sweep runs yet.", "", "![validation loss vs LR](lr_sweep.png)"])
  coord = []
  if result.coord_rows:
    write_csv(result.coord_rows, out_dir / "coord_check.csv")
    coord_output.plot(result.coord_rows, out_dir / "coord_check.png")
    drift = supar.coord_check_drift(result.coord_rows, width=config.width,
                                    density=max(config.densities),
                                    steps=range(1, config.coord_steps + 1))
    coord = ["", f"Coordinate check ({config.coord_steps} Adam steps at lr {config.coord_lr:g}, "
             f"{config.coord_seeds} seeds): worst ratio of any layer's mean |output| to the "
             "dense model's: " + ", ".join(f"{NAMES[n]} {v:.2f}" for n, v in drift.items()) + ".",
             "", "![coordinate check](coord_check.png)"]
  proxy = [f"- Base LR {result.base_lr:.3e} and α_in {result.alpha_in:g}"
           + (f": the best of the dense μP proxy (width {config.base_width}) over LR 2^k, k in "
              f"{list(config.proxy_log2_lrs)}, and α_in in {list(config.proxy_alpha_in)}."
              if config.base_lr <= 0 else " (given).")]
  text = "\n".join([
      "# SμPar transfer across sparsity: measured", "",
      f"- Command: `{command}`",
      f"- Config: {dataclasses.asdict(config)}",
      f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
      + (f"; run time {seconds:.0f} s" if seconds is not None else "; redrawn from runs.csv"),
      # A redraw's machine is not the one that trained: the compute line names that.
      f"- {'Machine' if seconds is not None else 'Redrawn on'}: {jax.devices()[0].platform}, "
      f"{len(os.sched_getaffinity(0))} CPU cores; "
      f"jax {jax.__version__}, Python {sys.version.split()[0]}",
      *_compute_lines(result.rows), *status, *proxy, "", *outcome_text, *coord, ""])
  (out_dir / "sweep.md").write_text(text)
  return text


def define_flags() -> None:
  """Flags of the script: one per ``Config`` field, plus ``output_dir``."""
  config_flags.define_flags(Config)
  flags.DEFINE_string("output_dir", "runs/supar_transfer", "where the CSVs, PNGs and sweep.md go")
  flags.DEFINE_boolean("report_only", False, "train nothing: redraw the plots and sweep.md from "
                       "output_dir/runs.csv (pass the sweep's own flags for the pending count)")


def main(argv):
  del argv
  config = config_flags.config_from_flags(Config)
  out_dir = pathlib.Path(flags.FLAGS.output_dir)
  start = time.time()
  result = load_result(out_dir) if flags.FLAGS.report_only else run(config, out_dir)
  if not result.rows:
    raise SystemExit("no runs trained yet (the time budget allowed none)")
  command = "python -m experiments.supar.sweep " + " ".join(sys.argv[1:])
  print(write_outputs(result, config, out_dir, command.strip(),
                      None if flags.FLAGS.report_only else time.time() - start))


if __name__ == "__main__":
  define_flags()
  app.run(main)
