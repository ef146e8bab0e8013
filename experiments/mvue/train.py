"""Training with N:M-pruned neural gradients: dense vs MVUE vs greedy.

``python -m experiments.mvue.train`` trains the byte-level GPT of
``experiments.common.byte_lm`` on the Python standard library's sources
(``sparsejax.data.stdlib_byte_corpus``) once per method and seed:

  dense, mvue 1:2, mvue 2:4, mvue_approx 2:4, greedy 1:2, greedy 2:4

with the same seeds, data and steps. Every linear layer (attention, MLP, head)
is wrapped in ``sparsejax.nn.PrunedGrad``: by default its weight gradient
``dW = X^T dY`` (the paper's "update" GEMM) uses dY pruned N:M along the token
axis, its contraction axis, while ``dX = dY W^T`` uses the dense dY
(``--prune=weight``); ``--prune=output`` prunes dY along the tokens for both.

Runs are resumable: each finished (method, seed) appends its final row to
``runs.csv`` and its curve to ``curves.csv`` in ``--output_dir``; a rerun of
the same configuration skips the pairs already there. One seed of every method
runs first, then the next seed; ``--time_budget_s`` skips a run that would not
finish in time. With ``--variance_steps``, the first dense run also measures,
at those steps, the variance that each pruning adds to the real dY of every
layer, against its formula (``experiments.mvue.variance``), into
``variance.csv``. ``RESULTS.md`` and ``curves.png`` are rendered from the CSVs
alone (``python -m experiments.mvue.report DIR`` re-renders them).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

import sparsejax as sj
from ..common import config_flags
from ..common.byte_lm import ByteLM
from ..common.config_flags import field
from ..common.progress import Progress
from . import report
from .variance import empirical_variance, formula_variance
from sparsejax.data import sample_windows, stdlib_byte_corpus

METHODS = ("dense", "mvue:1:2", "mvue:2:4", "mvue_approx:2:4", "greedy:1:2", "greedy:2:4")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on: one absl flag per field, with the help shown here."""
  # The model.
  width: int = field(128, "model width d", at_least=1)
  depth: int = field(2, "transformer blocks", at_least=1)
  heads: int = field(4, "attention heads", at_least=1)
  context: int = field(64, "context length in bytes", at_least=2)
  dtype: str = field("float32", "compute dtype of the linear layers and attention (parameters, "
                     "norms and the loss stay float32)", choices=("float32", "bfloat16"))

  # Training.
  batch: int = field(32, "windows per step", at_least=1)
  steps: int = field(300, "AdamW steps", at_least=1)
  learning_rate: float = field(3e-3, "peak learning rate (linear warm-up, cosine decay to 0)",
                               above=0)
  warmup: int = field(30, "warm-up steps", at_least=0)
  prune: str = field("weight", "'weight': only dW = X^T dY sees the pruned dY; 'output': dY "
                     "itself, for dW and dX", choices=("weight", "output"))

  # Data and logging.
  train_bytes: int = field(4_000_000, "bytes of the training split of the stdlib corpus",
                           at_least=1)
  val_bytes: int = field(400_000, "bytes of its validation split", at_least=1)
  val_batches: int = field(8, "fixed validation batches per evaluation", at_least=1)
  log_every: int = field(25, "evaluate and log every this many steps (steps run in jitted "
                         "chunks of this length)", at_least=1)
  seeds: int = field(1, "seeds per method", at_least=1)

  # Variance of the pruned gradients (first dense run only).
  variance_steps: tuple = field((), "steps of the first dense run (0: at initialisation; "
                                "others multiples of log_every) where the pruning variance of "
                                "every layer's dY is measured", parse=int, at_least=0)
  variance_draws: int = field(64, "prunings (keys) averaged per variance measurement",
                              at_least=2)


def config_id(config: Config) -> str:
  """Short hash of what the results depend on (not ``seeds``: more seeds extend a run)."""
  fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "seeds"}
  return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def parse_method(method: str) -> str:
  """Validates a method name (``dense`` or ``name:n:m``) against ``sparsejax.nm_prune``."""
  if method == "dense":
    return method
  parts = method.split(":")
  if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
    raise ValueError(f"method must be 'dense' or 'name:n:m' (e.g. mvue:2:4), got {method!r}")
  sj.nm_prune(jnp.ones((int(parts[2]),)), key=jax.random.key(0), n=int(parts[1]), m=int(parts[2]),
              method=parts[0])  # raises for unsupported combinations
  return method


