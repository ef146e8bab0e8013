"""Training with N:M-pruned neural gradients: dense vs MVUE vs greedy.

``python -m experiments.mvue.train`` trains the byte-level GPT of
``experiments.common.byte_lm`` on the Python standard library's sources
(``sparsejax.data.stdlib_byte_corpus``) once per method:

  dense, mvue 1:2, mvue 2:4, mvue_approx 2:4, greedy 1:2, greedy 2:4

with the same seeds, data and steps. Every linear layer (attention, MLP, head)
is wrapped in ``sparsejax.nn.PrunedGrad``: by default its weight gradient
``dW = dY^T X`` uses dY pruned N:M along the token axis while dX uses the
dense dY (``--prune=weight``); ``--prune=output`` prunes dY for both.
Outputs: ``curves.csv`` (train/val loss per logged step), ``curves.png`` and
``RESULTS.md`` (final-loss table and the command) in ``--output_dir``.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from tqdm.auto import tqdm

import sparsejax as sj
from ..common import config_flags
from ..common.byte_lm import ByteLM, dense_linear
from ..common.config_flags import field
from sparsejax.data import sample_windows, stdlib_byte_corpus

METHODS = ("dense", "mvue:1:2", "mvue:2:4", "mvue_approx:2:4", "greedy:1:2", "greedy:2:4")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on: one absl flag per field, with the help shown here."""
  # The model.
  width: int = field(128, "model width d")
  depth: int = field(2, "transformer blocks")
  heads: int = field(4, "attention heads")
  context: int = field(64, "context length in bytes")

  # Training.
  batch: int = field(32, "windows per step")
  steps: int = field(300, "AdamW steps")
  learning_rate: float = field(3e-3, "peak learning rate (linear warm-up, cosine decay to 0)")
  warmup: int = field(30, "warm-up steps")
  prune: str = field("weight", "'weight': only dW = dY^T X sees the pruned dY; 'output': dY "
                     "itself, for dW and dX", choices=("weight", "output"))

  # Data and logging.
  train_bytes: int = field(4_000_000, "bytes of the training split of the stdlib corpus")
  val_bytes: int = field(400_000, "bytes of its validation split")
  val_batches: int = field(8, "fixed validation batches per evaluation")
  log_every: int = field(25, "evaluate and log every this many steps")
  seeds: int = field(1, "seeds per method")


def _linear_factory(method: str, prune: str):
  """The ``linear(in, out, rngs)`` factory for a method name like ``"mvue:2:4"``."""
  if method == "dense":
    return dense_linear
  name, n, m = method.split(":")
  if prune not in ("weight", "output"):
    raise ValueError(f"prune must be 'weight' or 'output', got {prune!r}")

  def linear(in_features, out_features, rngs):
    return sj.nn.PrunedGrad(nnx.Linear(in_features, out_features, rngs=rngs), n=int(n),
                            m=int(m), method=name, weight_grad_only=prune == "weight",
                            rngs=rngs)

  return linear


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


