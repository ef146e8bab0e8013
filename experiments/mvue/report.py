"""RESULTS.md and curves.png of the N:M-gradient experiment, from its CSVs alone.

``python -m experiments.mvue.report DIR [CONFIG_ID]`` re-renders ``DIR`` from
``runs.csv``, ``curves.csv`` and (if present) ``variance.csv``, as written by
``experiments.mvue.train``; partial results (fewer seeds for some methods,
missing methods) render too, with their seed counts.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import numpy as np

from ..common.tables import mean_std

__all__ = ["read_csv", "final_table", "variance_tables", "render"]


def read_csv(path: pathlib.Path) -> list[dict]:
  """Rows of a CSV as dicts of strings; ``[]`` when the file does not exist."""
  if not path.exists():
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def final_table(runs: list[dict]) -> list[dict]:
  """Per method: seeds, final train/val loss over seeds and the paired val gap to dense.

  The gap of seed ``s`` is the method's final val loss minus dense's of the same
  seed; seeds without a dense run are left out of it.
  """
  dense = {r["seed"]: float(r["final_val_loss"]) for r in runs if r["method"] == "dense"}
  out = []
  for method in dict.fromkeys(r["method"] for r in runs):
    rows = [r for r in runs if r["method"] == method]
    gaps = [float(r["final_val_loss"]) - dense[r["seed"]] for r in rows if r["seed"] in dense]
    out.append(dict(method=method, seeds=len(rows),
                    train=[float(r["final_train_loss"]) for r in rows],
                    val=[float(r["final_val_loss"]) for r in rows], gap=gaps,
                    seconds=float(np.mean([float(r["seconds"]) for r in rows]))))
  return out


def variance_tables(rows: list[dict]) -> str:
  """Markdown: per checkpoint and method, empirical / formula and the relative noise added.

  Sums over every layer's dY (one batch); the per-layer ratio range shows the
  worst layer. A second table gives the relative noise per layer type at the
  last checkpoint.
  """
  if not rows:
    return ""
  lines = ["| step | method | empirical / formula (all layers) | per-layer range | "
           "added noise E‖prune(dY) − dY‖² / ‖dY‖² |", "|---:|---|---:|---:|---:|"]
  for step in sorted({int(r["step"]) for r in rows}):
    for method in dict.fromkeys(r["method"] for r in rows):
      sel = [r for r in rows if int(r["step"]) == step and r["method"] == method]
      empirical = sum(float(r["empirical"]) for r in sel)
      norm2 = sum(float(r["dy_norm2"]) for r in sel)
      if sel[0]["formula"]:
        ratios = [float(r["ratio"]) for r in sel if r["ratio"]]
        total = empirical / sum(float(r["formula"]) for r in sel)
        ratio, spread = f"{total:.4f}", f"{min(ratios):.3f} – {max(ratios):.3f}"
      else:
        ratio, spread = "— (biased: squared error)", ""
      lines.append(f"| {step} | {method} | {ratio} | {spread} | {empirical / norm2:.4f} |")
  last = max(int(r["step"]) for r in rows)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  kinds = list(dict.fromkeys(r["layer"].split("/")[-1] for r in rows))
  lines += ["", f"Added noise E‖prune(dY) − dY‖² / ‖dY‖² per layer type at step {last} "
            "(sums over blocks):", "",
            "| layer | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
  for kind in kinds:
    cells = []
    for method in methods:
      sel = [r for r in rows if int(r["step"]) == last and r["method"] == method
             and r["layer"].split("/")[-1] == kind]
      cells.append(f"{sum(float(r['empirical']) for r in sel) / sum(float(r['dy_norm2']) for r in sel):.4f}")
    lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _plot(curves: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for method in dict.fromkeys(r["method"] for r in curves):
    rows = [r for r in curves if r["method"] == method]
    steps = sorted({int(r["step"]) for r in rows})
    for ax, key in zip(axes, ("train_loss", "val_loss")):
      values = [[float(r[key]) for r in rows if int(r["step"]) == s] for s in steps]
      mean = np.array([np.mean(v) for v in values])
      line, = ax.plot(steps, mean, label=f"{method} ({len(values[-1])} seeds)",
                      linestyle="--" if method.startswith("greedy") else "-")
      ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                      color=line.get_color(), alpha=0.2, linewidth=0)
  for ax, title in zip(axes, ("train loss", "validation loss")):
    ax.set(title=f"{title} (mean, band: min–max over seeds)", xlabel="step",
           ylabel="cross-entropy (nats/byte)")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def render(out_dir: pathlib.Path, config_id: str | None = None) -> str:
  """Writes ``RESULTS.md`` and ``curves.png`` of one configuration; returns the loss table.

  Arguments:
    out_dir: the folder of ``runs.csv``, ``curves.csv`` (and ``variance.csv``).
    config_id: which configuration (default: that of the last row of ``runs.csv``).
  """
  runs = read_csv(out_dir / "runs.csv")
  if not runs:
    raise ValueError(f"{out_dir / 'runs.csv'} holds no finished run")
  config_id = config_id or runs[-1]["config_id"]
  runs = [r for r in runs if r["config_id"] == config_id]
  if not runs:
    raise ValueError(f"{out_dir / 'runs.csv'} has no run of config {config_id}")
  curves = [r for r in read_csv(out_dir / "curves.csv") if r["config_id"] == config_id]
  finished = {(r["method"], r["seed"]) for r in runs}
  curves = [r for r in curves if (r["method"], r["seed"]) in finished]
  variances = [r for r in read_csv(out_dir / "variance.csv") if r["config_id"] == config_id]
  _plot(curves, out_dir / "curves.png")

  lines = ["| method | seeds | final train loss | final val loss | val gap to dense (paired) "
           "| s per run |", "|---|---:|---:|---:|---:|---:|"]
  for r in final_table(runs):
    gap = mean_std(r["gap"], 4, "+") if r["gap"] else ""
    lines.append(f"| {r['method']} | {r['seeds']} | {mean_std(r['train'], 4)} | "
                 f"{mean_std(r['val'], 4)} | {gap} | {r['seconds']:.0f} |")
  table = "\n".join(lines)
  config = json.loads(runs[-1]["config"])
  commands = "\n".join(f"  - `{c}`" for c in dict.fromkeys(r["command"] for r in runs))
  devices = ", ".join(dict.fromkeys(r["device"] for r in runs))
  variance = variance_tables(variances)
  text = ("# N:M-pruned neural gradients: final losses\n\n"
          f"- Command(s), each a resumed invocation of the same config:\n{commands}\n"
          f"- Config {config_id}: {config}\n"
          f"- Device: {devices}\n"
          "- Losses: cross-entropy in nats per byte, mean of the last logging window (train) "
          f"and of {config['val_batches']} fixed validation batches (val); mean ± sample std "
          "over seeds. The gap to dense is paired by seed.\n\n" + table
          + "\n\n![curves](curves.png)\n")
  if variance:
    text += ("\n## Variance of the pruned gradient on real dY\n\n"
             f"dY of every layer of the first dense run, on one batch, pruned along the tokens "
             f"with {config['variance_draws']} keys (`experiments.mvue.variance`). "
             "The formula is sum_i x_i² (1/p_i − 1) with each method's inclusion "
             "probabilities.\n\n" + variance + "\n")
  (out_dir / "RESULTS.md").write_text(text)
  return table


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    sys.exit("usage: python -m experiments.mvue.report DIR [CONFIG_ID]")
  print(render(pathlib.Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else None))
