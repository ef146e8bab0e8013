"""The XMC trainer never resumes from damaged data, stops on divergence, and fails in one line."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorstore as ts

from experiments.xmc import evaluate, train
from sparsejax.xmc import CheckpointError, read_checkpoint

ROOT = pathlib.Path(__file__).parents[1]

# 2 epochs of 10 steps, a checkpoint every 3 steps (kept: the newest two).
FLAGS = dict(num_train=500, num_test=100, num_labels=64, num_features=256, embed_dim=16,
             batch_size=50, label_chunk=32, epochs=2, fan_in=4, set_interval=4, warmup_steps=4,
             eval_every=0, checkpoint_every=3, valid_fraction=0.0)


def _config(out, **overrides) -> train.Config:
  return train.Config(output_dir=str(out), **{**FLAGS, **overrides})


def _assert_same_state(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished run (checkpoints of steps 18 and 20 kept) and its final state."""
  out = tmp_path_factory.mktemp("finished")
  results = train.run(_config(out), report=lambda line: None)
  return out, results, read_checkpoint(out)[1]


def _copy(finished, tmp_path, name="run") -> pathlib.Path:
  out = tmp_path / name
  shutil.copytree(finished[0], out)
  return out


def _flip_bytes(step_dir: pathlib.Path) -> None:
  """Flips 4 KiB in the middle of the checkpoint's largest array file."""
  path = max((step_dir / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = bytes(b ^ 0xA5 for b in data[middle:middle + 4096])
  path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.parametrize("damage", ["flipped_bytes", "truncated_manifest", "no_commit_marker",
                                    "truncated_meta"])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(finished, tmp_path, damage):
  out = _copy(finished, tmp_path)
  newest = out / "checkpoints" / "20"
  {"flipped_bytes": lambda: _flip_bytes(newest),
   "truncated_manifest": lambda: _truncate(newest / "state" / "manifest.ocdbt"),
   "no_commit_marker": lambda: (newest / "commit_success.txt").unlink(),
   "truncated_meta": lambda: _truncate(newest / "meta" / "metadata")}[damage]()
  (out / "metrics.json").unlink()  # so that the run trains its last steps again
  lines = []
  results = train.run(_config(out), report=lines.append)
  # One line names the step and the directory; the intact step 18 is resumed.
  damaged = [line for line in lines if " is damaged: " in line]
  assert len(damaged) == 1 and "\n" not in damaged[0]
  assert damaged[0].startswith(f"checkpoint {newest} (step 20) is damaged: ")
  assert lines[lines.index(damaged[0]) + 1] == f"{out}: resuming at step 18 of 20"
  assert (out / "damaged_checkpoints" / "20").is_dir()  # kept aside, not deleted
  # It ends as the uninterrupted run did, bit for bit.
  _assert_same_state(read_checkpoint(out)[1], finished[2])
  assert results["metrics"] == finished[1]["metrics"]


def _alter_one_stored_value(state_dir: pathlib.Path, name: str) -> None:
  """Changes one float of the stored array ``name`` by one ulp, through the storage itself.

  Written through tensorstore, the damage decodes fine: the database and the chunk's
  compression stay consistent, as after a faulty writer or bit rot that the storage does
  not see. So only the checksums can catch it. (Flipping bytes of the files instead
  mostly breaks the compressed chunks, which the fallback test covers.)
  """
  stored = ts.open({"driver": "auto",  # zarr v2 or v3, whichever orbax wrote
                    "kvstore": {"driver": "ocdbt", "base": f"file://{state_dir}/",
                                "path": f"{name}/"}}).result()
  values = stored.read().result()
  assert values.dtype == np.float32
  values.view(np.uint32).flat[0] ^= 1  # the lowest mantissa bit
  stored.write(values).result()


def test_a_changed_stored_value_is_caught_by_the_checksums(finished, tmp_path):
  out = _copy(finished, tmp_path)
  _alter_one_stored_value(out / "checkpoints" / "20" / "state", "model.classifier.values")
  with pytest.raises(CheckpointError,
                     match="is damaged: 1 array.s. fail their checksum: model/classifier/values$"):
    read_checkpoint(out, 20)


def test_no_intact_checkpoint_is_a_clear_error(finished, tmp_path):
  out = _copy(finished, tmp_path)
  for step in (18, 20):
    (out / "checkpoints" / str(step) / "commit_success.txt").unlink()
  lines = []
  with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*steps \[18, 20\]"):
    train.run(_config(out), report=lines.append)
  assert sum("is damaged" in line for line in lines) == 2


def test_config_travels_in_the_checkpoint(finished, tmp_path):
  out = _copy(finished, tmp_path)
  (out / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"other settings \(fan_in: 4 -> 8\)"):
    train.run(_config(out, fan_in=8))
  # The evaluator rebuilds the model from the checkpoint's configuration.
  assert evaluate.evaluate_run(out)["metrics"] == finished[1]["metrics"]
  (out / "config.json").write_text('{"fan_in": 4, "epochs": ')
  with pytest.raises(ValueError, match=r"config.json is not a readable config"):
    train.run(_config(out))
  with pytest.raises(ValueError, match=r"config.json is not a readable config"):
    evaluate.evaluate_run(out)


def test_a_moved_run_resumes_and_a_finished_run_is_left_as_it_is(finished, tmp_path):
  out = _copy(finished, tmp_path, "moved")  # config.json still names the old output_dir
  before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
  lines = []
  results = train.run(_config(out, eval_batch_size=7), report=lines.append)
  assert lines[-1] == (f"{out}: the run is complete at step 20; its results are in "
                       f"{out / 'metrics.json'} (left as they are)")
  assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
  assert results["metrics"] == finished[1]["metrics"]


def test_divergence_stops_with_the_last_checkpoint_kept(tmp_path, monkeypatch):
  """A batch of NaN features at step 9 ends the run there, with checkpoint 6 kept intact."""
  batches = train.batches

  def poisoned(dataset, *, epoch, start_step=0, **kwargs):
    for i, batch in enumerate(batches(dataset, epoch=epoch, start_step=start_step, **kwargs)):
      if epoch * 10 + start_step + i + 1 == 9:
        batch = dict(batch, feature_values=np.full_like(batch["feature_values"], np.nan))
      yield batch

  monkeypatch.setattr(train, "batches", poisoned)
  config = _config(tmp_path / "nan")
  with pytest.raises(train.TrainingDiverged,
                     match=r"the loss is nan at step 9; .*last checkpoint \(step 6\)"):
    train.run(config, report=lambda line: None)
  step, state = read_checkpoint(config.output_dir)  # intact and finite
  assert step == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["model"]))


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "experiments.xmc.main", *args], cwd=cwd,
                        capture_output=True, text=True)