def train_one(config: Config, method: str, seed: int, corpus, *, progress=True) -> list[dict]:
  """Trains one model; returns rows ``{method, seed, step, train_loss, val_loss}``."""
  model_key, data_key = jax.random.split(jax.random.key(seed))
  model = ByteLM(width=config.width, depth=config.depth, heads=config.heads,
                 context=config.context, linear=_linear_factory(method, config.prune),
                 rngs=nnx.Rngs(params=model_key, grad_prune=jax.random.fold_in(model_key, 1)))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup,
                                                config.steps)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
  train, val = jnp.asarray(corpus.train), jnp.asarray(corpus.val)

  def loss_fn(model, inputs, targets):
    logits = model(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @nnx.jit
  def train_step(model, optimizer, data, key):
    inputs, targets = sample_windows(data, key, config.batch, config.context)
    loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def val_loss(model, data):
    # The same windows every time: val_batches x batch of them, in one forward pass.
    windows = sample_windows(data, jax.random.key(12345), config.val_batches * config.batch,
                             config.context)
    return loss_fn(model, *windows)

  rows, window = [], []
  steps = tqdm(range(1, config.steps + 1), desc=f"{method} seed {seed}", disable=not progress,
               leave=False)
  for step in steps:
    window.append(train_step(model, optimizer, train, jax.random.fold_in(data_key, step)))
    if step % config.log_every == 0 or step == config.steps:
      train_loss = float(jnp.mean(jnp.stack(window)))
      window = []
      rows.append(dict(method=method, seed=seed, step=step, train_loss=train_loss,
                       val_loss=float(val_loss(model, val))))
      if not np.isfinite(train_loss):
        raise FloatingPointError(f"{method} seed {seed}: loss became {train_loss} at step {step}")
      steps.set_postfix(train=f"{train_loss:.3f}", val=f"{rows[-1]['val_loss']:.3f}")
  return rows


def run(config: Config, methods=METHODS, *, progress=True) -> list[dict]:
  """All methods x seeds on the same corpus; returns the logged rows."""
  methods = [parse_method(m) for m in methods]
  corpus = stdlib_byte_corpus(max_train_bytes=config.train_bytes, max_val_bytes=config.val_bytes)
  rows = []
  for method in methods:
    for seed in range(config.seeds):
      rows += train_one(config, method, seed, corpus, progress=progress)
  return rows


def final_table(rows: list[dict]) -> list[dict]:
  """Per method: final train/val loss (mean over seeds) and the gap to dense."""
  last = max(r["step"] for r in rows)
  out = []
  for method in dict.fromkeys(r["method"] for r in rows):
    final = [r for r in rows if r["method"] == method and r["step"] == last]
    out.append(dict(method=method, seeds=len(final),
                    train_loss=float(np.mean([r["train_loss"] for r in final])),
                    val_loss=float(np.mean([r["val_loss"] for r in final]))))
  dense = next((r["val_loss"] for r in out if r["method"] == "dense"), None)
  for r in out:
    r["val_gap_to_dense"] = None if dense is None else r["val_loss"] - dense
  return out


def write_outputs(rows: list[dict], config: Config, out_dir: pathlib.Path, command: str,
                  seconds: float) -> str:
  """Writes curves.csv, curves.png and RESULTS.md; returns the markdown table."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir.mkdir(parents=True, exist_ok=True)
  with open(out_dir / "curves.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for method in dict.fromkeys(r["method"] for r in rows):
    steps = sorted({r["step"] for r in rows if r["method"] == method})
    for ax, key in zip(axes, ("train_loss", "val_loss")):
      mean = [np.mean([r[key] for r in rows if r["method"] == method and r["step"] == s])
              for s in steps]
      ax.plot(steps, mean, label=method, linestyle="--" if method.startswith("greedy") else "-")
  for ax, title in zip(axes, ("train loss", "validation loss")):
    ax.set(title=title, xlabel="step", ylabel="cross-entropy (nats/byte)")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(out_dir / "curves.png", dpi=120)
  plt.close(fig)

  table = final_table(rows)
  lines = ["| method | seeds | final train loss | final val loss | val gap to dense |",
           "|---|---:|---:|---:|---:|"]
  for r in table:
    gap = "" if r["val_gap_to_dense"] is None else f"{r['val_gap_to_dense']:+.4f}"
    lines.append(f"| {r['method']} | {r['seeds']} | {r['train_loss']:.4f} | "
                 f"{r['val_loss']:.4f} | {gap} |")
  markdown = "\n".join(lines)
  devices = jax.devices()
  (out_dir / "RESULTS.md").write_text(
      "# N:M-pruned neural gradients: final losses\n\n"
      f"- Command: `{command}`\n"
      f"- Config: {dataclasses.asdict(config)}\n"
      f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; run time {seconds:.0f} s\n"
      f"- Device: {devices[0].platform} ({len(devices)} device(s)); jax {jax.__version__}, "
      f"Python {sys.version.split()[0]}\n"
      "- Losses: cross-entropy in nats per byte, mean of the last logging window (train) "
      f"and of {config.val_batches} fixed validation batches (val), averaged over seeds.\n\n"
      + markdown + "\n\n![curves](curves.png)\n")
  return markdown


def define_flags() -> None:
  """Flags of the script: one per ``Config`` field, plus methods and output_dir."""
  config_flags.define_flags(Config)
  flags.DEFINE_list("methods", list(METHODS), "dense and/or name:n:m with name in "
                    "mvue, mvue_approx, greedy")
  flags.DEFINE_string("output_dir", "runs/mvue_grad", "where curves.csv/png and RESULTS.md go")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  config = config_flags.config_from_flags(Config)
  start = time.time()
  rows = run(config, FLAGS.methods)
  command = "python -m experiments.mvue.train " + " ".join(sys.argv[1:])
  print(write_outputs(rows, config, pathlib.Path(FLAGS.output_dir), command.strip(),
                      time.time() - start))


if __name__ == "__main__":
  define_flags()
  app.run(main)
