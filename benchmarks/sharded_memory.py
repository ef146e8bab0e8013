"""Per-device memory of the sharded XMC train step: a 3M-label classifier on 1 to 8 devices.

For each mesh (``--meshes``) this builds the XMC trainer's model and optimizer
(``sparsejax.xmc.XMCModel``, padded for the label shards, and
``make_optimizer``) as shapes only (``nnx.eval_shape``), gives every state leaf
its sharding (``Layout.shardings``: the fixed fan-in classifier's values,
indices, bias and their Adam moments split by label rows, the encoder
replicated), and compiles, without running, the trainer's jitted train step
(``sparsejax.xmc.make_train_step``: label-chunked loss per shard, backward,
Adam, SET rewiring per shard). XLA's ``memory_analysis()`` of the compiled SPMD
executable gives the bytes of one device. The table goes to stdout and to its
own section of ``BENCHMARKS.md``.

On CPU the script asks JAX for ``--devices`` host devices (the same as
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) before any backend
starts; meshes needing more devices than there are are left out.

Run from the repository root:

  python benchmarks/sharded_memory.py --num_labels=3000000 --meshes=labels:1,labels:8
"""

from __future__ import annotations

import dataclasses
import functools
import datetime
import os
import pathlib
import platform
import shlex
import sys

import jax
import jax.numpy as jnp
import jaxlib
import optax
from absl import app, flags
from flax import nnx
try:
  from benchmarks import _report
except ImportError:  # run as `python benchmarks/<script>.py`: this folder is on the path
  import _report
from sparsejax import memory, xmc

ROOT = pathlib.Path(__file__).resolve().parents[1]
START_MARKER, END_MARKER = _report.markers("sharded_memory")
write_section = functools.partial(_report.write_section, name="sharded_memory")
MIB = 2**20
LOSS = "squared_hinge"
# The trainer's default schedules and SET settings (they do not change the memory).
OPTIMIZER = dict(total_steps=1000, encoder_lr=3e-3, classifier_lr=1e-2, warmup_steps=100,
                 set_interval=50, set_fraction=0.3, set_end_step=660, regrowth="random")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What one compiled step is of: the model's sizes, the batch and the mesh."""
  num_labels: int
  fan_in: int
  classifier_in: int
  batch: int
  num_features: int
  label_chunk: int
  mesh: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
  """Per-device bytes of one compiled train step (``mesh=""``: the one-device path)."""
  mesh: str
  devices: int
  label_shards: int
  arguments: int
  temp: int
  outputs: int
  alias: int
  classifier_state: int

  @property
  def total(self) -> int:
    """Arguments + temporaries + outputs, donated state (aliased) counted once."""
    return self.arguments + self.temp + self.outputs - self.alias


def _abstract(state, shardings):
  """``ShapeDtypeStruct``s of ``state``, each with its sharding."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      shardings)


def _mesh_size(mesh: str) -> int:
  """Devices of a mesh spec such as ``data:2,labels:4`` (1 for "")."""
  size = 1
  for part in filter(None, mesh.split(",")):
    size *= int(part.split(":")[1])
  return size


def _build(setup: Setup, layout):
  """The trainer's model (an embedding bag and one residual MLP block) and its optimizer."""
  model = xmc.XMCModel(num_features=setup.num_features, num_labels=setup.num_labels,
                       embed_dim=setup.classifier_in, hidden_layers=1, intermediate=0,
                       fan_in=setup.fan_in, num_clusters=0,
                       classifier_bias=xmc.initial_classifier_bias(LOSS, setup.num_labels),
                       rngs=nnx.Rngs(0))
  if layout is not None:
    model.pad_labels(layout.num_padded)
  return model, xmc.make_optimizer(model, key=jax.random.key(1), layout=layout, **OPTIMIZER)


