"""The SμPar transfer sweep: the GPT's per-layer SμPar table, the analysis, and a tiny run."""

import collections
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax as sj
from experiments.common.byte_lm import ByteLM
from experiments.supar import groups, sweep
from sparsejax._tree import path_name
from sparsejax.data import stdlib_byte_corpus
from sparsejax.supar import ParamSpec

_TINY = sweep.Config(width=16, base_width=8, depth=1, heads=2, context=16, batch=4, steps=4,
                     warmup=1, densities=(0.5,), parameterizations=("sp", "supar"),
                     proxy_log2_lrs=(-6,), proxy_alpha_in=(1, 4), lr_steps=(-1, 0, 1), seeds=1,
                     train_bytes=100_000, val_bytes=20_000, val_batches=1, coord_steps=1,
                     coord_seeds=1)

# Attention q/k/v/o at density 1/2, MLP at 1/8; width 32 vs base 8, so m_d = 4.
_WIDTH, _BASE, _S, _ATTENTION, _MLP = 32, 8, 0.05, 0.5, 0.125


def _spec_table(name, role, rho):
  """(init std, Adam LR multiplier) straight from the table of ``docs/methods.md``, "SμPar"."""
  m_d = _WIDTH / _BASE
  if role != "hidden":
    return _S, 1.0
  var = {"sp": _S**2, "mup": _S**2 / m_d, "supar": _S**2 / (m_d * rho)}[name]
  lr = {"sp": 1.0, "mup": 1 / m_d, "supar": 1 / (m_d * rho)}[name]
  return math.sqrt(var), lr


@pytest.mark.parametrize("layer", sweep.LAYERS)
@pytest.mark.parametrize("name", ["sp", "mup", "supar"])
def test_gpt_multipliers_and_init_follow_the_spec_table_with_mixed_densities(name, layer):
  config = sweep.Config(depth=2, heads=2, context=16, layer=layer, init_std=_S, warmup=0)
  p = sj.SuPar(name, width=_WIDTH, base_width=_BASE, init_std=_S, alpha_in=2.0, alpha_out=3.0)
  model, specs = sweep.build_model(config, p, _MLP, attention_density=_ATTENTION,
                                   key=jax.random.key(0))
  weight = "weight" if layer == "masked" else "values"
  want = {"embed/embedding": ParamSpec("embedding"), "position": ParamSpec("embedding"),
          "head/kernel": ParamSpec("output")}
  for i in range(2):
    want |= {f"blocks/{i}/{n}/{weight}": ParamSpec("hidden", rho)
             for n, rho in (("qkv", _ATTENTION), ("proj", _ATTENTION), ("fc", _MLP),
                            ("out", _MLP))}
  assert {k: v for k, v in specs.items() if v.role != "vector"} == want
  assert all(k.endswith(("bias", "scale")) for k, v in specs.items() if v.role == "vector")

  # Init stds, pooled over the blocks; vector-like parameters keep their ones/zeros.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  flat = {path_name(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  for group in ("embed/embedding", "position", "head/kernel", "qkv", "proj", "fc", "out"):
    names = [k for k in want if k == group or f"/{group}/" in k]
    std = np.std(np.concatenate([flat[k].ravel() for k in names]))
    assert std == pytest.approx(_spec_table(name, *want[names[0]])[0], rel=0.1), group
  assert all(np.all(flat[k] == (1 if k.endswith("scale") else 0))
             for k, v in specs.items() if v.role == "vector")

  # The optimizer's per-layer LR multipliers: Adam's first update of constant gradients
  # is +-1 per weight, so each leaf's update is its multiplier (times the schedule, 1).
  tx = sweep.make_optimizer(specs, p, config)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    spec = specs[path_name(path)]
    np.testing.assert_allclose(update, _spec_table(name, spec.role, spec.density)[1], rtol=1e-5)

  # Forward multipliers, and the logits really are scaled.
  sp = name == "sp"
  assert model.embedding_multiplier == (1.0 if sp else 2.0)
  assert model.output_multiplier == (1.0 if sp else 3.0 / 4)
  d_head = _WIDTH // 2
  assert all(b.attention_scale == pytest.approx(d_head ** (-0.5 if sp else -1.0))
             for b in model.blocks)
  logits, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
      jnp.zeros((1, 8), jnp.int32))
  np.testing.assert_allclose(logits, model.output_multiplier * captured["head"]["__call__"][0],
                             rtol=1e-6)


