"""Runs each fixed fan-in or N:M kernel once at one size, for a profiler to read.

``ncu --set default -k regex:kernel python benchmarks/profile_kernels.py`` reports
the memory throughput, cache hit rates and occupancy of the forward, dvalues and
dx kernels (compiled once beforehand, so the profiled launches are the real ones);
``--which nm`` runs the MVUE mask kernel (1:2, 2:4) and the fused dW kernel on
the N:M benchmark's dY instead.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

import sparsejax as sj
from sparsejax.kernels import fanin, nm

flags.DEFINE_integer("out", 670091, "output rows")
flags.DEFINE_integer("fan_in", 64, "K")
flags.DEFINE_integer("batch", 256, "batch")
flags.DEFINE_integer("in_features", 768, "input size")
flags.DEFINE_enum("which", "fanin", ["fanin", "nm"], "the kernels to run")
flags.DEFINE_integer("tokens", 8192, "nm: tokens of dY (tokens, 4 * in_features), bf16")
FLAGS = flags.FLAGS


def _nm_calls():
  g = jax.random.normal(jax.random.key(2), (FLAGS.tokens, 4 * FLAGS.in_features), jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (FLAGS.tokens, FLAGS.in_features), jnp.bfloat16)
  key = jax.random.key_data(jax.random.key(3))
  calls = {f"mask {m // 2}:{m}": jax.jit(lambda x, g, k, m=m: nm.nm_prune_kernel(
      g, k, m=m, method="mvue", axis=0)) for m in (2, 4)}
  calls["fused dW 2:4"] = jax.jit(lambda x, g, k: nm.pruned_weight_grad(x, g, k, m=4,
                                                                        method="mvue"))
  return (x, g, key), calls


def _fanin_calls():
  layer = sj.FixedFanIn.init(FLAGS.in_features, FLAGS.out, FLAGS.fan_in, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (FLAGS.batch, FLAGS.in_features))
  g = jax.random.normal(jax.random.key(2), (FLAGS.batch, FLAGS.out))
  args = (x, g, layer.values, layer.indices)  # arguments, not constants baked into the code
  calls = {
      "forward": jax.jit(lambda x, g, v, i: fanin.fanin_forward(x, v, i)),
      "dvalues": jax.jit(lambda x, g, v, i: fanin.fanin_dvalues(x, g, i,
                                                                values_dtype=jnp.float32)),
      "dx": jax.jit(lambda x, g, v, i: fanin.fanin_dx(g, v, i, in_features=x.shape[1])),
  }
  return args, calls


def main(argv):
  del argv
  args, calls = _nm_calls() if FLAGS.which == "nm" else _fanin_calls()
  compiled = {name: fn.lower(*args).compile() for name, fn in calls.items()}
  for name, fn in compiled.items():
    jax.block_until_ready(fn(*args))
    print(f"ran {name}")


if __name__ == "__main__":
  app.run(main)