class Probe(nnx.Variable):
  """A zero added to a dense layer's output; its gradient is the layer's dY."""


class ProbedLinear(nnx.Module):
  """``nnx.Linear`` plus a ``Probe`` (a scalar 0 in training, dY's shape when capturing)."""

  def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs):
    self.layer = nnx.Linear(in_features, out_features, dtype=dtype, rngs=rngs)
    self.probe = Probe(jnp.zeros((), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.layer(x) + self.probe[...]


def _linear_factory(method: str, prune: str, dtype):
  """The ``linear(in, out, rngs)`` factory for a method name like ``"mvue:2:4"``."""
  if method == "dense":
    return lambda i, o, rngs: ProbedLinear(i, o, dtype=dtype, rngs=rngs)
  name, n, m = method.split(":")

  def linear(in_features, out_features, rngs):
    return sj.nn.PrunedGrad(nnx.Linear(in_features, out_features, dtype=dtype, rngs=rngs),
                            n=int(n), m=int(m), method=name,
                            weight_grad_only=prune == "weight", rngs=rngs)

  return linear


def build_model(config: Config, method: str, seed: int) -> ByteLM:
  model_key = jax.random.split(jax.random.key(seed))[0]
  return ByteLM(width=config.width, depth=config.depth, heads=config.heads,
                context=config.context,
                linear=_linear_factory(method, config.prune, jnp.dtype(config.dtype)),
                rngs=nnx.Rngs(params=model_key, grad_prune=jax.random.fold_in(model_key, 1)))


def count_parameters(config: Config) -> int:
  """Trainable parameters of the model (the same for every method)."""
  shapes = nnx.eval_shape(lambda: build_model(config, "dense", 0))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(shapes, nnx.Param)))


def _loss(model, inputs, targets):
  logits = model(inputs).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


class Trainer:
  """The jitted chunk of ``log_every`` steps and the validation loss of one method.

  Built once per method and reused across seeds: the model's structure (graphdef)
  is the same for every seed, so each function compiles once.
  """

  def __init__(self, config: Config, method: str):
    self.config, self.method = config, method
    self.graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: build_model(config, method, 0)),
                                    nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup,
                                                  config.steps)
    self.tx = optax.adamw(schedule, weight_decay=0.01)
    self.chunk = jax.jit(self._chunk, static_argnames="length", donate_argnums=(0, 1, 2))
    self.val_loss = jax.jit(self._val_loss)

  def init(self, seed: int):
    """``(params, rest, opt_state)`` of a fresh model (rest: the pruning keys' counters)."""
    _, params, rest = nnx.split(build_model(self.config, self.method, seed), nnx.Param, ...)
    return params, rest, self.tx.init(params)

  def _chunk(self, params, rest, opt_state, data, data_key, start, *, length):
    """Steps ``start + 1 .. start + length``; returns the new state and their mean loss."""
    config = self.config

    def loss_fn(params, rest, inputs, targets):
      # copy: the key counters advance here, so they need Variables of this trace level.
      model = nnx.merge(self.graphdef, params, rest, copy=True)
      loss = _loss(model, inputs, targets)
      return loss, nnx.split(model, nnx.Param, ...)[2]  # the advanced key counters

    def step(carry, step_number):
      params, rest, opt_state = carry
      inputs, targets = sample_windows(data, jax.random.fold_in(data_key, step_number),
                                       config.batch, config.context)
      (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, inputs,
                                                                      targets)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), rest, opt_state), loss

    carry, losses = jax.lax.scan(step, (params, rest, opt_state),
                                 start + 1 + jnp.arange(length))
    return (*carry, losses.mean())

  def _val_loss(self, params, rest, data):
    # The same windows every time: val_batches x batch of them, in one forward pass.
    windows = sample_windows(data, jax.random.key(12345),
                             self.config.val_batches * self.config.batch, self.config.context)
    return _loss(nnx.merge(self.graphdef, params, rest), *windows)


@functools.cache
def _cached_trainer(config: Config, method: str) -> Trainer:
  return Trainer(config, method)