def test_byte_lm_checks_the_parameterization_width():
  with pytest.raises(ValueError, match="parameterization width 64 != model width 32"):
    ByteLM(width=32, parameterization=sj.SuPar(width=64), rngs=nnx.Rngs(0))


def _rows(name, density, optimum, seeds=(0, 1)):
  """Synthetic sweep rows: a parabola in the grid step with its minimum at ``optimum``."""
  return [dict(stage="sweep", parameterization=name, width=64, alpha_in=1.0, density=density,
               layer="masked",
               lr=1e-3 * 2.0**k, seed=s, train_loss=0.0, lr_step=k,
               val_loss=2.0 + 0.01 * (k - optimum) ** 2 + (1 - density) * (name == "sp") + s)
          for k in range(-2, 3) for s in seeds]


def test_optimum_table_drift_and_gaps():
  rows = (_rows("sp", 1.0, 0) + _rows("sp", 0.25, 2) + _rows("supar", 1.0, 0)
          + _rows("supar", 0.25, 0))
  rows[-1]["val_loss"] = math.nan  # one diverged seed rules its LR out
  table = sweep.optimum_table(rows)
  cell = {(r["parameterization"], r["density"]): r for r in table}
  assert cell["sp", 0.25]["best_step"] == 2 and cell["sp", 0.25]["at_edge"]
  assert cell["sp", 0.25]["drift"] == 2 and cell["supar", 0.25]["drift"] == 0
  assert cell["sp", 0.25]["best_lr"] == pytest.approx(4e-3)
  assert cell["sp", 0.25]["base_loss"] == pytest.approx(2.5 + 0.75 + 0.04)
  o = sweep.outcome(table)
  assert o["drift"] == {"sp": (0, 2), "supar": (0, 0)} and o["sparsest"] == 0.25
  assert o["loss"]["sp"]["best"] - o["loss"]["supar"]["best"] == pytest.approx(0.75)
  text = sweep.markdown_tables(table)
  assert "| 1/4 | +2* (4.00e-03) | +0 (1.00e-03) |" in text
  assert any("optimal LR: SμPar 2.5000, SP 3.2500 nats/byte; SμPar is 0.7500 (23.1 %) lower"
             in line for line in sweep.outcome_lines(table))


def test_gap_tables_pair_seeds_within_and_across_densities():
  # Density 1 has seeds 0-2, density 1/4 seeds 0-1 for both: the gap to SμPar pairs within a
  # density, and the loss-vs-density gap pairs 1/4 with density 1 on seeds 0 and 1 only.
  rows = (_rows("sp", 1.0, 0, seeds=(0, 1, 2)) + _rows("sp", 0.25, 2)
          + _rows("supar", 1.0, 0, seeds=(0, 1, 2)) + _rows("supar", 0.25, 0))
  text = sweep.markdown_tables(sweep.optimum_table(rows))
  # SP − SμPar at 1/4, per seed: 0.79 at step 0, 0.75 at each optimum; % of SP's mean loss.
  assert "| 1/4 | +0.7900 ± 0.0000 (24.0 %) | +0.7500 ± 0.0000 (23.1 %) | 0, 1 |" in text
  assert "| 1 | +0.0000 ± 0.0000 (0.0 %) | +0.0000 ± 0.0000 (0.0 %) | 0, 1, 2 |" in text
  assert "| 1/4 | +0.7500 ± 0.0000 (0, 1) | +0.0000 ± 0.0000 (0, 1) |" in text
  one = sweep.markdown_tables(sweep.optimum_table(_rows("sp", 1.0, 0) + _rows("supar", 1.0, 0)))
  assert "Gap to SμPar" in one and "Loss vs density" not in one  # one density: nothing to pair


