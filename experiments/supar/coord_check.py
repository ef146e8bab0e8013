"""SμPar coordinate check on a sparse MLP built with sparsejax layers, or on the byte GPT.

``python -m experiments.supar.coord_check`` trains, for each parameterization
(SP, μP, SμPar), width and hidden density, a few Adam steps of an MLP

  x -> embedding (dense, alpha_in) -> [sparse hidden -> ReLU] x depth -> output (alpha_out / m_d)

(or, with ``--model gpt``, of the byte-level GPT of ``experiments/supar/sweep.py``
on a fixed batch of standard-library windows) on one fixed batch, records
every layer's mean |activation| per step (``sparsejax.supar.coord_check``), and
writes ``coord_check.csv`` and ``coord_check.png`` (one panel per
parameterization, x = density on a log2 axis, one line per layer at the last
step). Under SμPar the lines are flat; under SP and μP the hidden activations
fall with density.

For the GPT it also writes ``update_split.csv``: the first Adam step's change of
each q/k/v and MLP layer split into the part that SμPar holds fixed (coherent:
the update aligned with the layer's input) and the part it does not
(incoherent, RMS ``C / sqrt(fan_in)``), which makes the ratio leave the
``(1/1.2, 1.2)`` band at small fan-in (``docs/supar_coord_check/RESULTS.md``).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx

import sparsejax as sj
from ..common import config_flags
from ..common.config_flags import field
from ..common.tables import write_csv
from sparsejax import supar
from .coord_output import plot

_LAYERS = ("fixed_fanin", "masked")
_MODELS = ("mlp", "gpt")


@dataclasses.dataclass(frozen=True)
class Config:
  """The check of ``build_mlp`` or the GPT: one flag per field (``common.config_flags``)."""
  model: str = field("mlp", "mlp (build_mlp) or gpt (the byte LM of experiments/supar/sweep.py)",
                     choices=_MODELS)
  parameterizations: tuple[str, ...] = field(supar.PARAMETERIZATIONS, "sp, mup, supar")
  widths: tuple[int, ...] = field((256,), "model widths", at_least=1)
  base_width: int = field(128, "width of the dense proxy", at_least=1)
  densities: tuple[float, ...] = field((1, 1 / 2, 1 / 4, 1 / 8, 1 / 16), "hidden densities",
                                       parse=float, format="{:g}".format, above=0, at_most=1)
  steps: int = field(3, "Adam steps", at_least=0)
  learning_rate: float = field(1e-2, "base learning rate", above=0)
  seeds: int = field(1, "seeds per setting", at_least=1)
  batch: int = field(256, "batch size (GPT: byte windows)", at_least=1)
  depth: int = field(2, "hidden layers (MLP) or transformer blocks (GPT)", at_least=1)
  layer: str = field("fixed_fanin", "hidden layer type", choices=_LAYERS)
  heads: int = field(2, "GPT: attention heads", at_least=1)
  context: int = field(64, "GPT: window length in bytes", at_least=2)
  alpha_in: float = field(16.0, "GPT: embedding multiplier alpha_in (the CPU sweep's proxy "
                          "chose 16, the H100 run's 4)", above=0)
  seed: int = field(0, "PRNG seed")


def build_mlp(p: sj.SuPar, density: float, *, key: jax.Array, in_dim: int = 64,
              classes: int = 16, depth: int = 2, layer: str = "fixed_fanin"
              ) -> supar.CoordCheckModel:
  """An MLP of width ``p.width`` whose ``depth`` hidden layers have ``density``.

  Hidden layers are ``FixedFanIn`` (fan-in ``round(density * width)``) or, with
  ``layer="masked"``, dense weights times a fixed mask of the same topology
  (the mask lives outside the params, so the optimizer never sees it). All
  weights are drawn by ``supar.initialize``; the output layer starts at zero,
  as μP recommends, so that logits at init do not depend on width.

  Returns:
    A ``CoordCheckModel``; ``forward`` returns softmax cross-entropy and the
    outputs of ``embed``, ``hidden_i`` (before ReLU) and ``output``.
  """
  if layer not in _LAYERS:
    raise ValueError(f"layer must be one of {_LAYERS}, got {layer!r}")
  width = p.width
  fan_in = max(1, round(density * width))
  keys = jax.random.split(key, depth + 1)
  params, masks = {"embed": jnp.zeros((in_dim, width))}, {}
  for i in range(depth):
    hidden = sj.FixedFanIn.init(width, width, fan_in, key=keys[i])
    if layer == "masked":
      masks[f"hidden_{i}"] = hidden.to_mask()
      params[f"hidden_{i}"] = {"weight": hidden.to_dense(), "bias": hidden.bias}
    else:
      params[f"hidden_{i}"] = hidden
  params["output"] = jnp.zeros((width, classes))
  specs = supar.infer_specs(params, roles={"^embed": "embedding", "^output": "output"},
                            densities={"^hidden_.*/weight": fan_in / width})
  params = supar.initialize(params, specs, p, key=keys[-1])
  params["output"] = jnp.zeros((width, classes))

  def forward(params, batch):
    x, labels = batch
    acts = {"embed": p.embedding_multiplier * (x @ params["embed"])}
    h = jax.nn.relu(acts["embed"])
    for i in range(depth):
      name, layer_params = f"hidden_{i}", params[f"hidden_{i}"]
      if name in masks:
        acts[name] = h @ jnp.where(masks[name], layer_params["weight"], 0) + layer_params["bias"]
      else:
        acts[name] = layer_params(h)
      h = jax.nn.relu(acts[name])
    acts["output"] = p.output_multiplier * (h @ params["output"])
    loss = optax.softmax_cross_entropy_with_integer_labels(acts["output"], labels).mean()
    return loss, acts

  return supar.CoordCheckModel(params, specs, forward)


def fixed_batch(key: jax.Array, size: int = 256, in_dim: int = 64, classes: int = 16):
  """Standard normal inputs and random labels: ``(size, in_dim)``, ``(size,)``."""
  x_key, y_key = jax.random.split(key)
  return jax.random.normal(x_key, (size, in_dim)), jax.random.randint(y_key, (size,), 0, classes)


def run(config: Config = Config(), *, init_std: float | None = None) -> list[dict]:
  """The coordinate check of ``build_mlp`` or the GPT; returns ``supar.coord_check`` rows.

  ``init_std`` is the MLP's base std ``s`` (default ``base_width^-1/2``); the
  GPT keeps the sweep's 0.02.
  """
  if config.model == "gpt":
    from . import sweep  # sweep imports this module
    corpus = _gpt_corpus()
    return [row for width in config.widths
            for row in sweep.gpt_coord_check(_sweep_config(config, width), corpus,
                                             config.alpha_in)]
  data_key, model_key = jax.random.split(jax.random.key(config.seed))
  base = sj.SuPar(width=config.base_width, base_width=config.base_width,
                  init_std=init_std or config.base_width ** -0.5)
  return supar.coord_check(
      lambda p, density, *, key: build_mlp(p, density, key=key, depth=config.depth,
                                           layer=config.layer),
      fixed_batch(data_key, config.batch), base=base,
      parameterizations=config.parameterizations, widths=config.widths,
      densities=config.densities, steps=config.steps, learning_rate=config.learning_rate,
      seeds=config.seeds, key=model_key)


def _gpt_corpus():
  """The sweep's training bytes (its default size), so the fixed batch is the sweep's."""
  from . import sweep
  return sj.data.stdlib_byte_corpus(max_train_bytes=sweep.Config().train_bytes, max_val_bytes=1)


def _sweep_config(config: Config, width: int):
  """The ``sweep.Config`` whose ``sweep.gpt_coord_check`` is this check at ``width``."""
  from . import sweep
  return sweep.Config(width=width, base_width=config.base_width, depth=config.depth,
                      heads=config.heads, context=config.context, batch=config.batch,
                      layer=config.layer, densities=config.densities,
                      parameterizations=config.parameterizations, coord_steps=config.steps,
                      coord_lr=config.learning_rate, coord_seeds=config.seeds, seed=config.seed)


# The GPT layers whose input is a module output the split can capture: (layer, its input).
_SPLIT_INPUTS = {"qkv": lambda block: block["norm1"], "fc": lambda block: block["norm2"],
                 "out": lambda block: jax.nn.gelu(block["fc"])}


def gpt_update_split(config: Config) -> list[dict]:
  """The GPT's first Adam step, per hidden layer: how much of its change SμPar controls.

  For each parameterization, width, density and seed, takes one step of the
  coordinate check's optimizer on its fixed batch. For every q/k/v and MLP
  layer with input ``x`` (the batch's, before the step) and weight change
  ``dW`` (masked entries stay 0), ``x @ dW`` sums ``fan_in`` terms per output:

  * coherent part: the update is aligned with ``x`` (it is built from it), so
    these terms add up, ``~ fan_in * lr``; μP/SμPar's LR ``1/(m_d m_rho)``
    holds it fixed across width and density.
  * incoherent part: the rest adds up like a random walk, ``~ sqrt(fan_in) *
    lr``, so under SμPar it grows as ``1/sqrt(fan_in)``; it vanishes next to
    the coherent part only when ``fan_in`` is large. Measured as
    ``x @ (dW * R)`` with random signs ``R`` (same entry sizes, no alignment).

  Returns:
    Rows ``{parameterization, width, density, seed, layer, fan_in, init_rms,
    update_rms, incoherent_rms, coherent_rms}``: RMS over tokens and outputs of
    ``x @ W0``, ``x @ dW``, ``x @ (dW * R)`` and ``sqrt(update^2 - incoherent^2)``.
  """
  from . import sweep
  if config.model != "gpt":
    raise ValueError(f"gpt_update_split needs model='gpt', got {config.model!r}")
  corpus, rows = _gpt_corpus(), []
  for width in config.widths:
    swept = _sweep_config(config, width)
    batch, model_key = sweep.gpt_coord_batch(swept, corpus)
    for name in config.parameterizations:
      p = sweep._parameterization(swept, name, width, config.alpha_in)
      for density in config.densities:
        split = None  # one compiled split per (parameterization, density), all seeds
        for seed in range(config.seeds):
          key = jax.random.fold_in(model_key, seed)
          model, specs = sweep.build_model(swept, p, density, key=key)
          graphdef, params, rest = sweep.split_model(model)
          if split is None:
            tx = supar.coord_check_optimizer(specs, p, learning_rate=config.learning_rate)
            split = jax.jit(lambda params, rest, key, graphdef=graphdef, tx=tx: _split(
                graphdef, params, rest, tx, batch, swept.depth, key=key))
          for layer, values in split(params, rest, jax.random.fold_in(key, 1)).items():
            init, update, incoherent = (float(v) for v in values)
            rows.append(dict(
                parameterization=name, width=width, density=density, seed=seed, layer=layer,
                # The MLP's out layer reads 4 * width inputs, qkv and fc read width.
                fan_in=max(1, round(density * (4 if layer.endswith("out") else 1) * width)),
                init_rms=init, update_rms=update, incoherent_rms=incoherent,
                coherent_rms=math.sqrt(max(0.0, update ** 2 - incoherent ** 2))))
  return rows


def _split(graphdef, params, rest, tx, batch, depth: int, *, key: jax.Array):
  """``{layer: (RMS of x @ W0, of x @ dW, of x @ (dW * R))}`` after one step of ``tx``."""
  tokens, targets = batch
  loss = lambda params: optax.softmax_cross_entropy_with_integer_labels(
      nnx.merge(graphdef, params, rest)(tokens), targets).mean()
  update, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  leaves, treedef = jax.tree.flatten(update)
  signs = jax.tree.unflatten(treedef, [
      jnp.where(jax.random.bernoulli(jax.random.fold_in(key, i), 0.5, u.shape), 1.0, -1.0)
      for i, u in enumerate(leaves)])

  def moved(signs):
    # Weights only: a bias change is not a sum over inputs.
    return nnx.merge(graphdef, jax.tree.map(
        lambda w, u, r: w + r * u if u.ndim >= 2 else w, params, update, signs), rest)

  before = nnx.merge(graphdef, params, rest)
  after, flipped = moved(jax.tree.map(jnp.ones_like, signs)), moved(signs)
  _, captured = nnx.capture(before, nnx.Intermediate, method_outputs=nnx.Intermediate)(tokens)
  captured = nnx.as_pure(captured)["blocks"]
  rms = lambda t: jnp.sqrt(jnp.mean(jnp.square(t)))
  out = {}
  for b in range(depth):
    outputs = {k: v["__call__"][0] for k, v in captured[b].items() if k != "__call__"}
    for layer, input_of in _SPLIT_INPUTS.items():
      x = input_of(outputs)
      h0 = getattr(before.blocks[b], layer)(x)
      out[f"blocks/{b}/{layer}"] = (rms(h0), rms(getattr(after.blocks[b], layer)(x) - h0),
                                    rms(getattr(flipped.blocks[b], layer)(x) - h0))
  return out


def split_table(rows: list[dict]) -> str:
  """``gpt_update_split`` rows as a markdown table, seed-averaged, layers pooled by kind.

  Columns: the coherent and incoherent RMS and ``incoherent * sqrt(fan_in)``
  (constant if the incoherent part is ``C / sqrt(fan_in)``).
  """
  groups = {}
  for r in rows:
    key = (r["parameterization"], r["width"], r["density"], r["layer"].rsplit("/", 1)[-1],
           r["fan_in"])
    groups.setdefault(key, []).append(r)
  lines = ["| parameterization | width | density | layer | fan-in | init | coherent | incoherent "
           "| incoherent x sqrt(fan-in) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
  for (name, width, density, layer, fan_in), group in groups.items():
    mean = lambda field: sum(r[field] for r in group) / len(group)
    lines.append(f"| {name} | {width} | {density:g} | {layer} | {fan_in} | {mean('init_rms'):.4f} "
                 f"| {mean('coherent_rms'):.4f} | {mean('incoherent_rms'):.4f} "
                 f"| {mean('incoherent_rms') * math.sqrt(fan_in):.3f} |")
  return "\n".join(lines)


def define_flags() -> None:
  """Flags of the script: one per ``Config`` field, plus ``output_dir``.

  Defined only when run, so that importing the module defines none.
  """
  config_flags.define_flags(Config)
  flags.DEFINE_string("output_dir", "runs/supar_coord_check", "where CSV and PNG go")


def main(argv):
  del argv
  config = config_flags.config_from_flags(Config)
  rows = run(config)
  out = pathlib.Path(flags.FLAGS.output_dir)
  write_csv(rows, out / "coord_check.csv")
  plot(rows, out / "coord_check.png")
  if config.model == "gpt":
    split = gpt_update_split(config)
    write_csv(split, out / "update_split.csv")
    print(split_table(split))
  # Reference: the smallest width at the highest density.
  reference = dict(width=min(r["width"] for r in rows), density=max(r["density"] for r in rows))
  steps = range(1, config.steps + 1)
  drift = supar.coord_check_drift(rows, steps=steps, **reference)
  print(f"worst ratio of any layer's mean |activation| to width={reference['width']}, "
        f"density={reference['density']:g}, steps 1-{config.steps}:")
  for name, ratio in drift.items():
    print(f"  {name:6s} {ratio:6.3f}")
  print("per setting, the worst layer and step:")
  spread, worst = lambda r: max(r["ratio"], 1 / r["ratio"]), {}
  for r in supar.coord_check_ratios(rows, steps=steps, **reference):
    key = (r["parameterization"], r["width"], r["density"])
    if key not in worst or spread(r) > spread(worst[key]):
      worst[key] = r
  for (name, width, density), r in worst.items():
    print(f"  {name:6s} width {width:5d} density {density:<9g} {r['ratio']:6.3f} "
          f"({r['layer']}, step {r['step']})")
  print(f"wrote {out / 'coord_check.csv'} and {out / 'coord_check.png'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
