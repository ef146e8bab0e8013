"""Evaluates a saved XMC run on a test file and writes its predictions.

::

  python -m experiments.xmc.evaluate --run_dir runs/xmc [--test_file path/test.txt]
      [--propensity_a 0.5 --propensity_b 0.4] [--output results.json]
      [--predictions path]

Rebuilds the run's model from its ``config.json`` (or, without one, the
configuration its checkpoints hold), loads the newest intact checkpoint (checked
against its checksums) onto one device (that of a run sharded with ``--mesh``
too: its padding rows are cut off), scores every point of the test file (BoW
format; by default the run's own test split) and prints P@k, nDCG@k and PSP@k
(k = 1, 3, 5) as a table. Inverse propensities come from the label counts of the
run's training split; ``A`` and ``B`` default to the run's. The result also goes,
as JSON, to ``--output`` (default ``run_dir/evaluation.json``), and the top
``predict_k`` labels of every point, with their scores, to ``--predictions``
(``sparsejax.xmc.write_predictions``: the Extreme Classification Repository's
sparse score format, which pyxclib and napkinxc read).
"""

from __future__ import annotations

import json
import pathlib

from absl import flags, logging
from flax import nnx

from ..common import config_flags
from . import train
from sparsejax.data.xmc import check_train_test, read_bow, steps_per_epoch
from sparsejax.xmc import (CheckpointError, checkpoint_manager, format_table, inverse_propensity,
                           predict_dataset, resolve_compute_dtype, resolve_label_chunk, restore,
                           score, write_predictions)

__all__ = ["evaluate_run", "define_flags", "main"]


def evaluate_run(run_dir, *, test_file=None, propensity_a: float | None = None,
                 propensity_b: float | None = None, predictions=None) -> dict:
  """Scores the newest intact checkpoint of a run on a test set, and writes its predictions.

  Arguments:
    run_dir: a ``train.run`` output directory (``checkpoints/``, and
      ``config.json`` or checkpoints that hold the configuration).
    test_file: a BoW file with the run's numbers of features and labels, or
      None for the run's own test split.
    propensity_a, propensity_b: ``A``, ``B`` of the inverse propensities, or
      None for the run's.
    predictions: where to write the top ``predict_k`` labels of every test
      point (``sparsejax.xmc.write_predictions``), or None for
      ``run_dir/predictions_<test file name>.txt`` (``predictions_test.txt``
      for the run's own split, the file the trainer writes).

  Returns:
    ``{"run_dir", "test_file", "step", "num_points", "propensity": {"a", "b"},
    "metrics": {"P@1": ..., ...}, "predictions"}`` with the metrics as fractions.
  """
  run_dir = pathlib.Path(run_dir)
  config = train.read_config(run_dir)
  data = train.load_data(config)
  test_set = data.test
  if test_file is not None:
    test_set = read_bow(test_file)
    check_train_test(data.train, test_set, train_name=f"{run_dir}'s training set",
                     test_name=str(test_file))
  total_steps = config.epochs * steps_per_epoch(len(data.train), batch_size=config.batch_size)
  model, optimizer = train.build(config, data.train.num_features, data.train.num_labels,
                                 total_steps)
  model_def, model_state = nnx.split(model)
  _, opt_state = nnx.split(optimizer)
  step, _ = restore(checkpoint_manager(run_dir), model_state, opt_state)
  if step == 0:
    raise CheckpointError(f"{run_dir / 'checkpoints'} holds no checkpoint")
  a = config.propensity_a if propensity_a is None else propensity_a
  b = config.propensity_b if propensity_b is None else propensity_b
  ids, scores = predict_dataset(
      nnx.merge(model_def, model_state), test_set, k=config.predict_k,
      batch_size=config.eval_batch_size, label_chunk=resolve_label_chunk(config.label_chunk),
      compute_dtype=resolve_compute_dtype(config.compute_dtype))
  metrics = score(ids, test_set, inv_propensity=inverse_propensity(
      data.train.label_counts(), len(data.train), a=a, b=b))
  name = "test" if test_file is None else pathlib.Path(test_file).stem
  predictions = pathlib.Path(predictions or run_dir / f"predictions_{name}.txt")
  write_predictions(predictions, ids, scores, num_labels=test_set.num_labels)
  return {"run_dir": str(run_dir), "test_file": None if test_file is None else str(test_file),
          "step": step, "num_points": len(test_set), "propensity": {"a": a, "b": b},
          "metrics": metrics, "predictions": str(predictions)}


def define_flags() -> None:
  flags.DEFINE_string("run_dir", None, "output directory of a training run", required=True)
  flags.DEFINE_string("test_file", None, "BoW test file (default: the run's test split)")
  flags.DEFINE_float("propensity_a", None, "A of the inverse propensities (default: the run's)")
  flags.DEFINE_float("propensity_b", None, "B of the inverse propensities (default: the run's)")
  flags.DEFINE_string("output", None, "JSON file for the result (default: "
                      "run_dir/evaluation.json)")
  flags.DEFINE_string("predictions", None, "file for the top labels of each test point (default: "
                      "run_dir/predictions_<test file name>.txt)")
  flags.DEFINE_boolean("debug", False, "on an error, print its traceback (default: one line)")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  FLAGS = flags.FLAGS
  with config_flags.one_line_errors(debug=FLAGS.debug):
    result = evaluate_run(FLAGS.run_dir, test_file=FLAGS.test_file,
                          propensity_a=FLAGS.propensity_a, propensity_b=FLAGS.propensity_b,
                          predictions=FLAGS.predictions)
  output = pathlib.Path(FLAGS.output or pathlib.Path(FLAGS.run_dir) / "evaluation.json")
  output.write_text(json.dumps(result, indent=1) + "\n")
  print(f"step {result['step']}, {result['num_points']} points "
        f"(A = {result['propensity']['a']}, B = {result['propensity']['b']}):")
  print(format_table(result["metrics"]))


def run_script() -> None:
  """The console script: parses the flags and runs ``main``."""
  config_flags.launch(define_flags, main)


if __name__ == "__main__":
  run_script()
