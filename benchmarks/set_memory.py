"""Compiled memory of one SET optimizer step: rewiring in row blocks vs all rows at once.

``python benchmarks/set_memory.py [out] [fan_in] [in]`` compiles (does not run)
``optax.apply_updates(params, set_topology(adam).update(...))`` for a
``FixedFanIn`` layer with donated params and state, with
``sparsejax.rewiring._REWIRE_BLOCK_ELEMENTS`` (the CPU block size) at its default
and at "all rows in one block", and the same step under ``static_topology``, and
prints XLA's planned temporary memory (``sparsejax.memory.compiled_bytes``) as a
markdown table (pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import optax

import sparsejax as sj
from sparsejax import rewiring


def step_temp_bytes(tx, params) -> int:
  """Temporary bytes XLA plans for one donated ``tx`` step on ``params``."""
  grads = jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
                       if jnp.issubdtype(a.dtype, jnp.integer) else a, params)

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(1, 2)).lower(grads, tx.init(params), params).compile()
  return sj.memory.compiled_bytes(compiled)["temp_bytes"]


def main(out: int = 500_000, fan_in: int = 32, in_features: int = 128) -> None:
  params = {"clf": sj.FixedFanIn.init(in_features, out, fan_in, key=jax.random.key(0))}
  default = rewiring._REWIRE_BLOCK_ELEMENTS
  rows = []
  for label, block in (("SET, all rows in one block", 1 << 62),
                       (f"SET, blocks of {default:,} slots", default)):
    rewiring._REWIRE_BLOCK_ELEMENTS = block  # read when the step is traced
    tx = sj.set_topology(optax.adam(1e-3), key=jax.random.key(1), interval=10, end_step=100)
    rows.append((label, step_temp_bytes(tx, params)))
  rewiring._REWIRE_BLOCK_ELEMENTS = default
  rows.append(("static topology", step_temp_bytes(sj.static_topology(optax.adam(1e-3)), params)))
  print(f"Adam step of FixedFanIn(in={in_features}, out={out:,}, K={fan_in}), "
        f"{jax.devices()[0].platform}, jax {jax.__version__}:\n")
  print("| optimizer step | temporaries (MiB) |\n|---|---:|")
  for label, temp in rows:
    print(f"| {label} | {temp / 2**20:,.0f} |")


if __name__ == "__main__":
  main(*map(int, sys.argv[1:]))
