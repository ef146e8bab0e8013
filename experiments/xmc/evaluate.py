"""Evaluates a saved XMC run on a test file.

::

  python -m experiments.xmc.evaluate --run_dir runs/xmc [--test_file path/test.txt]
      [--propensity_a 0.5 --propensity_b 0.4] [--output results.json]

Rebuilds the run's model from its ``config.json``, loads the latest checkpoint
in ``run_dir/checkpoints`` onto one device (that of a run sharded with
``--mesh`` too: its padding rows are cut off), scores every point of the test
file (BoW format; by default the run's own test split) and prints P@k, nDCG@k
and PSP@k (k = 1, 3, 5) as a table. Inverse propensities come from the label counts of
the run's training split; ``A`` and ``B`` default to the run's. The result
also goes, as JSON, to ``--output`` (default ``run_dir/evaluation.json``).
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging
from flax import nnx

from experiments.xmc import train
from sparsejax.data.xmc import read_bow, steps_per_epoch
from sparsejax.xmc import (checkpoint_manager, evaluate, format_table, inverse_propensity,
                           resolve_compute_dtype, resolve_label_chunk, restore)

__all__ = ["evaluate_run", "define_flags", "main"]


def evaluate_run(run_dir, *, test_file=None, propensity_a: float | None = None,
                 propensity_b: float | None = None) -> dict:
  """Scores the latest checkpoint of a run on a test set.

  Arguments:
    run_dir: a ``train.run`` output directory (``config.json``, ``checkpoints/``).
    test_file: a BoW file with the run's number of labels, or None for the
      run's own test split.
    propensity_a, propensity_b: ``A``, ``B`` of the inverse propensities, or
      None for the run's.

  Returns:
    ``{"run_dir", "test_file", "step", "num_points", "propensity": {"a", "b"},
    "metrics": {"P@1": ..., ...}}`` with the metrics as fractions.
  """
  run_dir = pathlib.Path(run_dir)
  config = train.read_config(run_dir)
  train_set, test_set = train.load_data(config)
  if test_file is not None:
    test_set = read_bow(test_file)
  total_steps = config.epochs * steps_per_epoch(len(train_set), batch_size=config.batch_size)
  model, optimizer = train.build(config, train_set.num_features, train_set.num_labels,
                                 total_steps)
  model_def, model_state = nnx.split(model)
  _, opt_state = nnx.split(optimizer)
  step, _ = restore(checkpoint_manager(run_dir), model_state, opt_state)
  if step == 0:
    raise ValueError(f"{run_dir / 'checkpoints'} holds no checkpoint")
  a = config.propensity_a if propensity_a is None else propensity_a
  b = config.propensity_b if propensity_b is None else propensity_b
  metrics = evaluate(
      nnx.merge(model_def, model_state), test_set,
      inv_propensity=inverse_propensity(train_set.label_counts(), len(train_set), a=a, b=b),
      batch_size=config.eval_batch_size, label_chunk=resolve_label_chunk(config.label_chunk),
      compute_dtype=resolve_compute_dtype(config.compute_dtype))
  return {"run_dir": str(run_dir), "test_file": None if test_file is None else str(test_file),
          "step": step, "num_points": len(test_set), "propensity": {"a": a, "b": b},
          "metrics": metrics}


def define_flags() -> None:
  flags.DEFINE_string("run_dir", None, "output directory of a training run", required=True)
  flags.DEFINE_string("test_file", None, "BoW test file (default: the run's test split)")
  flags.DEFINE_float("propensity_a", None, "A of the inverse propensities (default: the run's)")
  flags.DEFINE_float("propensity_b", None, "B of the inverse propensities (default: the run's)")
  flags.DEFINE_string("output", None, "JSON file for the result (default: "
                      "run_dir/evaluation.json)")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  FLAGS = flags.FLAGS
  result = evaluate_run(FLAGS.run_dir, test_file=FLAGS.test_file,
                        propensity_a=FLAGS.propensity_a, propensity_b=FLAGS.propensity_b)
  output = pathlib.Path(FLAGS.output or pathlib.Path(FLAGS.run_dir) / "evaluation.json")
  output.write_text(json.dumps(result, indent=1) + "\n")
  print(f"step {result['step']}, {result['num_points']} points "
        f"(A = {result['propensity']['a']}, B = {result['propensity']['b']}):")
  print(format_table(result["metrics"]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
