"""Pallas label-tile fixed fan-in kernels against a float64 reference.

On CPU (CI) they run in Pallas interpret mode. ``SPARSEJAX_TEST_COMPILED=1``
runs the same checks on the compiled kernels (on a GPU).
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _reference import fanin_reference, finite_rel_err
from sparsejax.kernels import fanin_tile

_ENTROPY = np.random.SeedSequence().entropy  # fresh inputs every run; printed on failure
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
_INTERPRET = os.environ.get("SPARSEJAX_TEST_COMPILED") != "1"
# The smallest blocks Triton's dot takes, 2 slots a step and 2 programs: several label
# blocks per program (so the slab's zero restore runs), ragged slot chunks, and for
# tile_dx several label splits where the grid is small.
_SMALL = fanin_tile.Tuning(block_rows=16, block_batch=16, block_in=16, block_slots=2,
                           programs=2)


def _case(in_features, out, fan_in, batch, dtype, index_dtype, rng=None):
  rng = rng or np.random.default_rng([_ENTROPY, in_features, out, fan_in, batch])
  cols = np.argsort(rng.random((out, in_features)), axis=1)[:, :fan_in]
  values = rng.standard_normal((out, fan_in))
  x, g = rng.standard_normal((batch, in_features)), rng.standard_normal((batch, out))
  return (jnp.asarray(x, dtype), jnp.asarray(values, dtype), jnp.asarray(cols, index_dtype),
          jnp.asarray(g, dtype))


def _run(x, values, indices, g, tuning=_SMALL):
  y = fanin_tile.tile_forward(x, values, indices, interpret=_INTERPRET, tuning=tuning)
  dx, dvalues = fanin_tile.tile_backward(x, g, values, indices, interpret=_INTERPRET,
                                         tuning=fanin_tile.BackwardTuning(tuning, tuning))
  return y, dvalues, dx


_CASES = [
    # in, out, K, batch, index dtype: ragged rows, batch and input blocks; exact block
    # multiples; K = in; K = 1 and batch 1; in > 65536 with int32 indices (fewer, larger
    # input blocks there, to keep interpret mode quick).
    (30, 21, 3, 19, jnp.int16, _SMALL), (64, 64, 8, 32, jnp.uint16, _SMALL),
    (16, 40, 16, 70, jnp.uint16, _SMALL), (8, 33, 1, 1, jnp.int16, _SMALL),
    (70_000, 9, 4, 3, jnp.int32, _SMALL._replace(block_in=512)),
]


@pytest.mark.parametrize("in_features, out, fan_in, batch, index_dtype, tuning", _CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tile_kernels_match_float64_reference(in_features, out, fan_in, batch, index_dtype,
                                              tuning, dtype):
  x, values, indices, g = _case(in_features, out, fan_in, batch, dtype, index_dtype)
  y, dvalues, dx = _run(x, values, indices, g, tuning)
  assert y.dtype == dtype and y.shape == (batch, out)
  assert dx.dtype == jnp.float32 and dx.shape == x.shape
  assert dvalues.dtype == jnp.float32 and dvalues.shape == values.shape
  errors = {name: finite_rel_err(got, want) for name, got, want in
            zip(("y", "dvalues", "dx"), (y, dvalues, dx), fanin_reference(x, values, indices, g))}
  assert max(errors.values()) < _TOL[dtype], (errors, "entropy", _ENTROPY)


def test_slab_is_restored_between_label_blocks():
  # One program, one label split: all 4 label blocks share a slab. Block 0 reads
  # columns 0..3 only and the later blocks never do, so a weight left behind in the
  # slab would add x[:, 0..3] terms to their outputs (and to dx's columns 0..3).
  in_features, out, fan_in, batch = 32, 64, 4, 20
  rng = np.random.default_rng([_ENTROPY, 1])
  first = np.tile(np.arange(fan_in), (16, 1))
  rest = 4 + np.argsort(rng.random((out - 16, in_features - 4)), axis=1)[:, :fan_in]
  x, values, _, g = _case(in_features, out, fan_in, batch, jnp.float32, jnp.uint16, rng)
  indices = jnp.asarray(np.concatenate([first, rest]), jnp.uint16)
  one = _SMALL._replace(programs=1)
  for got, want in zip(_run(x, values, indices, g, one), fanin_reference(x, values, indices, g)):
    assert finite_rel_err(got, want) < 1e-5, _ENTROPY


def test_mixed_dtypes_promote():
  # bfloat16 activations with float32 weights: bfloat16 dots, float32 result.
  x, values, indices, g = _case(24, 20, 5, 17, jnp.bfloat16, jnp.uint16)
  values = values.astype(jnp.float32)
  y, dvalues, dx = _run(x, values, indices, g)
  assert y.dtype == jnp.float32
  for got, want in zip((y, dvalues, dx), fanin_reference(x, values, indices, g)):
    assert finite_rel_err(got, want) < 1e-2, _ENTROPY


def test_block_sizes_must_be_powers_of_2():
  x, values, indices, _ = _case(16, 16, 2, 4, jnp.float32, jnp.uint16)
  with pytest.raises(ValueError, match="powers of 2"):
    fanin_tile.tile_forward(x, values, indices, interpret=True,
                            tuning=_SMALL._replace(block_in=24))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton(dtype):
  # The Triton lowering runs without a GPU (for compute capability 9.0): every kernel
  # at the default settings builds a Triton module. Compiling it to PTX needs one.
  batch, in_features, out, fan_in = 256, 768, 5000, 64
  x = jax.ShapeDtypeStruct((batch, in_features), dtype)
  values = jax.ShapeDtypeStruct((out, fan_in), dtype)
  indices = jax.ShapeDtypeStruct((out, fan_in), jnp.uint16)
  g = jax.ShapeDtypeStruct((batch, out), dtype)
  texts = [jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
           for f, args in ((fanin_tile.tile_forward, (x, values, indices)),
                           (fanin_tile.tile_backward, (x, g, values, indices)))]
  assert [t.count("__gpu$xla.gpu.triton") for t in texts] == [1, 2]


def _triton_module_text(f, *args, capsys, monkeypatch):
  """The Triton module text that ``f``'s pallas_calls lower to for CUDA (no GPU needed)."""
  from jax.experimental import pallas as pl
  monkeypatch.setattr(fanin_tile.pl, "pallas_call", functools.partial(pl.pallas_call,
                                                                       debug=True))
  capsys.readouterr()
  # A cached trace or lowering (an earlier test's) would skip the pallas_call's lowering.
  jax.clear_caches()
  jax.jit(f.__wrapped__).trace(*args).lower(lowering_platforms=("cuda",))
  text = capsys.readouterr().out
  return text[text.index("The Triton module"):]