def test_tiny_sweep_stops_at_its_time_budget_resumes_and_writes_csv_plots_and_tables(tmp_path):
  # Nothing is timed before the first call (the proxy at alpha_in 1), so it runs; the
  # second would pass the budget. The partial sweep renders from runs.csv.
  partial = sweep.run(dataclasses.replace(_TINY, time_budget_s=1e-3), tmp_path, progress=False)
  assert [(r["stage"], r["alpha_in"]) for r in partial.rows] == [("proxy", 1)]
  assert sweep.pending_runs(_TINY, partial.rows, partial.alpha_in) == 1 + 6
  text = sweep.write_outputs(sweep.load_result(tmp_path), _TINY, tmp_path, "cmd", None)
  assert "**Partial**: 7 runs" in text and "No sweep runs yet" in text
  assert "redrawn from runs.csv" in text and (tmp_path / "lr_sweep.png").stat().st_size > 10_000
  with pytest.raises(ValueError, match="--steps"):
    sweep.run(dataclasses.replace(_TINY, steps=5), tmp_path, progress=False)
  first = (tmp_path / "runs.csv").read_text()

  result = sweep.run(_TINY, tmp_path, progress=False)
  assert (tmp_path / "runs.csv").read_text().startswith(first)  # appended, not retrained
  assert result.rows[0] == partial.rows[0]
  proxy = [r for r in result.rows if r["stage"] == "proxy"]
  swept = [r for r in result.rows if r["stage"] == "sweep"]
  assert [(r["alpha_in"], r["lr"], r["lr_step"]) for r in proxy] == [(1, 2.0**-6, -6),
                                                                     (4, 2.0**-6, -6)]
  assert result.base_lr == 2.0**-6 and result.alpha_in in (1, 4)
  assert {r["alpha_in"] for r in swept} == {result.alpha_in}
  assert len(swept) == 2 * 3  # parameterizations x LRs
  assert {r["lr_step"] for r in swept} == {-1, 0, 1}
  assert all(0 < r["val_loss"] < math.log(256) + 1 for r in result.rows)
  assert {r["layer"] for r in result.coord_rows} == {
      "embed", "logits", *(f"blocks/0/{n}" for n in ("qkv", "proj", "fc", "out"))}

  text = sweep.write_outputs(result, _TINY, tmp_path, "python -m experiments.supar.sweep", 1.0)
  for name in ("lr_sweep.png", "best_vs_density.png", "coord_check.png"):
    assert (tmp_path / name).stat().st_size > 10_000, name
  assert "Command: `python -m experiments.supar.sweep`" in text
  assert "| 1/2 |" in text and "SμPar" in text and "Coordinate check" in text
  assert (tmp_path / "sweep.md").read_text() == text
  again = sweep.load_result(tmp_path)
  assert (again.base_lr, again.alpha_in) == (result.base_lr, result.alpha_in)
  assert again.rows == result.rows and len(again.coord_rows) == len(result.coord_rows)
  assert sweep.pending_runs(_TINY, again.rows, again.alpha_in) == 0
  assert sweep.run(dataclasses.replace(_TINY, coord_steps=0), tmp_path,
                   progress=False).rows == result.rows  # nothing left to train


# Width 32 at density 1/8: every hidden layer reads <= 8 K inputs, so the CPU takes the
# fixed fan-in tile path, the one the GPU takes at every density.
_VMAP = sweep.Config(width=32, base_width=8, depth=1, heads=2, context=16, batch=4, steps=6,
                     warmup=2, layer="fixed_fanin", seeds=2, train_bytes=100_000,
                     val_bytes=20_000, val_batches=2)


