"""Bookkeeping of a resumable sweep: run groups, their order, the runs file and the time budget.

A *group* is every run of the sweep that one compiled training step serves: one
(stage, parameterization, width, alpha_in, density), trained for all its seeds
and learning rates at once (``experiments.supar.sweep`` vmaps the step over
them). Finished runs are appended to ``runs.csv`` as each call ends, so a
sweep killed at a time limit keeps them, and a rerun of the same command
trains only the runs missing from the file. Nothing here touches JAX.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import statistics
from typing import NamedTuple

from ..common.tables import read_csv

# Columns of runs.csv, in order. ``lr_step`` is log2(lr / base LR) for the
# sweep and log2(lr) for the proxy (its grid is absolute, and the base LR is
# only known once the proxy is done). ``seconds`` is the wall time of the
# vmapped call that trained and evaluated the run, ``compile_seconds`` the
# time that built its models and compiled it (overlapped with the previous
# call's training when prefetched), ``runs_in_call`` how many runs it trained.
COLUMNS = ("stage", "parameterization", "width", "alpha_in", "density", "layer", "lr",
           "lr_step", "seed", "train_loss", "val_loss", "seconds", "compile_seconds",
           "runs_in_call", "device")
# Safety factor on a call's estimated time before the budget lets it start.
_ESTIMATE_MARGIN = 1.1


class Group(NamedTuple):
  """The runs that share one compiled step (one row key minus ``lr_step`` and ``seed``)."""
  stage: str
  parameterization: str
  width: int
  alpha_in: float
  density: float
  layer: str


def run_key(row: dict) -> tuple:
  """``(Group, lr_step, seed)`` of a runs.csv row: what a rerun looks up to skip it."""
  group = Group(row["stage"], row["parameterization"], int(row["width"]),
                float(row["alpha_in"]), float(row["density"]), row["layer"])
  return group, int(row["lr_step"]), int(row["seed"])


def density_order(densities) -> list[float]:
  """The most informative densities first: the sparsest, the densest, then the rest sparse to dense.

  The sparsest and densest settings give the drift of the optimal LR and the
  loss gap on their own; the middle ones refine the curve.
  """
  ordered = sorted(set(densities))
  return ordered[:1] + ordered[-1:] * (len(ordered) > 1) + ordered[1:-1]


def flops_per_step(*, width: int, depth: int, context: int, batch: int,
                   vocabulary: int = 256) -> float:
  """Training FLOPs of one step of one ``ByteLM`` (forward + backward, dense-equivalent).

  ``6 * params * tokens`` for the hidden layers (12 width^2 per block) and the
  head, plus ``12 * context * width`` per token and block for q.k and the
  attention-weighted values. Sparse layers are counted as dense: the GPU's
  fixed fan-in path (a dense tile per layer) does the dense FLOPs.
  """
  tokens = batch * context
  matmul = 6 * (12 * width**2 * depth + vocabulary * width)
  attention = 12 * context * width * depth
  return float(tokens * (matmul + attention))


class CallTime(NamedTuple):
  """A timed vmapped call: its width, FLOPs, training seconds and build/compile seconds."""
  width: int
  flops: float
  seconds: float
  compile_seconds: float


def interleaved_calls(pending: list[tuple[Group, list]], size: int, tier=lambda group: 0
                      ) -> list[tuple[Group, list]]:
  """Splits each group's runs into calls of ``size`` (0: the whole group), round-robin over groups.

  Within a tier, every group's first call comes before any group's second, so a
  sweep that a time budget stops has covered every group of the tier; with
  seed-major runs and ``size`` = the LR grid, each call is one seed's LR curve.
  A lower tier's calls all come first.

  Arguments:
    pending: ``(group, runs)`` in the order the groups should run.
    size: runs per call; 0 puts a whole group in one call.
    tier: group -> int.

  Returns:
    ``(group, runs of one call)`` in the order the calls run.

  Raises:
    ValueError: if ``size`` is negative.
  """
  if size < 0:
    raise ValueError(f"runs per call must be >= 0 (0: a whole group), got {size}")
  chunks = [(tier(group), i, g, (group, runs[i:i + (size or len(runs))]))
            for g, (group, runs) in enumerate(pending)
            for i in range(0, len(runs), size or len(runs))]
  return [call for *_, call in sorted(chunks, key=lambda c: c[:3])]


def estimate_seconds(width: int, flops: float, timed: list[CallTime]) -> float | None:
  """Estimated wall time of a call from the calls already timed (``None``: none timed yet).

  Pessimistic, so that a call that starts also ends in time: the upper median
  build and compile time, plus the FLOPs at the slowest rate, of the timed
  calls of the same width (sparse and dense calls differ in speed), else of
  all of them. Extrapolating from a narrower model overestimates too, since
  small models use an accelerator less well. Not the slowest build: a call
  built while the previous one trained records a contended build (H100,
  width 512: 122 s against 11-17 s built alone), and that maximum stopped a
  sweep with a whole call's time left.
  """
  if not timed:
    return None
  ref = [t for t in timed if t.width == width] or timed
  return (statistics.median_high(t.compile_seconds for t in ref)
          + flops * max(t.seconds / t.flops for t in ref))


def fits(elapsed: float, estimate: float | None, budget: float) -> bool:
  """Whether a call estimated at ``estimate`` s may start ``elapsed`` s into a ``budget`` s run.

  A budget of 0 is no limit; an unknown estimate (nothing timed yet) starts.
  """
  if budget <= 0 or estimate is None:
    return True
  return elapsed + _ESTIMATE_MARGIN * estimate <= budget


def timed_calls(rows: list[dict], flops_of) -> list[CallTime]:
  """The calls recorded in runs.csv rows, oldest first.

  Arguments:
    rows: rows with ``seconds``, ``compile_seconds`` and ``runs_in_call``
      (consecutive rows of one call share them).
    flops_of: ``width -> FLOPs of one run`` (all its steps).
  """
  calls, i = [], 0
  while i < len(rows):
    r = rows[i]
    n = int(r["runs_in_call"])
    calls.append(CallTime(int(r["width"]), n * flops_of(int(r["width"])), float(r["seconds"]),
                          float(r["compile_seconds"])))
    i += n
  return calls


class RunsFile:
  """``runs.csv``: rows appended as calls finish, read back on a rerun.

  Arguments:
    path: the CSV. A missing file starts empty; an existing one must have
      ``COLUMNS`` as its header (written by this class).
  """

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.rows: list[dict] = []
    if path.exists():
      with open(path, newline="") as f:
        header = next(csv.reader(f), None)
      if header is not None and tuple(header) != COLUMNS:
        raise ValueError(f"{path}: header {header} is not a resumable sweep's {list(COLUMNS)}; "
                         "use a fresh --output_dir")
      self.rows = read_csv(path) if header else []
    self.done = {run_key(r) for r in self.rows}

  def append(self, rows: list[dict]) -> None:
    """Appends ``rows`` (dicts with ``COLUMNS``) and flushes them to disk."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    new = not self.path.exists() or self.path.stat().st_size == 0
    with open(self.path, "a", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=COLUMNS)
      if new:
        writer.writeheader()
      writer.writerows(rows)
      f.flush()
      os.fsync(f.fileno())
    self.rows += rows
    self.done |= {run_key(r) for r in rows}


