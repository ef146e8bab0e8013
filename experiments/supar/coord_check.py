"""SμPar coordinate check on a sparse MLP built with sparsejax layers.

``python -m experiments.supar.coord_check`` trains, for each parameterization
(SP, μP, SμPar), width and hidden density, a few Adam steps of an MLP

  x -> embedding (dense, alpha_in) -> [sparse hidden -> ReLU] x depth -> output (alpha_out / m_d)

on one fixed batch, records every layer's mean |activation| per step
(``sparsejax.supar.coord_check``), and writes ``coord_check.csv`` and
``coord_check.png`` (one panel per parameterization, x = density on a log2
axis, one line per layer at the last step). Under SμPar the lines are flat;
under SP and μP the hidden activations fall with density.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import sparsejax as sj
from ..common import config_flags
from ..common.config_flags import field
from sparsejax import supar

_LAYERS = ("fixed_fanin", "masked")


@dataclasses.dataclass(frozen=True)
class Config:
  """The check of ``build_mlp``: one flag per field (``experiments.common.config_flags``)."""
  parameterizations: tuple[str, ...] = field(supar.PARAMETERIZATIONS, "sp, mup, supar")
  widths: tuple[int, ...] = field((256,), "model widths")
  base_width: int = field(128, "width of the dense proxy")
  densities: tuple[float, ...] = field((1, 1 / 2, 1 / 4, 1 / 8, 1 / 16), "hidden densities",
                                       parse=float, format="{:g}".format)
  steps: int = field(3, "Adam steps")
  learning_rate: float = field(1e-2, "base learning rate")
  seeds: int = field(1, "seeds per setting")
  batch: int = field(256, "batch size")
  layer: str = field("fixed_fanin", "hidden layer type", choices=_LAYERS)
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
  """The coordinate check of ``build_mlp``; returns ``supar.coord_check`` rows.

  ``init_std`` is the base std ``s`` (default ``base_width^-1/2``).
  """
  data_key, model_key = jax.random.split(jax.random.key(config.seed))
  base = sj.SuPar(width=config.base_width, base_width=config.base_width,
                  init_std=init_std or config.base_width ** -0.5)
  return supar.coord_check(
      lambda p, density, *, key: build_mlp(p, density, key=key, layer=config.layer),
      fixed_batch(data_key, config.batch), base=base,
      parameterizations=config.parameterizations, widths=config.widths,
      densities=config.densities, steps=config.steps, learning_rate=config.learning_rate,
      seeds=config.seeds, key=model_key)


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  """One panel per parameterization: mean |act| at the last step vs density (log2)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  names = list(dict.fromkeys(r["parameterization"] for r in rows))
  widths = sorted({r["width"] for r in rows})
  last = max(r["step"] for r in rows)
  fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False,
                           sharey=True)
  for ax, name in zip(axes[0], names):
    for width in widths:
      for layer in dict.fromkeys(r["layer"] for r in rows):
        pts = {}
        for r in rows:
          if (r["parameterization"], r["width"], r["layer"], r["step"]) == (name, width, layer,
                                                                            last):
            pts.setdefault(r["density"], []).append(r["mean_abs"])
        density = sorted(pts)
        ax.plot(np.log2(density), [np.mean(pts[d]) for d in density], marker="o",
                label=f"{layer}" + (f" d={width}" if len(widths) > 1 else ""))
    ax.set(title=f"{name} (step {last})", xlabel="log2 density", yscale="log")
  axes[0][0].set_ylabel("mean |activation|")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


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
  # Reference: the smallest width at the highest density.
  reference = dict(width=min(r["width"] for r in rows), density=max(r["density"] for r in rows))
  drift = supar.coord_check_drift(rows, steps=range(1, config.steps + 1), **reference)
  print(f"worst ratio of any layer's mean |activation| to width={reference['width']}, "
        f"density={reference['density']:g}, steps 1-{config.steps}:")
  for name, ratio in drift.items():
    print(f"  {name:6s} {ratio:6.3f}")
  print(f"wrote {out / 'coord_check.csv'} and {out / 'coord_check.png'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
