"""Trains a fixed fan-in classifier on a generated teacher task.

Data: inputs ``x ~ N(0, I)``; the label of ``x`` is the argmax of a random
sparse teacher ``FixedFanIn`` applied to ``x``. The student is a dense hidden
layer followed by a ``FixedFanInLinear`` classifier over all labels, trained
with softmax cross-entropy and Adam. Every batch is drawn from a key folded
with the step, so a run is reproducible bit for bit from its seed.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

import sparsejax as sj
from sparsejax.nn import FixedFanInLinear


@dataclasses.dataclass(frozen=True)
class Config:
  in_features: int = 128
  hidden: int = 256
  labels: int = 1000
  fan_in: int = 32
  batch: int = 256
  steps: int = 1000
  learning_rate: float = 3e-3
  seed: int = 0
  log_every: int = 100
  output_dir: str = "runs/fanin_demo"


class Classifier(nnx.Module):
  """Dense hidden layer -> ReLU -> fixed fan-in classifier over all labels."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(config.in_features, config.hidden, rngs=rngs)
    self.classifier = FixedFanInLinear(config.hidden, config.labels, config.fan_in, rngs=rngs)

  def __call__(self, x):
    return self.classifier(jax.nn.relu(self.hidden(x)))


@functools.partial(jax.jit, static_argnames="batch")
def make_batch(teacher: sj.FixedFanIn, key: jax.Array, batch: int):
  """``batch`` inputs and their teacher labels: ``(batch, in)``, ``(batch,)`` int32."""
  x = jax.random.normal(key, (batch, teacher.in_features))
  return x, jnp.argmax(teacher(x), axis=-1)


def train(config: Config) -> list[dict]:
  """Runs the demo; returns the logged metrics (also written to ``metrics.csv``)."""
  teacher_key, data_key, model_key = jax.random.split(jax.random.key(config.seed), 3)
  teacher = sj.FixedFanIn.init(teacher_key, config.in_features, config.labels, config.fan_in)
  model = Classifier(config, rngs=nnx.Rngs(model_key))
  optimizer = nnx.Optimizer(model, optax.adam(config.learning_rate), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, labels):
    def loss_fn(model):
      logits = model(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, accuracy

  out_dir = pathlib.Path(config.output_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  history, window = [], []
  start = time.perf_counter()
  with open(out_dir / "metrics.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, ["step", "loss", "accuracy", "seconds"])
    writer.writeheader()
    bar = tqdm(range(1, config.steps + 1), desc="fanin_demo", unit="step")
    for step in bar:
      x, labels = make_batch(teacher, jax.random.fold_in(data_key, step), batch=config.batch)
      window.append(train_step(model, optimizer, x, labels))
      if step % config.log_every == 0 or step == config.steps:
        # One host sync per log interval, averaged over the interval.
        loss, accuracy = (float(v) for v in jnp.mean(jnp.array(window), axis=0))
        window = []
        row = dict(step=step, loss=loss, accuracy=accuracy,
                   seconds=round(time.perf_counter() - start, 3))
        writer.writerow(row)
        history.append(row)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}")
        tqdm.write(f"step {step:5d}  loss {loss:.4f}  accuracy {accuracy:.3f}")
  return history
