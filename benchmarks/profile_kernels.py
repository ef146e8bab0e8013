"""Runs each fixed fan-in kernel once at one size, for a profiler to read.

``ncu --set default -k regex:kernel python benchmarks/profile_kernels.py`` reports
the memory throughput, cache hit rates and occupancy of the forward, dvalues and
dx kernels (compiled once beforehand, so the profiled launches are the real ones).
"""

import jax
import jax.numpy as jnp
from absl import app, flags

import sparsejax as sj
from sparsejax.kernels import fanin

flags.DEFINE_integer("out", 670091, "output rows")
flags.DEFINE_integer("fan_in", 64, "K")
flags.DEFINE_integer("batch", 256, "batch")
flags.DEFINE_integer("in_features", 768, "input size")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  layer = sj.FixedFanIn.init(jax.random.key(0), FLAGS.in_features, FLAGS.out, FLAGS.fan_in)
  x = jax.random.normal(jax.random.key(1), (FLAGS.batch, FLAGS.in_features))
  g = jax.random.normal(jax.random.key(2), (FLAGS.batch, FLAGS.out))
  args = (x, g, layer.values, layer.indices)  # arguments, not constants baked into the code
  calls = {
      "forward": jax.jit(lambda x, g, v, i: fanin.fanin_forward(x, v, i)),
      "dvalues": jax.jit(lambda x, g, v, i: fanin.fanin_dvalues(x, g, i,
                                                                values_dtype=jnp.float32)),
      "dx": jax.jit(lambda x, g, v, i: fanin.fanin_dx(g, v, i, in_features=x.shape[1])),
  }
  compiled = {name: fn.lower(*args).compile() for name, fn in calls.items()}
  for name, fn in compiled.items():
    jax.block_until_ready(fn(*args))
    print(f"ran {name}")


if __name__ == "__main__":
  app.run(main)