def trainer_for(config: Config, method: str) -> Trainer:
  """The ``Trainer`` of a method, shared by every seed count of a config (compiled once)."""
  return _cached_trainer(dataclasses.replace(config, seeds=1), method)


def capture_output_grads(trainer: Trainer, params, rest, inputs, targets) -> dict:
  """dY of every dense layer on one batch: ``{layer path: (tokens, out) float32}``."""
  model = nnx.merge(trainer.graphdef, params, rest)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, ProbedLinear):
      module.probe.set_value(jnp.zeros((*inputs.shape, module.layer.out_features),
                                         module.probe.dtype))
  graphdef, probes, others = nnx.split(model, Probe, ...)
  grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p, others), inputs, targets))(probes)
  return {"/".join(map(str, path[:-1])): g.reshape(-1, g.shape[-1]).astype(jnp.float32)
          for path, g in nnx.to_flat_state(grads)}


def variance_rows(config: Config, trainer: Trainer, params, rest, train, *, step: int,
                  methods) -> list[dict]:
  """Pruning variance vs formula for every layer and pruned method at one checkpoint."""
  inputs, targets = sample_windows(train, jax.random.key(777), config.batch, config.context)
  grads = jax.jit(lambda p, r: capture_output_grads(trainer, p, r, inputs, targets))(params,
                                                                                      rest)
  rows = []
  for layer, dy in grads.items():
    norm2 = float(jnp.sum(dy**2))
    for method in methods:
      if method == "dense":
        continue
      name, n, m = method.split(":")
      n, m = int(n), int(m)
      empirical = float(empirical_variance(dy, key=jax.random.key(step), n=n, m=m, method=name,
                                           axis=0, draws=config.variance_draws))
      formula = (None if name == "greedy" else
                 float(formula_variance(dy, n=n, m=m, method=name, axis=0)))
      rows.append(dict(config_id=config_id(config), step=step, layer=layer, method=method,
                       dy_norm2=norm2, empirical=empirical, formula=formula,
                       ratio=None if not formula else empirical / formula,
                       relative=empirical / norm2 if norm2 else None))
  return rows


