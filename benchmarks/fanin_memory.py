"""Memory and CPU time of one Adam training step: fixed fan-in layer vs dense layer.

For each output size ``out`` and fan-in ``K`` this compiles one training step
(forward, backward, ``optax.adam`` update) of a ``FixedFanIn`` layer and of a
dense ``(in, out)`` layer, both with bias and the loss ``mean(y ** 2)``. Memory
comes from XLA's ``memory_analysis()`` of executables lowered from
``jax.ShapeDtypeStruct`` inputs, so no case allocates anything to be measured.
Cases whose footprint is below ``--max_time_gib`` are also timed with real
arrays. The table goes to stdout and to its own section of ``BENCHMARKS.md``.

Run from the repository root:

  python benchmarks/fanin_memory.py --outs=1000,5000 --fan_ins=8,16
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import optax
from absl import app, flags
from tqdm import tqdm

try:
  from benchmarks import _report
except ImportError:  # run as `python benchmarks/<script>.py`: this folder is on the path
  import _report
from sparsejax import FixedFanIn
from sparsejax.memory import compiled_bytes

FLAGS = flags.FLAGS
flags.DEFINE_list("outs", ["10000", "100000", "1000000", "3000000"], "Output sizes.")
flags.DEFINE_list("fan_ins", ["32", "64", "128"], "Fan-ins K of the sparse layer.")
flags.DEFINE_integer("in_features", 768, "Input size.")
flags.DEFINE_integer("batch", 256, "Batch size.")
flags.DEFINE_float("max_time_gib", 6.0,
                   "Only time cases whose arguments+temp+outputs are below this many GiB.")
flags.DEFINE_integer("repeats", 3, "Timed steps per case; the median is reported.")
flags.DEFINE_string("output", str(pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
                    "Markdown file whose fanin_memory section is written.")
flags.DEFINE_bool("time", True, "Time the cases that fit (--notime: memory only).")

START_MARKER, END_MARKER = _report.markers("fanin_memory")
write_section = functools.partial(_report.write_section, name="fanin_memory")
MIB = 2**20
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes that XLA reports for one compiled step (no buffers are donated)."""
  arguments: int
  temp: int
  outputs: int

  @property
  def total(self) -> int:
    return self.arguments + self.temp + self.outputs


@dataclasses.dataclass(frozen=True)
class Row:
  """One table row; the dense figures depend on ``out`` only."""
  out: int
  fan_in: int
  sparse: Memory
  dense: Memory
  sparse_s: float | None
  dense_s: float | None


def sparse_loss(params, indices, x):
  """``mean(y ** 2)`` of the fixed fan-in layer; ``indices`` is not differentiated."""
  layer = FixedFanIn._unchecked(params["values"], indices, params["bias"], x.shape[-1])
  return jnp.mean(jnp.square(layer(x)))


def dense_loss(params, x):
  """``mean(y ** 2)`` of the dense layer ``x @ weight + bias``."""
  return jnp.mean(jnp.square(x @ params["weight"] + params["bias"]))


def make_train_step(loss_fn, optimizer):
  """``step(params, opt_state, *data) -> (params, opt_state)`` for ``loss_fn(params, *data)``."""

  def step(params, opt_state, *data):
    grads = jax.grad(loss_fn)(params, *data)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def init_sparse(key, *, out, fan_in, in_features, batch, optimizer):
  """Real step arguments ``(params, opt_state, indices, x)`` of the sparse case."""
  layer_key, x_key = jax.random.split(key)
  layer = FixedFanIn.init(in_features, out, fan_in, key=layer_key)
  params = {"values": layer.values, "bias": layer.bias}
  x = jax.random.normal(x_key, (batch, in_features))
  return params, optimizer.init(params), layer.indices, x


def init_dense(key, *, out, in_features, batch, optimizer):
  """Real step arguments ``(params, opt_state, x)`` of the dense case."""
  w_key, x_key = jax.random.split(key)
  weight = jax.random.normal(w_key, (in_features, out)) / jnp.sqrt(in_features)
  params = {"weight": weight, "bias": jnp.zeros((out,))}
  x = jax.random.normal(x_key, (batch, in_features))
  return params, optimizer.init(params), x


def compile_abstract(step, init):
  """Compiles ``step`` for the shapes ``init(key)`` would produce, allocating nothing.

  ``jax.eval_shape`` traces the initialiser (optax init included) to
  ``ShapeDtypeStruct`` leaves, which is all ``lower`` needs.
  """
  abstract_args = jax.eval_shape(init, jax.random.key(0))
  compiled = jax.jit(step).lower(*abstract_args).compile()
  stats = compiled_bytes(compiled)
  memory = Memory(stats["argument_bytes"], stats["temp_bytes"], stats["output_bytes"])
  return compiled, memory


def time_step(compiled, init, repeats: int) -> float:
  """Median seconds of ``compiled(*init(key))`` over ``repeats`` calls after one warm-up."""
  args = init(jax.random.key(0))
  jax.block_until_ready(compiled(*args))  # warm-up: first-call overheads are not steady state
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def measure(step, init, max_bytes: float, repeats: int, timed: bool):
  """(memory, median seconds or None) of one case; timed only if it fits ``max_bytes``."""
  compiled, memory = compile_abstract(step, init)
  fits = timed and memory.total < max_bytes
  return memory, time_step(compiled, init, repeats) if fits else None


