"""Where a jitted step's device time goes: the kernels of a few steps, from a JAX profile.

Runs ``--steps`` steps of one workload under ``jax.profiler.trace`` (with a
Perfetto trace), then reads the trace's device events and prints, per kernel
name, the count, the total milliseconds per step and the share of the step.
Workloads:

* ``layer``: fwd+bwd of ``fixed_fanin_matmul`` (``--impl``) at (batch, in,
  out, K), loss 0.5 |y|^2, bf16 activations; ``--impl dense`` for ``x @ W``;
* ``set``: one rewiring update of ``set_topology(adam)`` on a (out, K) layer;
* ``byte_lm``: one compiled call of the SμPar sweep (``experiments.supar.sweep``):
  ``--models`` SμPar runs of the byte GPT at ``--width``, hidden density
  ``--density`` (``--layer``), ``--dtype``, vmapped, ``--lm_steps`` Adam steps
  each. It also prints the call's wall time and its dense-equivalent TFLOP/s
  (``groups.flops_per_step``).

  python benchmarks/profile_trace.py --workload layer --impl xla_tile --out 670091 --fan_in 64
  python benchmarks/profile_trace.py --workload byte_lm --width 512 --density 1/128 --models 7
"""

from __future__ import annotations

import collections
import fractions
import gzip
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import sparsejax as sj

FLAGS = flags.FLAGS


def _layer_step():
  layer = sj.FixedFanIn.init(FLAGS.in_features, FLAGS.out, FLAGS.fan_in, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (FLAGS.batch, FLAGS.in_features), jnp.bfloat16)
  if FLAGS.impl == "dense":
    w = jax.random.normal(jax.random.key(2), (FLAGS.in_features, FLAGS.out), jnp.bfloat16)
    loss = lambda x, w: 0.5 * jnp.sum(jnp.square((x @ w).astype(jnp.float32)))
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: step(x, w)

  def loss(x, values):
    y = sj.fixed_fanin_matmul(x, values, layer.indices, impl=FLAGS.impl)
    return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return lambda: step(x, layer.values)


def _set_step():
  params = {"layer": sj.FixedFanIn.init(FLAGS.in_features, FLAGS.out,
                                        FLAGS.fan_in, key=jax.random.key(0))}
  tx = sj.set_topology(optax.adam(1e-3), key=jax.random.key(1), interval=1, end_step=10**6)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) if jnp.issubdtype(p.dtype, jnp.floating)
                       else jnp.zeros(p.shape, jax.dtypes.float0), params)
  update = jax.jit(tx.update)
  return lambda: update(grads, state, params)


def _byte_lm_step():
  from sparsejax.experiments.supar import groups, sweep
  config = sweep.Config(width=FLAGS.width, base_width=FLAGS.width // 4, heads=4, context=256,
                        batch=16, steps=FLAGS.lm_steps, warmup=1, layer=FLAGS.layer,
                        dtype=FLAGS.dtype)
  bytes_ = jax.random.randint(jax.random.key(0), (1 << 20,), 0, 256).astype(jnp.uint8)
  windows = jnp.zeros((config.val_batches, config.batch, config.context), jnp.int32)
  data = sweep.Data(bytes_, (windows, windows))
  p = sj.SuPar("supar", width=config.width, base_width=config.base_width, alpha_in=4.0)
  density = float(fractions.Fraction(FLAGS.density))
  runs = [(0, k, 2.0**-7) for k in range(FLAGS.models)]
  call = sweep.prepare_call(config, p, density, runs, data)
  params, opt_state, rest, keys, lrs = call.state
  state = [params, opt_state]

  def step():
    (state[0], state[1]), losses = call.train(state[0], state[1], rest, data.train, keys, lrs,
                                              jnp.int32(0))
    return losses

  flops = FLAGS.models * FLAGS.lm_steps * groups.flops_per_step(
      width=config.width, depth=config.depth, context=config.context, batch=config.batch)
  return step, flops