@pytest.mark.parametrize("fan_in", [1, 64])  # one slot chunk: the case that failed compiled
def test_slab_scatter_is_a_masked_store(fan_in, capsys, monkeypatch):
  # The slab scatter (values, then the zero restore) is a masked tt.store with element
  # offsets ``row * C + col`` into the slab: lanes outside the block's range store nothing
  # (unmasked, they all wrote one shared dump row, a hot spot for tile_dx). The only
  # unmasked store is the slab's initial clear (a plain slice); y's store is masked too.
  batch, in_features, out = 256, 768, 5001
  x = jax.ShapeDtypeStruct((batch, in_features), jnp.bfloat16)
  values = jax.ShapeDtypeStruct((out, fan_in), jnp.bfloat16)
  indices = jax.ShapeDtypeStruct((out, fan_in), jnp.uint16)
  text = _triton_module_text(fanin_tile.tile_forward, x, values, indices, capsys=capsys,
                             monkeypatch=monkeypatch)
  stores = re.findall(r"tt\.store (%[\w]+), (%[\w]+)(, %[\w]+)? :", text)
  masked = [s for s in stores if s[2]]
  assert len(stores) == 4 and len(masked) == 3, stores
  # The scatter's offsets: the row index times the slab's row stride (C = 64), as i32.
  c = fanin_tile._blocks(fanin_tile.FORWARD_TILE_TUNING, out, batch, in_features,
                         fan_in).rows
  assert re.search(rf"arith\.constant {c} : i32", text)
  assert "tensor<64x%dx!tt.ptr<bf16>>" % min(fan_in, 64) in text


def _num_stages(f, *args):
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return [int(n) for n in re.findall(r"num_stages = (\d+) : i32", text)]


def test_no_pipelining_where_the_label_loop_is_innermost():
  # Compiled on an H200, K <= block_slots (one slot chunk, a loop Triton inlines) gave
  # y = 0 (one input and one batch block) and dx = 0 (always): the pipeliner prefetched the
  # next label block's slab tile before its scatter. Those kernels must run one stage.
  def shapes(batch, in_features, out, fan_in):
    return (jax.ShapeDtypeStruct((batch, in_features), jnp.bfloat16),
            jax.ShapeDtypeStruct((out, fan_in), jnp.bfloat16),
            jax.ShapeDtypeStruct((out, fan_in), jnp.uint16),
            jax.ShapeDtypeStruct((batch, out), jnp.bfloat16))

  x, values, indices, g = shapes(256, 768, 5000, 64)
  assert _num_stages(fanin_tile.tile_forward, x, values, indices) == [2]
  # tile_dx, then tile_dvalues (whose pipelined loops store nothing that they load).
  assert _num_stages(fanin_tile.tile_backward, x, g, values, indices) == [1, 2]
  x, values, indices, _ = shapes(1, 8, 33, 1)
  tiny = functools.partial(fanin_tile.tile_forward, tuning=_SMALL)
  assert _num_stages(tiny, x, values, indices) == [1]