def check_resume(config, path: pathlib.Path, free: tuple[str, ...]) -> None:
  """Writes ``config`` to ``path`` (JSON), or checks it against the one there.

  Arguments:
    config: a dataclass ``Config``.
    path: ``config.json`` next to runs.csv.
    free: fields that may change between reruns: those that only choose which
      runs to do (the grids) or how (time budget, batching of runs).

  Raises:
    ValueError: naming the fields that differ from the stored config (the
      rows in runs.csv were trained under it).
  """
  fixed = {k: v for k, v in dataclasses.asdict(config).items() if k not in free}
  fixed = json.loads(json.dumps(fixed))  # tuples as lists, as stored
  if path.exists():
    stored = json.loads(path.read_text())
    differ = sorted(k for k in fixed if stored.get(k) != fixed[k]
                    and not _same_number(stored.get(k), fixed[k]))
    if differ:
      raise ValueError(f"{path.parent}/runs.csv was trained with other settings of "
                       + ", ".join(f"--{k} ({stored.get(k)!r}, now {fixed[k]!r})" for k in differ)
                       + "; use a fresh --output_dir or the stored settings")
  else:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fixed, indent=1) + "\n")


def _same_number(a, b) -> bool:
  return (isinstance(a, (int, float)) and isinstance(b, (int, float))
          and math.isclose(a, b, rel_tol=1e-12))
