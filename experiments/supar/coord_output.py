"""The coordinate check's figure.

Used by the check's driver (``coord_check``) and by the sweep (``sweep``), which runs the
GPT's check; a module of its own so that neither imports the other for it. Both write
the rows with ``experiments.common.tables.write_csv``.
"""

from __future__ import annotations

import pathlib

__all__ = ["plot"]


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