def run_benchmark(outs, fan_ins, in_features: int, batch: int, max_bytes: float,
                  repeats: int, timed: bool) -> list[Row]:
  """Measures every (out, K) case; the dense layer is measured once per ``out``."""
  optimizer = optax.adam(1e-3)
  sparse_step = make_train_step(sparse_loss, optimizer)
  dense_step = make_train_step(dense_loss, optimizer)
  rows = []
  with tqdm(total=len(outs) * (1 + len(fan_ins)), unit="case") as progress:
    for out in outs:
      progress.set_description(f"dense out={out}")
      dense_init = functools.partial(init_dense, out=out, in_features=in_features, batch=batch,
                                     optimizer=optimizer)
      dense, dense_s = measure(dense_step, dense_init, max_bytes, repeats, timed)
      progress.update()
      for fan_in in fan_ins:
        progress.set_description(f"sparse out={out} K={fan_in}")
        sparse_init = functools.partial(init_sparse, out=out, fan_in=fan_in,
                                        in_features=in_features, batch=batch,
                                        optimizer=optimizer)
        sparse, sparse_s = measure(sparse_step, sparse_init, max_bytes, repeats, timed)
        rows.append(Row(out, fan_in, sparse, dense, sparse_s, dense_s))
        progress.update()
  return rows


def _mib(n: int) -> str:
  return f"{n / MIB:,.1f}"


def _ms(seconds: float | None) -> str:
  return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def format_table(rows: list[Row]) -> str:
  """The markdown table of ``rows``."""
  header = ("| out | K | sparse args MiB | sparse temp MiB | sparse out MiB | dense args MiB "
            "| dense temp MiB | dense out MiB | memory ratio dense/sparse | sparse ms/step "
            "| dense ms/step |")
  lines = [header, "|" + "---:|" * 11]
  for r in rows:
    cells = [f"{r.out:,}", str(r.fan_in),
             _mib(r.sparse.arguments), _mib(r.sparse.temp), _mib(r.sparse.outputs),
             _mib(r.dense.arguments), _mib(r.dense.temp), _mib(r.dense.outputs),
             f"{r.dense.total / r.sparse.total:,.1f}", _ms(r.sparse_s), _ms(r.dense_s)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def render_section(rows: list[Row], command: str, in_features: int, batch: int,
                   max_time_gib: float, repeats: int, timed: bool) -> str:
  """The full BENCHMARKS.md section (without markers): setup, environment and table."""
  backend = jax.default_backend()
  timing_rule = (
      f"Cases are timed with real arrays only when that sum is below {max_time_gib:g} GiB "
      f"(`-` otherwise): one warm-up step, then the median of {repeats}."
      if timed else "Timing was off (`--notime`).")
  timing_note = (
      f"Timings are **CPU** figures ({os.cpu_count()} logical CPUs), not accelerator ones."
      if backend == "cpu" else f"Timings are on the {backend} backend.")
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  return "\n".join([
      "## Fixed fan-in vs dense: memory of one training step",
      "",
      f"One jitted training step (forward, backward, `optax.adam(1e-3)` update, returning new "
      f"params and optimizer state) with in = {in_features}, batch = {batch}, float32, loss "
      "`mean(y ** 2)` over the (batch, out) output. Sparse: `FixedFanIn` with trainable values "
      "+ bias, indices passed as a non-differentiated argument. Dense: weight (in, out) + bias. "
      "Memory is XLA's `memory_analysis()` of the step compiled from `jax.ShapeDtypeStruct` "
      "inputs (nothing allocated, no buffers donated); the ratio is dense/sparse of "
      f"arguments + temp + outputs. {timing_rule}",
      "",
      f"- Command: `{command}`",
      f"- Date: {date}",
      f"- Machine: {_report.cpu_name()}, {os.cpu_count()} logical CPUs; JAX device "
      f"`{jax.devices()[0].device_kind}` (backend `{backend}`); {platform.platform()}",
      f"- Versions: Python {platform.python_version()}, jax {jax.__version__}, "
      f"jaxlib {jaxlib.__version__}, optax {optax.__version__}",
      f"- {timing_note}",
      "",
      format_table(rows),
  ])


def main(argv):
  del argv
  rows = run_benchmark([int(n) for n in FLAGS.outs], [int(k) for k in FLAGS.fan_ins],
                       FLAGS.in_features, FLAGS.batch, FLAGS.max_time_gib * GIB,
                       FLAGS.repeats, FLAGS.time)
  section = render_section(rows, shlex.join(["python", *sys.argv]), FLAGS.in_features,
                           FLAGS.batch, FLAGS.max_time_gib, FLAGS.repeats, FLAGS.time)
  print(section)
  write_section(pathlib.Path(FLAGS.output), section)


if __name__ == "__main__":
  app.run(main)
