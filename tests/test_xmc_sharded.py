"""The XMC trainer on a mesh: matches one device, resumes on another mesh, runs as 2 processes.

Needs 8 devices: the suite's XLA_FLAGS ask for 8 host devices (tests/conftest.py).
"""

import csv
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.xmc import evaluate, train
from sparsejax.xmc import METRIC_NAMES, checkpoint_manager, in_classifier, read_checkpoint

ROOT = pathlib.Path(__file__).parents[1]

# 202 labels: not a multiple of 4 or 8, so the classifier carries padding rows
# (204 on labels:4, 208 on labels:8). 2 epochs of 25 steps, SET every 5 steps,
# aux objective for the first epoch, checkpoints every 10 steps and at epoch ends.
SMALL = dict(num_train=1000, num_test=200, num_labels=202, num_features=512, embed_dim=16,
             batch_size=40, label_chunk=64, epochs=2, fan_in=8, set_interval=5, aux=True,
             aux_epochs=1.0, cluster_size=16, eval_every=0, checkpoint_every=10, step_log=True,
             warmup_steps=49, valid_fraction=0.0)
STEPS = 50
LABELS = SMALL["num_labels"]


def _step_losses(out_dir) -> np.ndarray:
  with open(pathlib.Path(out_dir) / "steps.csv", newline="") as f:
    return np.array([float(r["loss"]) for r in csv.DictReader(f)])


def _unpadded(state):
  """``{path: numpy leaf}``, the classifier's leaves cut to the real labels."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    x = np.asarray(x)
    on_labels = in_classifier(path) and x.ndim
    out[jax.tree_util.keystr(path)] = x[:LABELS] if on_labels else x
  return out


def _assert_states_close(a, b):
  """Model, Adam and SET state equal up to float reduction order (real labels only)."""
  a, b = _unpadded(a), _unpadded(b)
  assert a.keys() == b.keys() and len(a) > 20
  for name in a:
    if name.endswith("['indices']"):
      # SET ranks |w|: a float near-tie could rewire a slot differently (measured: none).
      assert np.mean(a[name] == b[name]) >= 0.99, name
    else:  # measured: at most 1.5e-7 apart
      np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def _assert_metrics_close(a, b, tol=0.011):
  # Default: 2 of the 200 test points; a last-bit logit difference may reorder a tie.
  assert a.keys() == set(METRIC_NAMES) == b.keys()
  for name in a:
    assert abs(a[name] - b[name]) <= tol, (name, a[name], b[name])


def _run(tmp_path_factory, name, **overrides):
  config = train.Config(output_dir=str(tmp_path_factory.mktemp(name)), **{**SMALL, **overrides})
  return config, train.run(config)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
  return _run(tmp_path_factory, "single")


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
  assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  config, results = _run(tmp_path_factory, "mesh", mesh="data:2,labels:4")
  return config, results, read_checkpoint(config.output_dir)


def test_mesh_run_matches_one_device(single_run, mesh_run):
  single, single_results = single_run
  config, results, (step, state) = mesh_run
  assert results["mesh"] == {"data": 2, "labels": 4} and single_results["mesh"] is None
  assert results["num_params"] == single_results["num_params"]
  assert step == STEPS
  # The same steps and losses, up to the order of float sums (measured: rel 1.6e-7).
  losses, reference = _step_losses(config.output_dir), _step_losses(single.output_dir)
  assert losses.shape == (STEPS,) and losses[-1] < 0.8 * losses[0]
  np.testing.assert_allclose(losses, reference, rtol=1e-4)
  _assert_metrics_close(results["metrics"], single_results["metrics"])
  _, single_state = read_checkpoint(single.output_dir)
  _assert_states_close(state, single_state)
  # SET rewired (topology_changed) the same share of the topology.
  changed = [float(r["topology_changed"]) for r in results["epochs"]]
  assert changed[-1] > 0.15
  np.testing.assert_allclose(changed, [float(r["topology_changed"])
                                       for r in single_results["epochs"]], atol=0.01)
  # The padding rows (202, 203) stay zero: no loss, no gradient, no Adam moment reaches them.
  classifier = state["model"]["classifier"]
  assert classifier["values"].shape == (204, SMALL["fan_in"])
  np.testing.assert_array_equal(classifier["values"][LABELS:], 0)
  np.testing.assert_array_equal(classifier["bias"][LABELS:], 0)
  moments = state["optimizer"]["opt_state"]["inner_state"]["inner_states"]["classifier"]
  for moment in ("mu", "nu"):
    np.testing.assert_array_equal(moments["inner_state"]["0"][moment]["classifier"]["values"]
                                  [LABELS:], 0)
  # The evaluator restores the sharded checkpoint onto one device (padding cut off).
  _assert_metrics_close(evaluate.evaluate_run(config.output_dir)["metrics"], results["metrics"])


def test_checkpoint_from_2x4_resumes_on_1x8(mesh_run):
  """The (2, 4) run's step-40 checkpoint, resumed on (1, 8), ends as the run that went on."""
  config, results, (_, straight) = mesh_run
  with checkpoint_manager(config.output_dir) as manager:
    manager.delete(STEPS)  # back to the checkpoint of step 40, written on data:2,labels:4
    assert manager.latest_step() == 40
  resumed = train.run(dataclasses.replace(config, mesh="labels:8"))
  assert resumed["mesh"] == {"data": 1, "labels": 8}
  step, state = read_checkpoint(config.output_dir)
  assert step == STEPS
  assert state["model"]["classifier"]["values"].shape == (208, SMALL["fan_in"])  # re-padded
  _assert_states_close(state, straight)
  _assert_metrics_close(resumed["metrics"], results["metrics"])
  assert [r["step"] for r in resumed["epochs"]] == ["25", "50"]


def test_batch_must_split_over_the_data_axis(tmp_path):
  config = train.Config(output_dir=str(tmp_path), **{**SMALL, "batch_size": 41},
                        mesh="data:2,labels:4")
  with pytest.raises(ValueError, match="not a multiple of the 2 data shards"):
    train.run(config)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
  """Two processes (2 CPU devices each, gloo over loopback) train as one process on 4 devices."""
  assert jax.device_count() >= 4
  mesh, config = "data:2,labels:2", {**SMALL, "aux": False}  # no aux: half the compiling
  port = _free_port()
  out = tmp_path / "two"
  flags = [f"--{k}" if v is True else f"--no{k}" if v is False else f"--{k}={v}"
           for k, v in config.items()]
  command = [sys.executable, "-m", "experiments.xmc.train", *flags, f"--output_dir={out}",
             f"--mesh={mesh}", f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"}
  logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]
  processes = [subprocess.Popen([*command, f"--process_id={i}"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
  deadline = time.monotonic() + 240
  try:
    codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  assert codes == [0, 0], [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2)]

  reference = train.Config(output_dir=str(tmp_path / "one"), mesh=mesh, **config)
  results = train.run(reference, devices=jax.devices()[:4])
  step_a, state_a = read_checkpoint(out)
  step_b, state_b = read_checkpoint(reference.output_dir)
  assert step_a == step_b == STEPS
  # The same partitioned program, its collectives over gloo: bit for bit (measured).
  leaves_a, tree_a = jax.tree.flatten(state_a)
  leaves_b, tree_b = jax.tree.flatten(state_b)
  assert tree_a == tree_b and len(leaves_a) > 20
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(_step_losses(out), _step_losses(reference.output_dir))
  two = json.loads((out / "metrics.json").read_text())
  assert two["processes"] == 2 and two["mesh"] == {"data": 2, "labels": 2}
  _assert_metrics_close(two["metrics"], results["metrics"], tol=0.0)
