"""Compiled memory of fwd+bwd stays far from dense (in x out) or (batch x out x K) sizes.

Nothing is allocated: the step is only lowered and compiled from shapes.
"""

import jax
import jax.numpy as jnp

import sparsejax as sj

IN, OUT, K, BATCH = 768, 1_000_000, 64, 32
LIMIT = IN * OUT * 4 // 4  # a quarter of one dense float32 (in, out) matrix


def _fwd_bwd(matmul):
  def step(x, values, indices):
    # sin() gives the (batch, out) output gradient its own buffer, so it is counted.
    loss = lambda x, v: jnp.sum(jnp.sin(matmul(x, v, indices)))
    y = matmul(x, values, indices)
    return y, jax.grad(loss, argnums=(0, 1))(x, values)
  return step


def _naive_matmul(x, values, indices):
  return jnp.einsum("bok,ok->bo", x[:, indices], values)  # builds (batch, out, K)


def _temp_plus_output(matmul):
  shapes = (jax.ShapeDtypeStruct((BATCH, IN), jnp.float32),
            jax.ShapeDtypeStruct((OUT, K), jnp.float32),
            jax.ShapeDtypeStruct((OUT, K), jnp.uint16))
  stats = jax.jit(_fwd_bwd(matmul)).lower(*shapes).compile().memory_analysis()
  return stats.temp_size_in_bytes + stats.output_size_in_bytes


def test_fixed_fanin_fwd_bwd_memory_below_quarter_dense():
  used = _temp_plus_output(sj.fixed_fanin_matmul)
  assert used < LIMIT, f"temp+output {used / 2**20:.0f} MiB >= {LIMIT / 2**20:.0f} MiB"


def test_the_bound_catches_a_batch_out_k_intermediate():
  # The same measurement rejects the textbook gather, so the test above can fail.
  assert _temp_plus_output(_naive_matmul) > LIMIT
