"""Time of one SET rewiring of a fixed fan-in layer, piece by piece and per block size.

For each layer ``(L rows, K, in)`` this times, under ``jit`` (a warm-up call
first, then the median of ``--repeats`` calls, each to ``block_until_ready``):

- ``prune_smallest``: the ``floor(0.3 K)`` smallest ``|w|`` of every row;
- the regrowth draw, ``draw_columns`` on all rows with those slots free (and
  how many redraw rounds it took);
- the whole ``rewire_layer`` (prune + draw, block by block of rows), at the
  backend's block size and at each of ``--blocks``; every block size must give
  the same bits (checked);
- a full ``set_topology(optax.adam(1e-3))`` update plus ``apply_updates`` on a
  rewiring step and on a plain step (the same executable: the rewiring is a
  ``lax.cond``), at the backend's block size.

The markdown table goes to stdout and to the ``set_rewire`` section of
BENCHMARKS.md (``--output ''`` skips that); progress goes to stderr. Run from
the repository root:

  python benchmarks/set_rewire.py                                   # GPU, full sizes
  python benchmarks/set_rewire.py --labels 100000 --fan_ins 64      # CPU
"""

from __future__ import annotations

import functools
import pathlib
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import sparsejax as sj
from sparsejax import rewiring
try:
  from benchmarks import _report
except ImportError:  # run as `python benchmarks/<script>.py`: this folder is on the path
  import _report

write_section = functools.partial(_report.write_section, name="set_rewire")

FLAGS = flags.FLAGS
flags.DEFINE_list("labels", ["670091", "3000000"], "rows L of the layer")
flags.DEFINE_list("fan_ins", ["64", "128"], "fan-ins K")
flags.DEFINE_integer("in_features", 768, "input size")
flags.DEFINE_float("fraction", 0.3, "pruned fraction of each row")
flags.DEFINE_list("blocks", ["262144", "8388608", "33554432", "0"],
                  "other slots per rewiring block to time rewire_layer at (0: the whole layer)")
flags.DEFINE_integer("repeats", 5, "timed calls per case (median)")
flags.DEFINE_string("output", str(pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
                    "BENCHMARKS.md to write the set_rewire section of ('' skips it)")


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def time_ms(fn, *args, repeats: int) -> tuple[float, object]:
  """Median milliseconds of ``fn(*args)`` after a warm-up call, and its result."""
  result = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), result


def measure(labels: int, fan_in: int, in_features: int, fraction: float, blocks, repeats: int):
  """Rows ``(piece, slots per block, ms, note)`` of one layer."""
  keys = jax.random.split(jax.random.key(0), 3)
  layer = sj.FixedFanIn.init(in_features, labels, fan_in, key=keys[0])
  w = jax.random.normal(keys[1], (labels, fan_in))
  layer = layer.replace(values=w)
  default = rewiring._rewire_block_elements()  # the backend's block size
  rows = []

  _log(f"L={labels:,} K={fan_in}: prune_smallest")
  ms, free = time_ms(jax.jit(rewiring.prune_smallest), w, fraction, repeats=repeats)
  rows.append(("prune_smallest", labels * fan_in, ms, ""))

  _log(f"L={labels:,} K={fan_in}: draw")
  # draw_columns' implementation, which also counts its redraw rounds.
  draw = jax.jit(lambda idx, free: rewiring._draw_columns(
      keys[2], idx, free, in_features, all_free=False, with_rounds=True))
  ms, (_, rounds) = time_ms(draw, layer.indices, free, repeats=repeats)
  rows.append(("regrowth draw", labels * fan_in, ms,
               f"{np.mean(free):.1%} free, {int(rounds)} redraw rounds"))

  reference = None
  for elements in [default] + [b or labels * fan_in for b in blocks if b != default]:
    _log(f"L={labels:,} K={fan_in}: rewire_layer, blocks of {elements:,} slots")
    rewire = jax.jit(functools.partial(rewiring.rewire_layer, prune_fraction=fraction,
                                       key=keys[2], in_features=in_features,
                                       block_elements=elements))
    ms, (new, pruned) = time_ms(rewire, layer.indices, w, repeats=repeats)
    new, pruned = np.asarray(new), np.asarray(pruned)
    if reference is None:
      reference = new, pruned
    elif not (np.array_equal(new, reference[0]) and np.array_equal(pruned, reference[1])):
      raise AssertionError(f"blocks of {elements} slots changed the topology")
    blocks_per_layer = -(-labels // max(1, min(labels, elements // fan_in)))
    note = f"{blocks_per_layer} blocks" + (", backend default" if elements == default else "")
    rows.append(("rewire_layer", elements, ms, note))

  _log(f"L={labels:,} K={fan_in}: set_topology update")
  params = {"clf": layer}
  tx = sj.set_topology(optax.adam(1e-3), key=keys[2], interval=2, end_step=10**9,
                       prune_fraction=fraction)
  grads = jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
                       if jnp.issubdtype(a.dtype, jnp.integer) else a * 1e-3, params)

  @jax.jit
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  times = {}
  for name, count in (("plain step", 0), ("rewiring step", 1)):  # update t = count + 1
    times[name], _ = time_ms(step, grads, state._replace(count=jnp.asarray(count, jnp.int32)),
                             params, repeats=repeats)
  rows.append(("set_topology(adam) plain step", default, times["plain step"], ""))
  rows.append(("set_topology(adam) rewiring step", default, times["rewiring step"],
               f"+{times['rewiring step'] - times['plain step']:.1f} ms"))
  return rows


def render_section(results, command: str) -> str:
  """Markdown: a header line and one table row per measurement."""
  device = jax.devices()[0]
  lines = [f"SET rewiring of a fixed fan-in layer (in={FLAGS.in_features}, prune "
           f"{FLAGS.fraction:g} of each row), {device.platform} ({device.device_kind}"
           f"{', ' + _report.cpu_name() if device.platform == 'cpu' else ''}), jax "
           f"{jax.__version__}, median of {FLAGS.repeats}: `{command}`", "",
           "| L | K | piece | slots per block | ms | note |", "|---:|---:|---|---:|---:|---|"]
  for (labels, fan_in), rows in results:
    for piece, elements, ms, note in rows:
      lines.append(f"| {labels:,} | {fan_in} | {piece} | {elements:,} | {ms:.2f} | {note} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  blocks = [int(b) for b in FLAGS.blocks]
  results = []
  for labels in map(int, FLAGS.labels):
    for fan_in in map(int, FLAGS.fan_ins):
      results.append(((labels, fan_in), measure(labels, fan_in, FLAGS.in_features,
                                                FLAGS.fraction, blocks, FLAGS.repeats)))
  section = render_section(results, shlex.join(["python", "benchmarks/set_rewire.py",
                                                 *sys.argv[1:]]))
  print(section)
  if FLAGS.output:
    write_section(pathlib.Path(FLAGS.output), section)


if __name__ == "__main__":
  app.run(main)
