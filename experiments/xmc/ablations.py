"""Ablations of the XMC recipe: named variants of the trainer's config, run side by side.

``python -m experiments.xmc.ablations --dataset=DIR --output_dir=runs/ablations/NAME
--rows=dense,sparse,... --base=epochs=20,batch_size=256`` trains every row (a
``train.Config`` with the row's settings over ``--base``) in its own directory
under ``--output_dir`` (a row that is done is not run again, one that was cut
off resumes), then writes ``ablations.csv`` and ``ablations.md``: per row its
settings, test P@1/3/5 and PSP@1/3/5, the final training loss, seconds per
epoch and the time and metric differences to the ``dense`` row. The rows are
``ROWS``; ``K`` is given as a share of the classifier's input width, so ``1/8``
holds at any ``embed_dim``.

Seeds: run the same rows with ``--base=...,seed=S`` into one output directory per
seed, then ``--combine=DIR_0,DIR_1,... --reference=ROW --output_dir=DIR`` writes
``ablations_seeds.md``: per row the mean ± sample std over seeds, and the gaps to
``ROW`` paired by seed.
"""

from __future__ import annotations

import fractions
import json
import pathlib
import sys
import time

import numpy as np
from absl import flags, logging

from sparsejax.xmc import inverse_propensity, score

from ..common import config_flags
from ..common.tables import mean_std, read_csv, write_csv
from . import train

__all__ = ["ROWS", "read_summaries", "row_config", "run", "seed_table", "table",
           "write_tables"]

# Each row's settings over the base config. ``density`` sets fan_in to that share of the
# classifier's input width (intermediate if set, else embed_dim). The rows named ``*_wide512``
# have the trainer's default recipe (K 64 = 1/8 of a 512-wide encoder); the others the encoder
# width of the trainer before it (128).
ROWS = {
    "popular": {},  # no model: every test point gets the most frequent training labels
    "dense": dict(fan_in=0, embed_dim=128),
    "sparse": dict(density="1/8", embed_dim=128),
    "sparse_static": dict(density="1/8", embed_dim=128, set_interval=0),
    "sparse_rigl": dict(density="1/8", embed_dim=128, regrowth="rigl"),
    "sparse_lr_x2": dict(density="1/8", embed_dim=128, classifier_lr=2e-2),
    "sparse_lr_x4": dict(density="1/8", embed_dim=128, classifier_lr=4e-2),
    "sparse_lr_x8": dict(density="1/8", embed_dim=128, classifier_lr=8e-2),
    "sparse_aux": dict(density="1/8", embed_dim=128, aux=True),
    "sparse_inter512": dict(density="1/8", embed_dim=128, intermediate=512),
    "sparse_wide512": dict(density="1/8", embed_dim=512),
    "dense_wide512": dict(fan_in=0, embed_dim=512),
    "sparse_set_fast": dict(density="1/8", embed_dim=128, set_interval=20, set_fraction=0.5),
    "sparse_rigl_lr_x4": dict(density="1/8", embed_dim=128, regrowth="rigl", classifier_lr=4e-2),
    "sparse_wide512_rigl_lr_x4": dict(density="1/8", embed_dim=512, regrowth="rigl",
                                      classifier_lr=4e-2),
    # The three methods together (docs/xmc/ALL_THREE.md): MVUE-pruned encoder gradients,
    # the fixed fan-in classifier under SET, SμPar's classifier init and LR; each alone too.
    "sparse_wide512_mvue": dict(density="1/8", embed_dim=512, grad_prune="mvue:1:2"),
    "sparse_wide512_supar": dict(density="1/8", embed_dim=512, supar=True),
    "sparse_wide512_all3": dict(density="1/8", embed_dim=512, grad_prune="mvue:1:2", supar=True),
    "dense_wide512_mvue": dict(fan_in=0, embed_dim=512, grad_prune="mvue:1:2"),
}


def _parse_value(text: str, default):
  if isinstance(default, bool):
    if text not in ("true", "false"):
      raise config_flags.ConfigError(f"a boolean setting must be true or false, got {text!r}")
    return text == "true"
  return type(default)(text)


def parse_settings(pairs) -> dict:
  """``["epochs=20", "aux=true"]`` as typed ``train.Config`` overrides."""
  defaults, out = train.Config(), {}
  for pair in pairs:
    name, _, value = pair.partition("=")
    if not hasattr(defaults, name) or not value:
      raise config_flags.ConfigError(f"--base: {pair!r} is not 'field=value' of a train.Config "
                                     "field")
    out[name] = _parse_value(value, getattr(defaults, name))
  return out