def _alone(config, p, density, data, seed, lr):
  """(train loss, val loss) of one run trained without vmap, step by step of ``RunFns``."""
  model, specs = sweep.build_model(config, p, density, key=sweep._seed_keys(config, seed)[0])
  graphdef, params, rest = sweep.split_model(model)
  fns = sweep.run_fns(graphdef, sweep.make_optimizer(specs, p, config), config)
  train, opt_state, losses = jax.jit(fns.train), fns.init(params), []
  for start in range(0, config.steps, sweep.steps_per_call(config.steps)):
    (params, opt_state), loss = train(params, opt_state, rest, data.train,
                                      sweep._seed_keys(config, seed)[1], jnp.float32(lr),
                                      jnp.int32(start))
    losses.append(loss)
  tail = jnp.concatenate(losses)[-max(1, config.steps // 10):].mean()
  return float(tail), float(jax.jit(fns.evaluate)(params, rest, *data.val))


@pytest.mark.parametrize("layer, density, width", [
    ("fixed_fanin", 1 / 8, 32),
    pytest.param("fixed_fanin", 1 / 16, 64, marks=pytest.mark.slow),  # the CPU's gather path
    pytest.param("masked", 1 / 4, 32, marks=pytest.mark.slow)])
def test_vmapped_runs_match_runs_on_their_own(layer, density, width):
  config = dataclasses.replace(_VMAP, layer=layer, width=width)
  data = sweep.make_data(config, stdlib_byte_corpus(max_train_bytes=config.train_bytes,
                                                    max_val_bytes=config.val_bytes))
  p = sj.SuPar("supar", width=width, base_width=8, init_std=0.02)
  runs = [(seed, k, 2.0**k) for seed in (0, 1) for k in (-8, -5)]
  call = sweep.prepare_call(config, p, density, runs, data)
  rows = sweep.train_call(config, call, data, stage="sweep")
  assert [(r["seed"], r["lr_step"], r["runs_in_call"]) for r in rows] == [
      (seed, k, 4) for seed, k, _ in runs]
  got = [(r["train_loss"], r["val_loss"]) for r in rows]
  want = [_alone(config, p, density, data, seed, lr) for seed, _, lr in runs]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert len({v for _, v in got}) == 4  # seeds and LRs really differ


def test_a_seed_one_parameterization_has_alone_is_left_out_of_the_comparison():
  # SμPar has seed 2 at density 1/4, SP not yet: seed 2 (a much higher loss, + s) must not
  # enter SμPar's mean, and the gap lines pair seeds 0 and 1.
  rows = (_rows("sp", 1.0, 0) + _rows("sp", 0.25, 2) + _rows("supar", 1.0, 0)
          + _rows("supar", 0.25, 0, seeds=(0, 1, 2)))
  for r in rows:  # SμPar's seed 1 at its optimum: 0.1 better, so the paired gaps differ
    if (r["parameterization"], r["density"], r["lr_step"], r["seed"]) == ("supar", 0.25, 0, 1):
      r["val_loss"] -= 0.1
  proxy = dict(rows[0], stage="proxy", seed=5)
  assert sweep.paired_rows([proxy, *rows]) == [proxy, *(r for r in rows if r["seed"] != 2)]
  table = sweep.optimum_table(rows)
  cell = {(r["parameterization"], r["density"]): r for r in table}
  supar = cell["supar", 0.25]
  assert supar["seeds"] == [0, 1] and supar["left_out"] == [2]
  assert supar["best_loss"] == pytest.approx(2.45)
  assert supar["best_by_seed"] == pytest.approx({0: 2.0, 1: 2.9})
  assert cell["sp", 0.25]["left_out"] == []
  text = sweep.markdown_tables(table)
  assert "until every parameterization at that density has them: SμPar at 1/4: seed 2." in text
  assert "| 1/4 | +2* (4.00e-03) | +0 (1.00e-03) | 0, 1 |" in text
  # SP at its optimum (step 2) against SμPar at its own (step 0): 0.75 and 0.85 by seed.
  assert any("own optimal LR: SμPar 2.4500, SP 3.2500 nats/byte; SμPar is 0.8000 (24.6 %) "
             "lower (SP − SμPar per seed: +0.8000 ± 0.0707, seeds 0, 1)" in line
             for line in sweep.outcome_lines(table))
  # No seed in common at a density: an error, not a mean over different seeds.
  with pytest.raises(ValueError, match="density 1/4: no seed is trained at every LR by every "
                                       "parameterization"):
    sweep.optimum_table(_rows("sp", 0.25, 2, seeds=(0,)) + _rows("supar", 0.25, 0, seeds=(1,)))
  # A seed missing one LR is not complete either.
  with pytest.raises(ValueError, match="density 1/4: no seed"):
    sweep.optimum_table(_rows("sp", 0.25, 2, seeds=(0,))[1:] + _rows("supar", 0.25, 0, seeds=(0,)))


def test_partial_tables_mark_missing_cells():
  table = sweep.optimum_table(_rows("sp", 1.0, 0) + _rows("sp", 0.25, 2)
                              + _rows("supar", 1.0, 0))
  text = sweep.markdown_tables(table)
  assert "| 1/4 | +2* (4.00e-03) | — |" in text
  assert "| 1 | 0.0000 | 0.0000 |" not in text and "| 1 | 1.0000 | 1.0000 |" in text  # seed range


def test_groups_order_estimates_and_budget():
  assert groups.density_order([1, 1 / 8, 1 / 32, 1 / 128]) == [1 / 128, 1, 1 / 32, 1 / 8]
  assert groups.density_order([0.5]) == [0.5]
  assert groups.estimate_seconds(64, 1.0, []) is None
  timed = [groups.CallTime(16, 2.0, 10.0, 3.0), groups.CallTime(64, 4.0, 20.0, 5.0),
           groups.CallTime(16, 1.0, 1.0, 1.0), groups.CallTime(64, 4.0, 8.0, 2.0)]
  assert groups.estimate_seconds(64, 8.0, timed) == 5.0 + 40.0  # width 64, slowest rate
  assert groups.estimate_seconds(32, 2.0, timed) == 3.0 + 10.0  # no width 32: all calls
  # Builds of 11-17 s and one contended 122 s (built while a call trained): 17 s, not 122.
  builds = [groups.CallTime(512, 1.0, 162.0, b) for b in (17.0, 11.0, 16.0, 122.0)]
  assert groups.estimate_seconds(512, 1.0, builds) == 17.0 + 162.0
  assert groups.fits(0.0, None, 1.0) and groups.fits(5.0, 100.0, 0.0)
  assert groups.fits(10.0, 10.0, 21.0) and not groups.fits(10.0, 10.0, 20.0)  # 10 % margin
  # Seed-major runs; calls round-robin over groups, so each group's seed 0 curve comes first.
  config = dataclasses.replace(_TINY, seeds=2, base_lr=0.01, models_per_call=3)
  pending = sweep._pending(config, set(), 1.0)
  assert pending[0][1] == [(-1, 0), (0, 0), (1, 0), (-1, 1), (0, 1), (1, 1)]
  calls = groups.interleaved_calls(pending, 3)
  assert [(g.parameterization, runs) for g, runs in calls] == [
      ("sp", [(-1, 0), (0, 0), (1, 0)]), ("supar", [(-1, 0), (0, 0), (1, 0)]),
      ("sp", [(-1, 1), (0, 1), (1, 1)]), ("supar", [(-1, 1), (0, 1), (1, 1)])]
  assert groups.interleaved_calls(pending, 0) == pending
  with pytest.raises(ValueError, match="runs per call"):
    groups.interleaved_calls(pending, -1)
  tiered = groups.interleaved_calls(pending, 3, tier=lambda g: g.parameterization == "supar")
  assert [(g.parameterization, runs[0][1]) for g, runs in tiered] == [
      ("sp", 0), ("sp", 1), ("supar", 0), ("supar", 1)]
  assert sweep.steps_per_call(2000) == 100 and sweep.steps_per_call(97) == 97
  assert sweep.steps_per_call(202) == 2


def test_flops_per_step_matches_xla_for_the_dense_model():
  config = sweep.Config(width=32, depth=2, heads=2, context=32, batch=4)
  p = sj.SuPar("sp", width=32, base_width=8)
  model, _ = sweep.build_model(config, p, 1.0, key=jax.random.key(0))
  graphdef, params, rest = sweep.split_model(model)
  tokens = jnp.zeros((config.batch, config.context), jnp.int32)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  cost = jax.jit(jax.value_and_grad(loss)).lower(params).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  ours = groups.flops_per_step(width=32, depth=2, context=32, batch=4)
  assert 1.0 <= xla / ours <= 1.2  # XLA also counts the elementwise work


@pytest.mark.parametrize("layer", sweep.LAYERS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_training_step_multiplies_in_the_compute_dtype(layer, dtype):
  # nnx.Embed casts its rows to float32, which once made every matmul of a bfloat16 run
  # float32. Attention scores come out in float32 (jax.nn.dot_product_attention), so its
  # backward mixes dtypes; no matmul may have float32 on both sides under bfloat16.
  config = sweep.Config(width=32, base_width=8, heads=2, context=16, batch=2, steps=2,
                        warmup=1, layer=layer, dtype=dtype)
  p = sj.SuPar("supar", width=32, base_width=8)
  model, specs = sweep.build_model(config, p, 0.25, key=jax.random.key(0))
  graphdef, params, rest = sweep.split_model(model)
  fns = sweep.run_fns(graphdef, sweep.make_optimizer(specs, p, config), config)
  hlo = jax.jit(fns.train).lower(params, fns.init(params), rest, jnp.zeros(1000, jnp.uint8),
                                 jax.random.key(1), jnp.float32(1e-3), jnp.int32(0)).as_text()
  operands = collections.Counter(re.findall(
      r"stablehlo.dot_general.*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", hlo))
  short = {"bfloat16": "bf16", "float32": "f32"}[dtype]
  # 2 blocks x (4 layers x 3 matmuls) + the head's 3: the dense-layer matmuls of a step.
  assert operands[(short, short)] >= 27, operands
  if dtype == "bfloat16":
    assert operands[("f32", "f32")] == 0, operands


def test_runs_file_refuses_a_foreign_csv(tmp_path):
  (tmp_path / "runs.csv").write_text("stage,lr\nsweep,0.1\n")
  with pytest.raises(ValueError, match="not a resumable sweep"):
    groups.RunsFile(tmp_path / "runs.csv")