def kernel_table(trace_dir: pathlib.Path, steps: int) -> str:
  """Per-kernel totals from the Perfetto trace that ``jax.profiler.trace`` wrote."""
  files = sorted(trace_dir.rglob("*.trace.json.gz")) + sorted(trace_dir.rglob("*.json.gz"))
  if not files:
    return f"no trace file under {trace_dir}: {[str(p) for p in trace_dir.rglob('*')][:20]}"
  events = json.loads(gzip.open(files[0]).read())
  events = events["traceEvents"] if isinstance(events, dict) else events
  # Device events live on the process whose name mentions the GPU (or "/device:").
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {pid for pid, name in names.items() if "/device:" in name or "GPU" in name}
  # A device's threads overlap (kernels on streams, and the XLA ops spanning them): total
  # each thread apart.
  totals, counts = collections.Counter(), collections.Counter()
  per_thread = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device and "dur" in e:
      thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
      totals[(thread, e["name"])] += e["dur"]
      counts[(thread, e["name"])] += 1
      per_thread[thread] += e["dur"]
  lines = [f"trace {files[0].name}: device processes {[names[p] for p in device]}", "",
           "| thread | ms/step |", "|---|---:|"]
  lines += [f"| {t} | {us / steps / 1e3:.3f} |" for t, us in per_thread.most_common()]
  lines += ["", "| thread | kernel | calls/step | ms/step | share of thread |",
            "|---|---|---:|---:|---:|"]
  for (thread, name), us in totals.most_common(30):
    lines.append(f"| {thread} | {name[:80]} | {counts[(thread, name)] / steps:.1f} | "
                 f"{us / steps / 1e3:.3f} | {us / max(per_thread[thread], 1):.1%} |")
  return "\n".join(lines)


def main(argv):
  del argv
  run, flops = {"layer": lambda: (_layer_step(), None), "set": lambda: (_set_step(), None),
                "byte_lm": _byte_lm_step}[FLAGS.workload]()
  for _ in range(2):
    jax.block_until_ready(run())
  began = time.perf_counter()
  for _ in range(FLAGS.steps):
    jax.block_until_ready(run())
  seconds = (time.perf_counter() - began) / FLAGS.steps
  trace_dir = pathlib.Path(FLAGS.trace_dir or tempfile.mkdtemp())
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    for _ in range(FLAGS.steps):
      jax.block_until_ready(run())
  if FLAGS.workload == "byte_lm":
    print(f"byte_lm width={FLAGS.width} density={FLAGS.density} layer={FLAGS.layer} "
          f"dtype={FLAGS.dtype} models={FLAGS.models} lm_steps={FLAGS.lm_steps} "
          f"on {jax.devices()[0].device_kind}: {seconds * 1e3:.1f} ms per call, "
          f"{flops / seconds / 1e12:.2f} TFLOP/s dense-equivalent")
  else:
    print(f"{FLAGS.workload} impl={FLAGS.impl} batch={FLAGS.batch} in={FLAGS.in_features} "
          f"out={FLAGS.out} K={FLAGS.fan_in}: {seconds * 1e3:.2f} ms per step")
  print(kernel_table(trace_dir, FLAGS.steps))
  sys.stdout.flush()


if __name__ == "__main__":
  flags.DEFINE_enum("workload", "layer", ["layer", "set", "byte_lm"], "what to profile")
  flags.DEFINE_string("impl", "xla_tile", "fixed_fanin_matmul impl, or 'dense'")
  flags.DEFINE_integer("batch", 256, "batch")
  flags.DEFINE_integer("in_features", 768, "in")
  flags.DEFINE_integer("out", 670091, "out")
  flags.DEFINE_integer("fan_in", 64, "K")
  flags.DEFINE_integer("steps", 3, "timed, then profiled steps (byte_lm: compiled calls)")
  flags.DEFINE_integer("width", 512, "byte_lm: model width (the proxy's is a quarter)")
  flags.DEFINE_string("density", "1", "byte_lm: hidden density, a number or a fraction like 1/128")
  flags.DEFINE_enum("layer", "fixed_fanin", ["fixed_fanin", "masked"], "byte_lm: sparse layer")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "byte_lm: compute dtype")
  flags.DEFINE_integer("models", 7, "byte_lm: runs vmapped in the call")
  flags.DEFINE_integer("lm_steps", 100, "byte_lm: Adam steps per call (the sweep's chunk)")
  flags.DEFINE_string("trace_dir", "", "where the trace goes (default: a temporary folder)")
  app.run(main)