# The test metrics each summary holds, in percent.
_METRICS = ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5")


def row_config(name: str, base: dict, output_dir: pathlib.Path) -> train.Config:
  """The ``train.Config`` of row ``name`` over ``base``, in ``output_dir/name``."""
  if name not in ROWS:
    raise config_flags.ConfigError(f"--rows: unknown row {name!r}; the rows are "
                                   f"{', '.join(ROWS)}")
  settings = {**base, **ROWS[name]}
  density = settings.pop("density", None)
  if density is not None:
    width = settings.get("intermediate") or settings["embed_dim"]
    settings["fan_in"] = int(width * fractions.Fraction(density))
  return train.Config(**settings, output_dir=str(output_dir / name))


def run(rows: list[str], base: dict, output_dir: pathlib.Path,
        on_row=lambda summaries: None) -> list[dict]:
  """Trains every row (resuming where one stopped); returns one summary dict per row.

  ``on_row(summaries)`` is called after each row (to write the tables as they grow).
  """
  configs = [row_config(name, base, output_dir) for name in rows]  # all checked before work
  for config in configs:
    train.check_config(config)
  summaries = []
  for name, config in zip(rows, configs):
    print(f"== {name}: {ROWS[name]}", flush=True)
    results = _popular(config) if name == "popular" else train.run(config)
    epochs = results["epochs"]
    summaries.append(dict(
        row=name, settings=json.dumps(ROWS[name]), seed=config.seed,
        base=json.dumps({k: v for k, v in base.items() if k != "seed"}, sort_keys=True),
        fan_in=config.fan_in,
        **{m: round(100 * results["metrics"][m], 2) for m in _METRICS},
        final_loss=round(float(epochs[-1]["loss"]), 4) if epochs else None,
        seconds_per_epoch=round(results["seconds_per_epoch"], 2)
        if results["seconds_per_epoch"] else None,
        device=results["device"]))
    on_row(summaries)
  return summaries


def _popular(config: train.Config) -> dict:
  """The results of predicting the training set's most frequent labels for every test point."""
  data = train.load_data(config)
  counts = data.train.label_counts()
  top = np.argsort(-counts, kind="stable")[:config.predict_k]
  inv = inverse_propensity(counts, len(data.train), a=config.propensity_a, b=config.propensity_b)
  metrics = score(np.tile(top, (len(data.test), 1)), data.test, inv_propensity=inv)
  return dict(metrics=metrics, epochs=[], seconds_per_epoch=None, device="none (no model)")


def table(summaries: list[dict]) -> str:
  """The markdown table of ``run``'s summaries, with differences to the ``dense`` row."""
  dense = next((s for s in summaries if s["row"] == "dense"), None)
  lines = ["| row | K | P@1 | P@3 | P@5 | PSP@1 | PSP@3 | PSP@5 | Δ P@1 | Δ PSP@5 | final loss "
           "| s/epoch | time vs dense |", "|---|---:|" + "---:|" * 11]
  for s in summaries:
    delta = ("", "", "") if dense is None else (
        f"{s['P@1'] - dense['P@1']:+.2f}", f"{s['PSP@5'] - dense['PSP@5']:+.2f}",
        f"{s['seconds_per_epoch'] / dense['seconds_per_epoch']:.2f}x"
        if s["seconds_per_epoch"] and dense["seconds_per_epoch"] else "")
    if s["row"] == "popular":
      delta = ("", "", "")
    kind = "-" if s["row"] == "popular" else s["fan_in"] or "dense"
    lines.append(f"| {s['row']} | {kind} | {s['P@1']:.2f} | {s['P@3']:.2f} | "
                 f"{s['P@5']:.2f} | {s['PSP@1']:.2f} | {s['PSP@3']:.2f} | {s['PSP@5']:.2f} | "
                 f"{delta[0]} | {delta[1]} | {s['final_loss']} | {s['seconds_per_epoch']} | "
                 f"{delta[2]} |")
  return "\n".join(lines)


def write_tables(out: pathlib.Path, summaries: list[dict], header: str) -> None:
  """Writes ``run``'s summaries to ``out/ablations.csv`` and, under ``header``, ``ablations.md``."""
  write_csv(summaries, out / "ablations.csv")
  (out / "ablations.md").write_text(f"{header}\n\n{table(summaries)}\n")