def measure(setup: Setup, *, max_features: int, max_labels: int) -> Row:
  """Compiles ``setup``'s train step for abstract arguments and reads its memory analysis.

  Arguments:
    setup: the sizes; ``setup.mesh`` picks the mesh over the first devices
      ("" for the one-device path).
    max_features, max_labels: the padded widths of a batch's feature and label lists.

  Returns:
    The per-device ``Row``.
  """
  size = _mesh_size(setup.mesh)
  layout = (xmc.Layout.create(setup.mesh, setup.num_labels, jax.devices()[:size])
            if setup.mesh else None)
  model, optimizer = nnx.eval_shape(lambda: _build(setup, layout))
  model_def, model_state = nnx.split(model)
  opt_def, opt_state = nnx.split(optimizer)
  width = lambda n, dtype: jax.ShapeDtypeStruct((setup.batch, n), dtype)
  batch = {"feature_ids": width(max_features, jnp.int32),
           "feature_values": width(max_features, jnp.float32),
           "feature_mask": width(max_features, jnp.bool_),
           "label_ids": width(max_labels, jnp.int32), "label_mask": width(max_labels, jnp.bool_)}
  weight = jax.ShapeDtypeStruct((), jnp.float32)
  step_args = dict(loss=LOSS, label_chunk=xmc.resolve_label_chunk(setup.label_chunk),
                   compute_dtype=xmc.resolve_compute_dtype("auto"))  # the trainer's defaults
  if layout is None:
    step = xmc.make_train_step(model_def, opt_def, optimizer.wrt, **step_args)
    shards = 1
  else:
    shardings = layout.shardings(model_state), layout.shardings(opt_state)
    model_state, opt_state = (_abstract(model_state, shardings[0]),
                              _abstract(opt_state, shardings[1]))
    batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layout.batch)
             for name, x in batch.items()}
    weight = jax.ShapeDtypeStruct((), jnp.float32, sharding=layout.replicated)
    step = xmc.make_train_step(model_def, opt_def, optimizer.wrt, **step_args, layout=layout,
                               state_shardings=shardings)
    shards = layout.mesh.shape["labels"]
  stats = memory.compiled_bytes(step.lower(model_state, opt_state, batch, None, weight).compile())
  classifier = [x for state in (model_state, opt_state)
                for path, x in jax.tree_util.tree_leaves_with_path(state)
                if xmc.in_classifier(path) and x.ndim]
  return Row(setup.mesh, size, shards, stats["argument_bytes"], stats["temp_bytes"],
             stats["output_bytes"], stats["alias_bytes"],
             sum(x.size * x.dtype.itemsize for x in classifier) // shards)


def run_benchmark(meshes: list[str], *, num_labels: int, fan_in: int, classifier_in: int,
                  batch: int, num_features: int, label_chunk: int, max_features: int,
                  max_labels: int) -> list[Row]:
  """Measures every mesh that the devices allow ("" measures the one-device path).

  The encoder is the embedding bag of ``num_features`` x ``classifier_in``
  and one residual MLP block; the classifier reads ``fan_in`` of its
  ``classifier_in`` outputs per label, rewired by SET.
  """
  rows = []
  for mesh in meshes:
    if _mesh_size(mesh) > jax.device_count():
      print(f"mesh {mesh}: needs {_mesh_size(mesh)} devices, there are {jax.device_count()}; "
            "left out")
      continue
    setup = Setup(num_labels, fan_in, classifier_in, batch, num_features, label_chunk, mesh)
    rows.append(measure(setup, max_features=max_features, max_labels=max_labels))
  return rows


def _mib(n: int) -> str:
  return f"{n / MIB:,.1f}"


def format_table(rows: list[Row]) -> str:
  """The markdown table of ``rows`` (MiB per device)."""
  lines = ["| mesh | devices | classifier state MiB | arguments MiB | temp MiB | outputs MiB "
           "| donated (aliased) MiB | total MiB |", "|---|" + "---:|" * 7]
  for r in rows:
    cells = [f"`{r.mesh}`" if r.mesh else "one device, no mesh", str(r.devices),
             _mib(r.classifier_state), _mib(r.arguments), _mib(r.temp), _mib(r.outputs),
             _mib(r.alias), _mib(r.total)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def render_section(rows: list[Row], command: str, *, num_labels: int, fan_in: int,
                   classifier_in: int, batch: int, num_features: int, label_chunk: int,
                   max_features: int, max_labels: int) -> str:
  """The full BENCHMARKS.md section (without markers): setup, environment and table."""
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  return "\n".join([
      "## Sharded XMC train step: memory per device",
      "",
      f"The XMC trainer's jitted train step (`sparsejax.xmc.make_train_step`: "
      f"encoder, squared hinge over all labels in chunks of {label_chunk:,} per label shard, "
      "backward, Adam, SET rewiring per shard; states donated) with a fixed fan-in classifier "
      f"of {num_labels:,} labels, K = {fan_in}, classifier input {classifier_in}, batch "
      f"{batch} (at most {max_features} features and {max_labels} labels a point), encoder: "
      f"embedding bag {num_features:,} x {classifier_in} + one residual MLP block, float32. "
      "With a mesh the classifier's values, indices and bias and their Adam moments are "
      "split by label rows over the `labels` axis, the batch over `data`, the encoder "
      "replicated. Memory is XLA's `memory_analysis()` of the step compiled (never run) from "
      "`jax.ShapeDtypeStruct` state with shardings: the bytes of **one device**. \"classifier "
      "state\" is one device's share of the classifier's params and Adam moments; "
      "arguments include the replicated encoder and its moments "
      f"({_mib(_encoder_bytes(num_features, classifier_in))} MiB), so they stop halving once "
      "the classifier's share is small. Total = arguments + temp + outputs - donated.",
      "",
      f"- Command: `{command}`",
      f"- Date: {date}",
      f"- Machine: {_report.cpu_name()}, {os.cpu_count()} logical CPUs; {jax.device_count()} JAX "
      f"devices `{jax.devices()[0].device_kind}` (backend `{jax.default_backend()}`); "
      f"{platform.platform()}",
      f"- Versions: Python {platform.python_version()}, jax {jax.__version__}, "
      f"jaxlib {jaxlib.__version__}, optax {optax.__version__}",
      "",
      format_table(rows),
  ])


def _encoder_bytes(num_features: int, width: int) -> int:
  """float32 bytes of the encoder's params and Adam moments (bag + one MLP block)."""
  return 3 * 4 * (num_features * width + width * width + width)


def define_flags() -> None:
  flags.DEFINE_list("meshes", ["", "labels:1", "labels:2", "labels:4", "labels:8",
                               "data:2,labels:4"],
                    "Meshes to compile for ('' is the one-device path without a mesh).")
  flags.DEFINE_integer("num_labels", 3_000_000, "Labels L.")
  flags.DEFINE_integer("fan_in", 64, "Fan-in K of the classifier.")
  flags.DEFINE_integer("classifier_in", 768, "Width of the encoder and classifier input.")
  flags.DEFINE_integer("batch", 256, "Points per step.")
  flags.DEFINE_integer("num_features", 16_384, "Feature vocabulary of the embedding bag.")
  flags.DEFINE_integer("label_chunk", 4096, "Labels scored at once in the loss.")
  flags.DEFINE_integer("max_features", 128, "Padded features per point.")
  flags.DEFINE_integer("max_labels", 32, "Padded labels per point.")
  flags.DEFINE_integer("devices", 8, "Host (CPU) devices to ask JAX for.")
  flags.DEFINE_string("output", str(ROOT / "BENCHMARKS.md"),
                      "Markdown file whose sharded_memory section is written.")


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS
  jax.config.update("jax_num_cpu_devices", FLAGS.devices)  # before any backend starts
  sizes = dict(num_labels=FLAGS.num_labels, fan_in=FLAGS.fan_in,
               classifier_in=FLAGS.classifier_in, batch=FLAGS.batch,
               num_features=FLAGS.num_features, label_chunk=FLAGS.label_chunk,
               max_features=FLAGS.max_features, max_labels=FLAGS.max_labels)
  rows = run_benchmark(FLAGS.meshes, **sizes)
  section = render_section(rows, shlex.join(["python", *sys.argv]), **sizes)
  print(section)
  write_section(pathlib.Path(FLAGS.output), section)


if __name__ == "__main__":
  define_flags()
  app.run(main)
