"""SμPar: the table of ``docs/methods.md`` ("SμPar"), spec inference, scale_by_supar, initialize
and the coordinate check."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax as sj
from experiments.supar import coord_check
from sparsejax import supar
from sparsejax.supar import ParamSpec


def _p(name, width=512, base=128, s=0.02):
  return sj.SuPar(name, width=width, base_width=base, init_std=s, alpha_in=3.0, alpha_out=5.0)


@pytest.mark.parametrize("name", ["sp", "mup", "supar"])
def test_multipliers_follow_the_spec_table(name):
  p, m_d, rho, s = _p(name), 4.0, 0.125, 0.02
  hidden, dense = ParamSpec("hidden", rho), ParamSpec("hidden", 1.0)
  want_var = {"sp": s**2, "mup": s**2 / m_d, "supar": s**2 / (m_d * rho)}[name]
  want_adam = {"sp": 1, "mup": 1 / m_d, "supar": 1 / (m_d * rho)}[name]
  want_sgd = {"sp": 1, "mup": 1, "supar": 1 / rho}[name]
  assert p.init_std_of(hidden) ** 2 == pytest.approx(want_var, rel=1e-12)
  assert p.lr_multiplier(hidden, "adam") == pytest.approx(want_adam, rel=1e-12)
  assert p.lr_multiplier(hidden, "sgd") == pytest.approx(want_sgd, rel=1e-12)
  assert p.init_std_of(dense) ** 2 == pytest.approx(s**2 / (1 if name == "sp" else m_d))
  for role in ("embedding", "output"):
    assert p.init_std_of(ParamSpec(role)) == s
    assert p.lr_multiplier(ParamSpec(role), "adam") == p.lr_multiplier(ParamSpec(role), "sgd") == 1
  assert p.init_std_of(ParamSpec("vector")) is None
  assert p.lr_multiplier(ParamSpec("vector")) == 1
  assert p.embedding_multiplier == (1 if name == "sp" else 3.0)
  assert p.output_multiplier == (1 if name == "sp" else 5.0 / m_d)
  assert p.attention_scale(64) == (1 / 8 if name == "sp" else 1 / 64)


def test_supar_with_density_one_is_mup():
  for role in supar.ROLES:
    spec = ParamSpec(role)
    for optimizer in ("adam", "sgd"):
      assert _p("supar").lr_multiplier(spec, optimizer) == _p("mup").lr_multiplier(spec, optimizer)
    assert _p("supar").init_std_of(spec) == _p("mup").init_std_of(spec)
  # A whole training run: identical bits.
  runs = [coord_check.run(coord_check.Config(parameterizations=(name,), widths=(256,),
                                             densities=(1.0,), steps=3))
          for name in ("supar", "mup")]
  assert [r["mean_abs"] for r in runs[0]] == [r["mean_abs"] for r in runs[1]]


def test_invalid_specs_and_parameterizations():
  with pytest.raises(ValueError, match="parameterization"):
    sj.SuPar("ntk")
  with pytest.raises(ValueError, match="width"):
    sj.SuPar(width=0)
  with pytest.raises(ValueError, match="role"):
    supar.spec_table({"w": ParamSpec("head")})
  with pytest.raises(ValueError, match="only hidden"):
    supar.spec_table({"w": ParamSpec("embedding", 0.5)})
  with pytest.raises(ValueError, match="density"):
    supar.spec_table({"w": ParamSpec("hidden", 0.0)})
  with pytest.raises(ValueError, match="optimizer"):
    sj.scale_by_supar({}, sj.SuPar(), optimizer="lion")
  with pytest.raises(ValueError, match="decay_coupling"):
    sj.scale_by_supar({}, sj.SuPar(), decay_coupling="both")


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(10, 32, rngs=rngs)
    self.sparse = sj.nn.FixedFanInLinear(32, 32, 8, rngs=rngs)
    self.masked = sj.nn.MaskedLinear(32, 32, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.head = nnx.Linear(32, 5, rngs=rngs)


def test_infer_specs_from_nnx_model_and_pytree():
  specs = supar.infer_specs(_Model(nnx.Rngs(0)), roles={"^embed": "embedding", "^head": "output"})
  assert specs == {
      "embed/bias": ParamSpec("vector"), "embed/kernel": ParamSpec("embedding"),
      "head/bias": ParamSpec("vector"), "head/kernel": ParamSpec("output"),
      "masked/bias": ParamSpec("vector"), "masked/weight": ParamSpec("hidden", 4 / 32),
      "norm/bias": ParamSpec("vector"), "norm/scale": ParamSpec("vector"),
      "sparse/bias": ParamSpec("vector"), "sparse/values": ParamSpec("hidden", 8 / 32)}
  key = jax.random.key(0)
  params = {"a": sj.FixedFanIn.init(64, 16, 4, key=key),
            "b": sj.MaskedDense.init(16, 8, 2, key=key), "c": jnp.ones((16, 16)), "d": jnp.ones(3)}
  specs = supar.infer_specs(params, densities={"^c$": 0.5})
  assert specs == {"a/values": ParamSpec("hidden", 4 / 64), "a/bias": ParamSpec("vector"),
                   "b/weight": ParamSpec("hidden", 2 / 16), "b/bias": ParamSpec("vector"),
                   "c": ParamSpec("hidden", 0.5), "d": ParamSpec("vector")}
  raw = {"layer": {"values": jnp.ones((4, 2)), "indices": jnp.zeros((4, 2), jnp.int32)}}
  with pytest.raises(ValueError, match="cannot tell the density of 'layer/values'"):
    supar.infer_specs(raw)
  assert supar.infer_specs(raw, densities={"layer": 0.25}) == {
      "layer/values": ParamSpec("hidden", 0.25)}


def _tree():
  key = jax.random.key(0)
  return {"emb": jax.random.normal(key, (4, 8)),
          "hid": sj.FixedFanIn.init(8, 8, 2, key=jax.random.key(1)),
          "out": jax.random.normal(jax.random.key(2), (8, 3))}


def _float_sum(params, scale=1.0):
  return scale * sum(jnp.sum(x) for x in jax.tree.leaves(params)
                     if jnp.issubdtype(x.dtype, jnp.floating))


def test_scale_by_supar_multiplies_each_leaf_and_decays_both_ways():
  params = _tree()
  specs = {"emb": "embedding", "hid": {"values": ParamSpec("hidden", 0.25), "bias": "vector"},
           "out": "output"}  # a params-shaped labels tree, like optax.multi_transform
  p = _p("supar", width=256, base=64)
  ones = jax.grad(_float_sum, allow_int=True)(params)  # float0 for the indices
  for optimizer, hidden_mult in (("adam", 1 / (4 * 0.25)), ("sgd", 1 / 0.25)):
    tx = sj.static_topology(sj.scale_by_supar(specs, p, optimizer=optimizer))
    updates, _ = jax.jit(tx.update)(ones, tx.init(params), params)
    assert np.allclose(updates["emb"], 1) and np.allclose(updates["out"], 1)
    np.testing.assert_allclose(updates["hid"].values, hidden_mult, rtol=1e-6)
    assert np.allclose(updates["hid"].bias, 1)
  zeros = jax.grad(_float_sum, allow_int=True)(params, 0.0)
  for coupling, hidden_decay in (("lr", 0.1 / (4 * 0.25)), ("independent", 0.1)):
    tx = sj.static_topology(sj.scale_by_supar(specs, p, weight_decay=0.1,
                                              decay_coupling=coupling))
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["hid"].values, hidden_decay * params["hid"].values,
                               rtol=1e-6)
    np.testing.assert_allclose(updates["emb"], 0.1 * params["emb"], rtol=1e-6)
    assert not np.any(updates["hid"].bias)  # vector-like: no decay
  tx = sj.scale_by_supar({"emb": "embedding"}, p)
  with pytest.raises(ValueError, match="no SμPar spec for parameter 'out'"):
    tx.update({"out": jnp.ones(3)}, tx.init(None))


def test_scale_by_supar_in_adamw_chain_matches_per_group_learning_rates():
  # optax.chain(scale_by_adam, scale_by_supar, -lr) == Adam with lr * multiplier per leaf.
  params = {"emb": jnp.ones((3, 4)), "hid": jnp.full((4, 4), 0.5)}
  specs = {"emb": ParamSpec("embedding"), "hid": ParamSpec("hidden", 0.5)}
  p = _p("supar", width=256, base=128)
  grads = {"emb": jnp.arange(12.0).reshape(3, 4), "hid": jnp.arange(16.0).reshape(4, 4) - 3}
  tx = optax.chain(optax.scale_by_adam(), sj.scale_by_supar(specs, p), optax.scale(-1e-2))
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, mult in (("emb", 1.0), ("hid", 1 / (2 * 0.5))):
    want, _ = optax.adam(1e-2 * mult).update({name: grads[name]},
                                             optax.adam(1.0).init({name: params[name]}))
    np.testing.assert_allclose(updates[name], want[name], rtol=1e-6)


def test_initialize_draws_each_role_with_its_std():
  p = _p("supar", width=256, base=64, s=0.1)
  params = {"emb": jnp.zeros((64, 256)), "hid": sj.FixedFanIn.init(256, 512,
                                                                    32, key=jax.random.key(0)),
            "out": jnp.zeros((256, 64)), "gain": jnp.ones(256)}
  specs = supar.infer_specs(params, roles={"emb": "embedding", "out": "output"})
  new = supar.initialize(params, specs, p, key=jax.random.key(1))
  assert np.std(new["emb"]) == pytest.approx(0.1, rel=0.03)
  assert np.std(new["out"]) == pytest.approx(0.1, rel=0.03)
  hidden_std = 0.1 / math.sqrt(4 * 32 / 256)
  assert np.std(new["hid"].values) == pytest.approx(hidden_std, rel=0.03)
  np.testing.assert_array_equal(new["hid"].indices, params["hid"].indices)
  np.testing.assert_array_equal(new["gain"], 1)
  again = supar.initialize(params, specs, p, key=jax.random.key(1))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(again)))


def test_coord_check_supar_is_stable_across_density_and_width_sp_is_not():
  rows = coord_check.run(coord_check.Config(parameterizations=("sp", "supar"), widths=(256,),
                                            densities=(1, 1 / 4, 1 / 16), seeds=2))
  worst = supar.coord_check_drift(rows, width=256, density=1)
  assert worst["supar"] < 1.2, worst
  assert worst["sp"] > 1.2, worst  # SP drifts: the same check can fail
  rows = coord_check.run(coord_check.Config(parameterizations=("sp", "supar"), widths=(128, 512),
                                            densities=(0.25,), seeds=3))
  worst = supar.coord_check_drift(rows, width=128, density=0.25)
  assert worst["supar"] < 1.2, worst
  assert worst["sp"] > 1.2, worst
  with pytest.raises(ValueError, match="no reference run at width=128, density=1"):
    supar.coord_check_drift(rows, width=128, density=1)


def test_coord_check_script_writes_csv_and_plot(tmp_path):
  rows = coord_check.run(coord_check.Config(widths=(64,), base_width=64, densities=(1, 0.25),
                                            steps=1, layer="masked", batch=32))
  assert {r["layer"] for r in rows} == {"embed", "hidden_0", "hidden_1", "output"}
  assert len(rows) == 3 * 2 * 2 * 4  # parameterizations x densities x steps x layers
  coord_check.write_csv(rows, tmp_path / "c.csv")
  coord_check.plot(rows, tmp_path / "c.png")
  assert (tmp_path / "c.csv").read_text().startswith("parameterization,width,density,seed,step")
  assert (tmp_path / "c.png").stat().st_size > 10_000


def _gpt(**kwargs):
  """A one-block byte GPT coordinate check (``experiments/supar/sweep.py``'s model), CPU-small."""
  return coord_check.Config(model="gpt", base_width=32, depth=1, heads=2, batch=8, context=32,
                            layer="masked", seeds=1, steps=3, **kwargs)


def test_gpt_coord_check_supar_stays_in_band_where_fan_in_is_large():
  # Density 1/4 of width 128: every hidden output reads >= 32 inputs (docs/supar_coord_check).
  rows = coord_check.run(_gpt(parameterizations=("supar",), widths=(128,), densities=(1, 0.25)))
  assert {r["layer"] for r in rows} >= {"embed", "blocks/0/qkv", "blocks/0/out", "logits"}
  worst = supar.coord_check_drift(rows, width=128, density=1)
  assert worst["supar"] < 1.2, worst


def test_gpt_first_update_supar_fixes_the_aligned_part_and_not_the_rest():
  """Why the GPT's ratio leaves the band at fan-in 4 (width 64, density 1/16): the part of
  ``x @ dW`` aligned with ``x`` is density-free under SμPar, the rest is ``C / sqrt(fan_in)``
  and at fan-in 4 outweighs it (docs/supar_coord_check/RESULTS.md)."""
  split = coord_check.gpt_update_split(_gpt(parameterizations=("supar",), widths=(64,),
                                            densities=(1, 1 / 16)))
  cell = {(r["density"], r["layer"]): r for r in split}
  for layer in ("blocks/0/qkv", "blocks/0/fc", "blocks/0/out"):
    dense, sparse = cell[1, layer], cell[1 / 16, layer]
    # Without m_rho in the LR this ratio would be 1/16.
    assert sparse["coherent_rms"] / dense["coherent_rms"] == pytest.approx(1, abs=0.25), layer
    scaled = [r["incoherent_rms"] * math.sqrt(r["fan_in"]) for r in (dense, sparse)]
    assert scaled[1] / scaled[0] == pytest.approx(1, abs=0.1), layer
  fc = cell[1 / 16, "blocks/0/fc"]
  assert fc["fan_in"] == 4 and fc["incoherent_rms"] > 2 * fc["coherent_rms"]