def train_one(config: Config, trainer: Trainer, seed: int, corpus, *, progress=True,
              variance_methods=()) -> tuple[list[dict], list[dict]]:
  """Trains one model; returns its curve rows and (if asked) its variance rows."""
  params, rest, opt_state = trainer.init(seed)
  data_key = jax.random.split(jax.random.key(seed))[1]
  train, val = jnp.asarray(corpus.train), jnp.asarray(corpus.val)
  cid = config_id(config)
  rows, variances = [], []
  checkpoints = set(config.variance_steps) if variance_methods else set()
  if 0 in checkpoints:
    variances += variance_rows(config, trainer, params, rest, train, step=0,
                               methods=variance_methods)
  bar = Progress(config.steps, desc=f"{trainer.method} seed {seed}", enabled=progress)
  step = 0
  while step < config.steps:
    length = min(config.log_every, config.steps - step)
    params, rest, opt_state, loss = trainer.chunk(params, rest, opt_state, train, data_key,
                                                  step, length=length)
    step += length
    train_loss, val_loss = float(loss), float(trainer.val_loss(params, rest, val))
    if not np.isfinite(train_loss):
      raise FloatingPointError(f"{trainer.method} seed {seed}: loss became {train_loss} at "
                               f"step {step}")
    rows.append(dict(config_id=cid, method=trainer.method, seed=seed, step=step,
                     train_loss=train_loss, val_loss=val_loss))
    bar.update(step, train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
    if step in checkpoints:
      variances += variance_rows(config, trainer, params, rest, train, step=step,
                                 methods=variance_methods)
  bar.close()
  return rows, variances


def _append(path: pathlib.Path, rows: list[dict]) -> None:
  """Appends rows to a CSV (header first when the file is new)."""
  if not rows:
    return
  new = not path.exists()
  with open(path, "a", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    if new:
      writer.writeheader()
    writer.writerows(rows)


def finished_pairs(out_dir: pathlib.Path, config: Config) -> set:
  """(method, seed) pairs of this configuration already in ``runs.csv``."""
  return {(r["method"], int(r["seed"])) for r in report.read_csv(out_dir / "runs.csv")
          if r["config_id"] == config_id(config)}


def expected_seconds(method: str, timed: dict[str, float], recorded: list[dict]) -> float:
  """How long a run of ``method`` is expected to take, for the time budget.

  Arguments:
    method: the method to run.
    timed: seconds of each method's last run in this invocation (compiled already).
    recorded: this config's ``runs.csv`` rows from earlier invocations.

  Returns:
    Its last run here; else its longest recorded run (that one included its
    compile, as this invocation's first run of it will); else the longest run
    seen at all (0 if none).
  """
  if method in timed:
    return timed[method]
  own = [float(r["seconds"]) for r in recorded if r["method"] == method]
  every = [*timed.values(), *(float(r["seconds"]) for r in recorded)]
  return max(own or every, default=0.0)


def run(config: Config, methods=METHODS, *, out_dir: pathlib.Path, command: str = "",
        time_budget_s: float | None = None, progress=True) -> list[tuple[str, int]]:
  """All methods x seeds, seed-major, appending to the CSVs of ``out_dir``.

  Skips the (method, seed) pairs already in ``runs.csv`` for this configuration
  and, with ``time_budget_s``, each run that ``expected_seconds`` says would not
  finish in the remaining time.

  Returns:
    The pairs trained now.
  """
  config_flags.check(config)
  methods = [parse_method(m) for m in methods]
  if any(s and s % config.log_every for s in config.variance_steps):
    raise ValueError(f"--variance_steps must be 0 or multiples of --log_every "
                     f"({config.log_every}), got {config.variance_steps}")
  start = time.monotonic()
  out_dir.mkdir(parents=True, exist_ok=True)
  done = finished_pairs(out_dir, config)
  recorded = [r for r in report.read_csv(out_dir / "runs.csv")
              if r["config_id"] == config_id(config)]
  corpus = stdlib_byte_corpus(max_train_bytes=config.train_bytes, max_val_bytes=config.val_bytes)
  seconds, trained = {}, []
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  for seed in range(config.seeds):
    for method in methods:
      if (method, seed) in done:
        continue
      expected = expected_seconds(method, seconds, recorded)
      if time_budget_s is not None and time.monotonic() - start + expected > time_budget_s:
        print(f"skipping {method} seed {seed}: ~{expected:.0f} s would pass the time budget",
              file=sys.stderr)
        continue
      began = time.monotonic()
      trainer = trainer_for(config, method)
      first_dense = method == "dense" and not any(m == "dense" for m, _ in done | set(trained))
      curve, variances = train_one(config, trainer, seed, corpus, progress=progress,
                                   variance_methods=methods if first_dense else ())
      seconds[method] = time.monotonic() - began
      _append(out_dir / "curves.csv", curve)
      _append(out_dir / "variance.csv", variances)
      _append(out_dir / "runs.csv", [dict(
          config_id=config_id(config), method=method, seed=seed,
          final_train_loss=curve[-1]["train_loss"], final_val_loss=curve[-1]["val_loss"],
          seconds=round(seconds[method], 1), device=device, command=command,
          config=json.dumps(dataclasses.asdict(config)))])
      trained.append((method, seed))
  return trained


def define_flags() -> None:
  """Flags of the script: one per ``Config`` field, plus methods, output_dir, time budget."""
  config_flags.define_flags(Config)
  flags.DEFINE_list("methods", list(METHODS), "dense and/or name:n:m with name in "
                    "mvue, mvue_approx, greedy")
  flags.DEFINE_string("output_dir", "runs/mvue_grad", "where the CSVs, curves.png and "
                      "RESULTS.md go (a rerun there resumes)")
  flags.DEFINE_float("time_budget_s", None, "seconds this invocation may take: a run that "
                     "would end later is not started", lower_bound=0)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  with config_flags.one_line_errors():
    config = config_flags.config_from_flags(Config)
    config_flags.check(config)
    out_dir = pathlib.Path(FLAGS.output_dir)
    print(f"{count_parameters(config):,} parameters; config {config_id(config)}; "
          f"{jax.devices()[0].device_kind}", file=sys.stderr)
    command = "python -m experiments.mvue.train " + " ".join(sys.argv[1:])
    run(config, FLAGS.methods, out_dir=out_dir, command=command.strip(),
        time_budget_s=FLAGS.time_budget_s)
    print(report.render(out_dir, config_id(config)))


if __name__ == "__main__":
  config_flags.launch(define_flags, main)