def read_summaries(path: pathlib.Path) -> list[dict]:
  """The summaries of an ``ablations.csv`` written by ``main``, numbers as numbers."""
  if not path.is_file():
    raise config_flags.ConfigError(f"{path}: no such file (is its directory an ablations "
                                   "output_dir?)")
  rows = read_csv(path)
  if not rows or "seed" not in rows[0] or "base" not in rows[0]:
    raise config_flags.ConfigError(f"{path}: not an ablations.csv with seed and base columns "
                                   "(rerun its ablations command to rewrite it)")
  return rows


def seed_table(tables: list[list[dict]], reference: str) -> str:
  """Markdown table of several seeds' ``run`` summaries: mean ± sample std per row.

  Arguments:
    tables: one summary list per seed (``read_summaries`` of one output directory
      each), of the same base settings but the seed.
    reference: the row every row is compared with, seed by seed (the Δ columns
      are the mean ± std of the paired differences).

  Returns:
    One line per row, in the order the rows first appear.

  Raises:
    ConfigError: the tables differ in more than the seed, repeat a seed, or one
      lacks the reference row.
  """
  bases = {r["base"] for table in tables for r in table}
  if len(bases) > 1:
    raise config_flags.ConfigError(f"the tables differ in more than the seed: {sorted(bases)}")
  by_seed = {}
  for table in tables:
    seeds = {r["seed"] for r in table}
    if len(seeds) != 1 or seeds & by_seed.keys():
      raise config_flags.ConfigError(f"each table must hold one seed, not also in another: "
                                     f"seeds {sorted(seeds)}")
    rows = {r["row"]: r for r in table}
    if reference not in rows:
      raise config_flags.ConfigError(f"the table of seed {seeds.pop()} has no row {reference!r}")
    by_seed[seeds.pop()] = rows
  names = list(dict.fromkeys(r["row"] for table in tables for r in table))
  lines = [f"| row | seeds | {' | '.join(_METRICS)} | Δ P@5 vs {reference} "
           f"| Δ PSP@5 vs {reference} | s/epoch |", "|---|---:|" + "---:|" * 9]
  for name in names:
    runs = [(rows[name], rows[reference]) for rows in by_seed.values() if name in rows]
    cells = [mean_std([r[m] for r, _ in runs], 2) for m in _METRICS]
    cells += [mean_std([r[m] - ref[m] for r, ref in runs], 2, "+") for m in ("P@5", "PSP@5")]
    times = [r["seconds_per_epoch"] for r, _ in runs if r["seconds_per_epoch"]]
    cells.append(f"{np.mean(times):.1f}" if times else "")
    lines.append(f"| {name} | {len(runs)} | {' | '.join(cells)} |")
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("dataset", "synthetic", "'synthetic' or a dataset directory (see train)")
  flags.DEFINE_list("rows", ["dense", "sparse"], f"rows to run, of: {', '.join(ROWS)}")
  flags.DEFINE_list("base", [], "train.Config settings of every row, as field=value")
  flags.DEFINE_string("output_dir", "runs/ablations", "one directory per row, and the tables")
  flags.DEFINE_list("combine", [], "train nothing: combine the ablations.csv of these output "
                    "directories (one seed each) into output_dir/ablations_seeds.md")
  flags.DEFINE_string("reference", "dense", "with --combine: the row the others are compared with")
  flags.DEFINE_boolean("debug", False, "on an error, print its traceback (default: one line)")


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  with config_flags.one_line_errors(debug=FLAGS.debug):
    out = pathlib.Path(FLAGS.output_dir)
    base = {"dataset": FLAGS.dataset, **parse_settings(FLAGS.base)}
    start = time.time()
    command = "python -m experiments.xmc.ablations " + " ".join(sys.argv[1:])
    if FLAGS.combine:
      if FLAGS["rows"].present or FLAGS["base"].present:
        raise config_flags.ConfigError("--combine trains nothing: drop --rows and --base")
      text = seed_table([read_summaries(pathlib.Path(d) / "ablations.csv")
                         for d in FLAGS.combine], FLAGS.reference)
      out.mkdir(parents=True, exist_ok=True)
      (out / "ablations_seeds.md").write_text(f"Command: `{command}`\n\n{text}\n")
      print(text)
      return

    def write(summaries):
      write_tables(out, summaries, header=f"Command: `{command}`\n\nBase: {base}; device: "
                   f"{summaries[0]['device']}; {time.time() - start:.0f} s")

    print(table(run(FLAGS.rows, base, out, on_row=write)))


def run_script() -> None:
  """The console script: parses the flags and runs ``main``."""
  config_flags.launch(define_flags, main)


if __name__ == "__main__":
  run_script()
