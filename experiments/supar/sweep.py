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

Outputs in ``--output_dir``: ``runs.csv`` (every run), ``lr_sweep.png``
(validation loss vs LR, one panel per parameterization, one curve per
density, optimum starred), ``best_vs_density.png``, ``coord_check.csv`` and
``coord_check.png``, and ``sweep.md`` (command, machine, run time, optimum
table and the measured drift and loss gaps).
"""

from __future__ import annotations

import csv
import dataclasses
import fractions
import math
import os
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from tqdm.auto import tqdm

import sparsejax as sj
from ..common import config_flags
from ..common.byte_lm import ByteLM, LinearFactory, dense_linear
from ..common.config_flags import field
from . import coord_check
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

  def __post_init__(self):
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


def _cross_entropy(graphdef, params, rest, inputs, targets):
  logits = nnx.merge(graphdef, params, rest)(inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


class _Trainer:
  """One compiled train step and evaluation for one (parameterization, density)."""

  def __init__(self, graphdef, tx: optax.GradientTransformation, config: Config):
    self.tx, self.config = tx, config
    loss_fn = lambda params, rest, inputs, targets: _cross_entropy(graphdef, params, rest,
                                                                   inputs, targets)

    @jax.jit
    def step(params, opt_state, rest, data, key, t, lr):
      inputs, targets = sample_windows(data, jax.random.fold_in(key, t), config.batch,
                                       config.context)
      loss, grads = jax.value_and_grad(loss_fn)(params, rest, inputs, targets)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
      return params, opt_state, loss

    self.step, self.evaluate = step, jax.jit(loss_fn)

  def train(self, params, rest, lr: float, train: jax.Array, val_windows, key: jax.Array
            ) -> tuple[float, float]:
    """Trains from ``params``; returns (final train loss, val loss), NaN once diverged.

    The train loss is the mean of the last 10 % of steps.
    """
    opt_state, losses = self.tx.init(params), []
    lr = jnp.float32(lr)
    for t in range(self.config.steps):
      params, opt_state, loss = self.step(params, opt_state, rest, train, key, t, lr)
      losses.append(loss)
      if (t + 1) % 50 == 0 and not np.isfinite(float(loss)):
        return math.nan, math.nan  # diverged: no need to finish
    tail = float(jnp.mean(jnp.stack(losses[-max(1, self.config.steps // 10):])))
    val = float(self.evaluate(params, rest, *val_windows))
    return (tail, val) if np.isfinite(tail) and np.isfinite(val) else (math.nan, math.nan)


def _root_keys(config: Config) -> tuple[jax.Array, jax.Array]:
  """``(sweep key, coordinate-check key)``."""
  sweep_key, coord_key = jax.random.split(jax.random.key(config.seed))
  return sweep_key, coord_key


def _seed_keys(config: Config, seed: int) -> tuple[jax.Array, jax.Array]:
  """``(model key, data key)`` of a seed: the same for every LR and parameterization."""
  model_key, data_key = jax.random.split(jax.random.fold_in(_root_keys(config)[0], seed))
  return model_key, data_key


def _grid(config: Config, p: sj.SuPar, density: float, lrs, corpus, bar, stage: str
          ) -> list[dict]:
  """Every seed x LR at one (parameterization, density); one compiled step for all.

  Arguments:
    config: the sweep (model size, steps, seeds, validation windows).
    p: the parameterization at the width to train.
    density: hidden density.
    lrs: base learning rates (the step scales them by the LR multipliers).
    corpus: train and validation bytes.
    bar: a tqdm bar, advanced once per run.
    stage: ``"proxy"`` or ``"sweep"``, recorded in the rows.

  Returns:
    One row per run: ``{stage, parameterization, width, alpha_in, density,
    layer, lr, seed, train_loss, val_loss}`` (NaN losses once diverged).
  """
  train, val = jnp.asarray(corpus.train), jnp.asarray(corpus.val)
  val_windows = sample_windows(val, jax.random.key(_VAL_KEY), config.val_batches * config.batch,
                               config.context)
  rows, trainer = [], None
  for seed in range(config.seeds):
    model_key, data_key = _seed_keys(config, seed)
    model, specs = build_model(config, p, density, key=model_key)
    graphdef, params, rest = split_model(model)
    if trainer is None:  # topologies differ by seed, shapes do not: compile once
      trainer = _Trainer(graphdef, make_optimizer(specs, p, config), config)
    for lr in lrs:
      train_loss, val_loss = trainer.train(params, rest, lr, train, val_windows, data_key)
      rows.append(dict(stage=stage, parameterization=p.parameterization, width=p.width,
                       alpha_in=p.alpha_in, density=density, layer=config.layer, lr=lr,
                       seed=seed, train_loss=train_loss, val_loss=val_loss))
      bar.update()
      bar.set_postfix(p=p.parameterization, density=f"{density:g}", lr=f"{lr:.2e}",
                      val=f"{val_loss:.3f}")
  return rows


def _curves(rows: list[dict]) -> dict[tuple, dict[float, float]]:
  """``{(stage, parameterization, alpha_in, density): {lr: mean val loss over seeds}}``.

  The mean is NaN where any seed diverged, which rules that LR out.
  """
  groups = {}
  for r in rows:
    curve = groups.setdefault((r["stage"], r["parameterization"], r["alpha_in"], r["density"]),
                              {})
    curve.setdefault(r["lr"], []).append(r["val_loss"])
  return {key: {lr: float(np.mean(v)) for lr, v in sorted(curve.items())}
          for key, curve in groups.items()}


def _argmin(curve: dict[float, float], what) -> float:
  """The LR of the lowest finite loss."""
  finite = {lr: loss for lr, loss in curve.items() if np.isfinite(loss)}
  if not finite:
    raise FloatingPointError(f"every LR diverged for {what}")
  return min(finite, key=finite.get)


class SweepResult(NamedTuple):
  """What ``run`` measured.

  Attributes:
    rows: one dict per run (``stage`` "proxy" or "sweep").
    base_lr, alpha_in: the proxy's best LR and input multiplier (or the
      ``Config``'s when ``base_lr`` is given).
    coord_rows: ``supar.coord_check`` rows (empty if skipped).
  """
  rows: list[dict]
  base_lr: float
  alpha_in: float
  coord_rows: list[dict]


def _parameterization(config: Config, name: str, width: int, alpha_in: float) -> sj.SuPar:
  return sj.SuPar(name, width=width, base_width=config.base_width, init_std=config.init_std,
                  alpha_in=alpha_in, alpha_out=config.alpha_out)


def tune_proxy(config: Config, corpus: ByteCorpus, *, progress: bool = True
               ) -> tuple[float, float, list[dict]]:
  """The dense μP proxy's best (LR, alpha_in) over ``proxy_log2_lrs x proxy_alpha_in``.

  Returns:
    ``(base_lr, alpha_in, rows)``.
  """
  lrs = [2.0 ** k for k in config.proxy_log2_lrs]
  total = len(lrs) * len(config.proxy_alpha_in) * config.seeds
  rows = []
  with tqdm(total=total, desc="proxy", disable=not progress) as bar:
    for alpha_in in config.proxy_alpha_in:
      p = _parameterization(config, "mup", config.base_width, alpha_in)
      rows += _grid(config, p, 1.0, lrs, corpus, bar, "proxy")
  curves = _curves(rows)
  best = {key: (lr := _argmin(curve, key), curve[lr]) for key, curve in curves.items()}
  key = min(best, key=lambda k: best[k][1])
  return best[key][0], key[2], rows


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

  data_key, model_key = jax.random.split(_root_keys(config)[1])
  batch = sample_windows(jnp.asarray(corpus.train), data_key, config.batch, config.context)
  base = _parameterization(config, "supar", config.base_width, alpha_in)
  return supar.coord_check(build, batch, base=base, parameterizations=config.parameterizations,
                           widths=(config.width,), densities=config.densities,
                           steps=config.coord_steps, learning_rate=config.coord_lr,
                           seeds=config.coord_seeds, key=model_key)


def run(config: Config, *, progress: bool = True) -> SweepResult:
  """Proxy tuning (unless ``config.base_lr``), the density x LR sweep and the coordinate check."""
  corpus = stdlib_byte_corpus(max_train_bytes=config.train_bytes,
                              max_val_bytes=config.val_bytes)
  rows = []
  if config.base_lr > 0:
    base_lr, alpha_in = config.base_lr, config.alpha_in
  else:
    base_lr, alpha_in, rows = tune_proxy(config, corpus, progress=progress)
  lrs = [base_lr * 2.0 ** k for k in config.lr_steps]
  total = len(config.parameterizations) * len(config.densities) * len(lrs) * config.seeds
  with tqdm(total=total, desc="sweep", disable=not progress) as bar:
    for name in config.parameterizations:
      p = _parameterization(config, name, config.width, alpha_in)
      for density in config.densities:
        rows += _grid(config, p, density, lrs, corpus, bar, "sweep")
  for r in rows:
    r["lr_step"] = round(math.log2(r["lr"] / base_lr))
  coord_rows = gpt_coord_check(config, corpus, alpha_in) if config.coord_steps > 0 else []
  return SweepResult(rows, base_lr, alpha_in, coord_rows)


def optimum_table(rows: list[dict]) -> list[dict]:
  """Per (parameterization, density) of the sweep: the optimal LR and the losses.

  Returns:
    Rows ``{parameterization, density, best_step, best_lr, at_edge, best_loss,
    base_loss, drift}``: the optimum's grid step ``log2(lr / base_lr)``,
    whether it lies on the grid's edge (the true optimum may be beyond),
    the mean val loss there and at the base LR (step 0, the transferred
    hyperparameters; NaN if step 0 is not in the grid), and ``drift`` = best
    step minus the best step at the highest density.
  """
  sweep = [r for r in rows if r["stage"] == "sweep"]
  steps = {r["lr"]: r["lr_step"] for r in sweep}
  base_lr = next((lr for lr, k in steps.items() if k == 0), None)
  edges = (min(steps.values()), max(steps.values()))
  curves = _curves(sweep)
  table = []
  for name in dict.fromkeys(r["parameterization"] for r in sweep):
    own = sorted(((key[3], curve) for key, curve in curves.items() if key[1] == name),
                 key=lambda item: -item[0])  # densest first
    reference = steps[_argmin(own[0][1], (name, own[0][0]))]
    for density, curve in own:
      best = _argmin(curve, (name, density))
      table.append(dict(parameterization=name, density=density, best_step=steps[best],
                        best_lr=best, at_edge=steps[best] in edges, best_loss=curve[best],
                        base_loss=curve.get(base_lr, math.nan),
                        drift=steps[best] - reference))
  return table


def outcome(table: list[dict]) -> dict:
  """The headline numbers: optimum drift per parameterization, gaps at the sparsest density.

  Returns:
    ``{"drift": {name: (min drift, max drift)}, "sparsest": density,
    "loss": {name: {"best": ..., "base": ...}}}`` at the sparsest density.
  """
  sparsest = min(r["density"] for r in table)
  return dict(
      drift={r["parameterization"]: (min(q["drift"] for q in table
                                         if q["parameterization"] == r["parameterization"]),
                                     max(q["drift"] for q in table
                                         if q["parameterization"] == r["parameterization"]))
             for r in table},
      sparsest=sparsest,
      loss={r["parameterization"]: {"best": r["best_loss"], "base": r["base_loss"]}
            for r in table if r["density"] == sparsest})


def markdown_tables(table: list[dict]) -> str:
  """Optimal LR step and val loss per density (rows) and parameterization (columns)."""
  names = list(dict.fromkeys(r["parameterization"] for r in table))
  cell = {(r["parameterization"], r["density"]): r for r in table}
  densities = sorted({r["density"] for r in table}, reverse=True)
  head = "| density | " + " | ".join(NAMES[n] for n in names) + " |"
  rule = "|---|" + "---:|" * len(names)
  lines = ["Optimal LR: grid step log2(LR / base LR), its LR; * on the grid's edge.", "",
           head, rule]
  for d in densities:
    lines.append(f"| {_density_label(d)} | " + " | ".join(
        f"{cell[n, d]['best_step']:+d}{'*' if cell[n, d]['at_edge'] else ''} "
        f"({cell[n, d]['best_lr']:.2e})" for n in names) + " |")
  lines += ["", "Validation loss (nats/byte, mean over seeds): at the optimum / at the base "
            "LR.", "", head, rule]
  for d in densities:
    lines.append(f"| {_density_label(d)} | " + " | ".join(
        f"{cell[n, d]['best_loss']:.4f} / {cell[n, d]['base_loss']:.4f}" for n in names) + " |")
  return "\n".join(lines)


def outcome_lines(table: list[dict]) -> list[str]:
  """Plain sentences with the measured drift and loss gaps."""
  o = outcome(table)
  lines = [f"- {NAMES[n]}: the optimal LR moves by {lo:+d} to {hi:+d} grid steps (factors of 2) "
           "from the densest model's." for n, (lo, hi) in o["drift"].items()]
  if "supar" in o["loss"]:
    ours = o["loss"]["supar"]
    for n in (n for n in o["loss"] if n != "supar"):
      for which, label in (("base", "at the base LR (no re-tuning)"),
                           ("best", "each at its own optimal LR")):
        theirs = o["loss"][n][which]
        gap = theirs - ours[which]
        lines.append(f"- Density {_density_label(o['sparsest'])}, {label}: SμPar "
                     f"{ours[which]:.4f}, {NAMES[n]} {theirs:.4f} nats/byte; SμPar is "
                     f"{abs(gap):.4f} ({100 * abs(gap) / theirs:.1f} %) "
                     f"{'lower' if gap > 0 else 'higher'}.")
  return lines


def plot_lr_sweep(rows: list[dict], base_lr: float):
  """Val loss vs log2(LR / base LR): one panel per parameterization, one curve per density.

  A last panel shows the proxy, one curve per ``alpha_in``. Stars mark each
  curve's optimum.

  Returns:
    A ``matplotlib.figure.Figure`` (no pyplot state, so it suits scripts and notebooks).
  """
  from matplotlib.figure import Figure

  curves = _curves(rows)
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
      ax.plot([math.log2(lr / base_lr) for lr in curve], list(curve.values()), marker="o",
              ms=3, color=color, label=label)
      best = _argmin(curve, key)
      ax.plot(math.log2(best / base_lr), curve[best], marker="*", ms=14, color=color,
              markeredgecolor="k")
    width = next(r["width"] for r in rows if (r["stage"], r["parameterization"]) == (stage, name))
    title = NAMES[name] if stage == "sweep" else "dense μP proxy"
    ax.set(title=f"{title} (width {width})", xlabel=f"log2(LR / {base_lr:.2e})")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7)
  # Zoom on the basins: diverged or barely-trained runs would flatten them.
  axes[0].set(ylabel="final val loss (nats/byte)",
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


def read_csv(path: pathlib.Path) -> list[dict]:
  """Rows of a CSV written by ``write_outputs``, with numbers parsed (``nan`` included)."""
  def parse(value: str):
    for kind in (int, float):
      try:
        return kind(value)
      except ValueError:
        pass
    return value

  with open(path, newline="") as f:
    return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_result(out_dir: pathlib.Path) -> SweepResult:
  """A ``SweepResult`` from ``runs.csv`` (and ``coord_check.csv`` if present) in ``out_dir``."""
  rows = read_csv(out_dir / "runs.csv")
  base_lr = rows[0]["lr"] / 2.0 ** rows[0]["lr_step"]
  alpha_in = next(r["alpha_in"] for r in rows if r["stage"] == "sweep")
  coord = out_dir / "coord_check.csv"
  return SweepResult(rows, base_lr, alpha_in, read_csv(coord) if coord.exists() else [])


def write_outputs(result: SweepResult, config: Config, out_dir: pathlib.Path, command: str,
                  seconds: float) -> str:
  """Writes runs.csv, the plots, the coordinate check and sweep.md; returns sweep.md's text."""
  out_dir.mkdir(parents=True, exist_ok=True)
  coord_check.write_csv(result.rows, out_dir / "runs.csv")
  table = optimum_table(result.rows)
  plot_lr_sweep(result.rows, result.base_lr).savefig(out_dir / "lr_sweep.png", dpi=120)
  plot_best_vs_density(table).savefig(out_dir / "best_vs_density.png", dpi=120)
  coord = []
  if result.coord_rows:
    coord_check.write_csv(result.coord_rows, out_dir / "coord_check.csv")
    coord_check.plot(result.coord_rows, out_dir / "coord_check.png")
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
      f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; run time {seconds:.0f} s",
      f"- Machine: {jax.devices()[0].platform}, {len(os.sched_getaffinity(0))} CPU cores; "
      f"jax {jax.__version__}, Python {sys.version.split()[0]}",
      *proxy, "", *outcome_lines(table), "", markdown_tables(table), "",
      "![validation loss vs LR](lr_sweep.png)", "", "![best loss vs density](best_vs_density.png)",
      *coord, ""])
  (out_dir / "sweep.md").write_text(text)
  return text


def define_flags() -> None:
  """Flags of the script: one per ``Config`` field, plus ``output_dir``."""
  config_flags.define_flags(Config)
  flags.DEFINE_string("output_dir", "runs/supar_transfer", "where the CSVs, PNGs and sweep.md go")


def main(argv):
  del argv
  config = config_flags.config_from_flags(Config)
  start = time.time()
  result = run(config)
  command = "python -m experiments.supar.sweep " + " ".join(sys.argv[1:])
  print(write_outputs(result, config, pathlib.Path(flags.FLAGS.output_dir), command.strip(),
                      time.time() - start))


if __name__ == "__main__":
  define_flags()
  app.run(main)