def test_command_line_errors_are_one_line_with_status_2(tmp_path):
  out = f"--output_dir={tmp_path / 'run'}"
  cases = [  # the rest of the flag checks are in-process rows of tests/test_bad_inputs.py
      (["--dataset=/no/such/dir", out], "--dataset=/no/such/dir: the directory does not exist"),
      (["--fan_in=500", "--embed_dim=128", out],
       "--fan_in=500 exceeds the classifier's input width 128"),
      (["--encoder_lr=nan", out], "--encoder_lr must be a finite number, got nan"),
      (["--loss=hinge", out], "--loss=hinge: value should be one of"),
      (["--no_such_flag=1", out], "Unknown command line flag 'no_such_flag'"),
  ]
  for args, fragment in cases:
    result = _cli(*args)
    assert result.returncode == 2, (args, result.stderr[-2000:])
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, (args, result.stderr)
  assert not (tmp_path / "run").exists()  # nothing left that could block a retry
  debug = _cli("--epochs=0", out, "--debug")
  assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_failed_start_leaves_nothing_that_blocks_the_retry(tmp_path):
  flags = [f"--{k}={v}" for k, v in FLAGS.items()] + [f"--output_dir={tmp_path / 'run'}"]
  bad_data = tmp_path / "data"
  bad_data.mkdir()
  (bad_data / "train.txt").write_text("2 4 3\n0 1:0.5\n1 2:1.0")  # cut short: no newline
  (bad_data / "test.txt").write_text("1 4 3\n0 1:0.5\n")
  failed = _cli(*flags, f"--dataset={bad_data}")
  assert failed.returncode == 2 and "train.txt:3" in failed.stderr, failed.stderr
  assert failed.stderr.count("\n") == 1
  retry = _cli(*flags, "--epochs=1", "--checkpoint_every=0")
  assert retry.returncode == 0, retry.stderr[-2000:]
  # Written to a file (a pipe here), progress is a plain line, not a bar; the first lines say
  # what is being built.
  assert "xmc: step 1/10, loss " in retry.stderr and "\r" not in retry.stderr
  assert retry.stdout.startswith("loading the data (synthetic)\ndata: ")
  assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 10
