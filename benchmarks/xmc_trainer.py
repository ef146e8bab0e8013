"""Peak memory and step time of the XMC trainer: dense vs fixed fan-in, per impl.

For each label count L and each variant (``dense``, or ``k<K>-<impl>[-rigl]``
with impl one of ``xla``, ``pallas`` (the gather designs), ``xla_tile``,
``pallas_tile`` (the tile designs) or ``auto`` (``sparsejax.dispatch``'s
choice, which the table names), and ``-rigl`` for RigL regrowth instead of
SET's random one), a fresh Python process builds the trainer's model and
optimizer (``sparsejax.xmc.XMCModel``, ``make_optimizer``, with the trainer's
default learning rates and SET settings) on synthetic data
(``sparsejax.data.synthetic_xmc``, 20 batches of points), compiles its train
steps ahead of time (``sparsejax.xmc.make_train_steps``: squared hinge loss
summed over label chunks, Adam, SET/RigL rewiring of a fixed fan-in
classifier, both states donated) and runs them: warm-up steps, then timed
steps, each waited for with ``block_until_ready``. ``SPARSEJAX_KERNELS`` in
the child's environment picks the fixed fan-in implementation;
``--compute_dtype`` and ``--label_chunk`` are the trainer's flags (defaults:
its auto, the same policy for the dense and the sparse variants). One process
per variant, so that the peak memory (``memory_stats()["peak_bytes_in_use"]``
on GPU, the peak RSS on CPU) is that variant's alone; the parent never imports
JAX, so it holds no device memory. Pallas variants are skipped on CPU:
interpret mode is a correctness tool, far too slow at these sizes.

SET/RigL rewires on updates t = interval, 2 interval, ...; timed steps that
rewire are reported apart ("rewire step ms") from the others ("step ms", the
median; samples/s = batch / that median; "vs dense": that median over the
dense variant's of the same L in the same run).

A variant that fails (out of memory, compile error, past ``--timeout``) becomes
a table row with the reason; one that times out keeps the figures of the steps
it finished. The table goes to stdout and to the ``xmc_trainer`` section of
BENCHMARKS.md, rewritten after every variant so that an interrupted run leaves
what it measured. ``--merge`` keeps the section's rows of (L, variant) pairs
that this run does not measure, so a long sweep can be split over commands.

Run from the repository root:

  python benchmarks/xmc_trainer.py   # the default table (GPU, ~8 minutes on an H200)
  python benchmarks/xmc_trainer.py --labels 100000 --variants dense,k64-xla_tile-rigl \\
      --steps 3 --output /tmp/BENCHMARKS.md
"""

from __future__ import annotations

import collections
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

from absl import app, flags
try:
  from benchmarks import _report
except ImportError:  # run as `python benchmarks/<script>.py`: this folder is on the path
  import _report

ROOT = pathlib.Path(__file__).resolve().parents[1]
START_MARKER, END_MARKER = _report.markers("xmc_trainer")
write_section = functools.partial(_report.write_section, name="xmc_trainer")
ROWS_PREFIX = "<!-- xmc_trainer rows: "  # the rows as JSON, read back by --merge
RESULT_PREFIX = "XMC_RESULT "  # marks the child's result lines on its stdout
PALLAS_ON_CPU = "pallas needs a GPU (interpret mode is for tests)"
MIB = 2**20
IMPLS = ("xla", "pallas", "xla_tile", "pallas_tile", "auto")

# The model: the classifier reads 768 features, as in benchmarks/kernels.py.
MODEL = dict(embed_dim=256, hidden_layers=1, intermediate=768)
LOSS = "squared_hinge"
NUM_FEATURES = 16_384  # the trainer's default synthetic vocabulary
TRAIN_BATCHES = 20  # points = 20 batches: quick to generate even at 3M labels
TOTAL_STEPS = 1000  # schedule length: SET's end step (660) lies past every timed step
# The trainer's default schedules and SET settings, for TOTAL_STEPS updates.
OPTIMIZER = dict(total_steps=TOTAL_STEPS, encoder_lr=3e-3, classifier_lr=1e-2, warmup_steps=100,
                 set_fraction=0.3, set_end_step=int(0.66 * TOTAL_STEPS))


def parse_variant(name: str) -> tuple[int, str, str]:
  """``"dense"`` -> ``(0, "auto", "")``, ``"k64-pallas-rigl"`` -> ``(64, "pallas", "rigl")``.

  The third item is the trainer's ``regrowth``: ``"random"`` (SET) or ``"rigl"``;
  ``""`` for dense.
  """
  if name == "dense":
    return 0, "auto", ""
  match = re.fullmatch(rf"k(\d+)-({'|'.join(IMPLS)})(-rigl)?", name)
  if not match or int(match[1]) < 1:
    raise ValueError(f"a variant is 'dense' or 'k<K>-<impl>[-rigl]' with impl one of "
                     f"{', '.join(IMPLS)}; got {name!r}")
  return int(match[1]), match[2], "rigl" if match[3] else "random"


def _rewiring(regrowth: str) -> str:
  return "RigL" if regrowth == "rigl" else "SET"


# ---------------------------------------------------------------- child process


def _one_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _emit(result: dict) -> None:
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def measure(spec: dict) -> None:
  """Measures one variant in this process; prints a result line after each stage.

  Arguments:
    spec: ``labels``, ``variant``, ``warmup``, ``steps``, ``batch_size``,
      ``label_chunk`` (0: the trainer's auto), ``set_interval``, ``compute_dtype``.

  The last line printed holds everything measured so far, so a parent that
  kills this process at its timeout still gets the finished steps.
  """
  # Imported here: the parent process must not initialise JAX (it would hold device memory).
  import jax
  import numpy as np
  from flax import nnx

  from sparsejax import dispatch, xmc
  from sparsejax import memory as sj_memory
  from sparsejax.data import batches, synthetic_xmc

  fan_in, impl, regrowth = parse_variant(spec["variant"])
  device = jax.devices()[0]
  versions = f"Python {platform.python_version()}, jax {jax.__version__}"
  try:
    import triton
    versions += f", triton {triton.__version__}"
  except ImportError:
    pass
  result = dict(spec, fan_in=fan_in, impl=impl, device=f"{device.device_kind} "
                f"({jax.default_backend()})", host=platform.platform(), versions=versions,
                cpus=os.cpu_count(), plain_s=[], set_s=[], done=False)
  if impl in ("pallas", "pallas_tile") and jax.default_backend() != "gpu":
    _emit(dict(result, skipped=PALLAS_ON_CPU, done=True))
    return
  try:
    if fan_in:  # SPARSEJAX_KERNELS must be accepted; the row names what auto dispatches to
      result["dispatched"] = _dispatched(dispatch, impl, spec, fan_in)
    regrowth = regrowth or "random"
    label_chunk = xmc.resolve_label_chunk(spec["label_chunk"])
    compute_dtype = xmc.resolve_compute_dtype(spec["compute_dtype"])
    result["config"] = dict(regrowth=regrowth, compute_dtype=str(compute_dtype),
                            label_chunk=label_chunk)
    data, _ = synthetic_xmc(seed=0, num_train=TRAIN_BATCHES * spec["batch_size"], num_test=0,
                            num_features=NUM_FEATURES, num_labels=spec["labels"])
    model = xmc.XMCModel(num_features=data.num_features, num_labels=data.num_labels,
                         fan_in=fan_in, num_clusters=0,
                         classifier_bias=xmc.initial_classifier_bias(LOSS, data.num_labels),
                         rngs=nnx.Rngs(0), **MODEL)
    optimizer = xmc.make_optimizer(model, set_interval=spec["set_interval"], regrowth=regrowth,
                                   key=jax.random.key(1), **OPTIMIZER)
    result["classifier_params"] = model.num_params()["classifier"]
    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(optimizer)
    rewires = bool(fan_in and spec["set_interval"])
    # As the trainer's loop: a plain step that traces no rewiring and a rewiring one for the
    # due updates.
    step_fns = xmc.make_train_steps(
        model_def, opt_def, optimizer.wrt, rewires=rewires, loss=LOSS, label_chunk=label_chunk,
        compute_dtype=compute_dtype,
        num_candidates=(xmc.rigl_num_candidates(fan_in, OPTIMIZER["set_fraction"])
                        if rewires and regrowth == "rigl" else 0))
    del model, optimizer  # their arrays are the states', which the steps donate
    device_batches = [jax.device_put(b) for b in batches(data, batch_size=spec["batch_size"],
                                                         seed=0, epoch=0)]
    no_aux = (None, np.float32(0))  # no cluster head: the step takes None and a zero weight
    start = time.perf_counter()
    compiled = {kind: fn.lower(model_state, opt_state, device_batches[0], *no_aux).compile()
                for kind, fn in step_fns.items()}
    result["compile_s"] = time.perf_counter() - start
    for kind, name in ((False, "compiled"), (True, "compiled_rewire")):
      if kind in compiled:
        memory = sj_memory.compiled_bytes(compiled[kind])
        result[name] = {part: memory[f"{part}_bytes"]
                        for part in ("argument", "temp", "output", "alias")}

    def peak() -> tuple[int, str]:
      memory = sj_memory.peak_memory()
      if "device_peak_bytes" in memory:
        return memory["device_peak_bytes"], "device"
      return memory["max_rss_bytes"], "RSS"

    result["setup_peak_bytes"] = peak()[0]  # model, optimizer, data and compilation
    _emit(result)
    for i in range(spec["warmup"] + spec["steps"]):
      batch = device_batches[i % len(device_batches)]
      # Update t = i + 1 rewires when the interval divides it (SET's end step is far off).
      rewired = rewires and (i + 1) % spec["set_interval"] == 0
      step = compiled[rewired]
      start = time.perf_counter()
      model_state, opt_state, losses = step(model_state, opt_state, batch, *no_aux)
      jax.block_until_ready((model_state, opt_state, losses))
      seconds = time.perf_counter() - start
      print(f"{spec['variant']} L={spec['labels']}: step {i} {seconds * 1e3:.1f} ms"
            + (f" ({_rewiring(regrowth)})" if rewired else "")
            + ("" if i >= spec["warmup"] else " (warm-up)"),
            file=sys.stderr, flush=True)
      if i >= spec["warmup"]:
        result["set_s" if rewired else "plain_s"].append(seconds)
      result["peak_bytes"], result["peak_kind"] = peak()
      result["loss"] = float(losses[0])
      _emit(result)
    memory = device.memory_stats()
    if memory and "bytes_in_use" in memory:
      result["in_use_bytes"] = int(memory["bytes_in_use"])  # the states, data and executable
    _emit(dict(result, done=True))
  except Exception as error:  # reported as the variant's row; the traceback goes to the log
    traceback.print_exc()
    _emit(dict(result, error=_one_line(error), done=True))


def _dispatched(dispatch, impl: str, spec: dict, fan_in: int) -> str:
  """What the classifier's matmul runs: ``impl``, or for ``auto`` the dispatch's choice.

  Resolving ``$SPARSEJAX_KERNELS`` also fails here, before any building, when the
  dispatch module does not know ``impl``.
  """
  # The classifier reads the intermediate layer; out: all L labels.
  return dispatch.resolve_fanin_impl(batch=spec["batch_size"], in_features=MODEL["intermediate"],
                                     out=spec["labels"], fan_in=fan_in)


# ---------------------------------------------------------------- parent process


def _pump(stream, sink, keep: collections.deque) -> None:
  """Copies ``stream`` line by line to ``sink`` (None: nowhere), keeping the last lines."""
  for line in stream:
    keep.append(line)
    if sink is not None:
      sink.write(line)
      sink.flush()


def run_variant(spec: dict, timeout: float) -> dict:
  """Runs ``measure(spec)`` in a fresh process; returns its last result, or why it failed.

  The child's stderr (progress, tracebacks) is copied to ours as it comes.
  """
  _, impl, _ = parse_variant(spec["variant"])
  env = dict(os.environ, SPARSEJAX_KERNELS=impl)
  # A training run would have most of the GPU; JAX's default pool is 75 % of it.
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--_child", json.dumps(spec)]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=ROOT)
  out, err = collections.deque(), collections.deque(maxlen=20)
  pumps = [threading.Thread(target=_pump, args=(process.stdout, None, out)),
           threading.Thread(target=_pump, args=(process.stderr, sys.stderr, err))]
  for pump in pumps:
    pump.start()
  try:
    process.wait(timeout=timeout)
    failure = None
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    failure = f"timed out after {timeout:g} s"
  for pump in pumps:
    pump.join()
  results = [json.loads(line[len(RESULT_PREFIX):]) for line in out
             if line.startswith(RESULT_PREFIX)]
  result = results[-1] if results else dict(spec)
  if failure is None and process.returncode != 0 and "error" not in result:
    code = process.returncode
    why = (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
    last = next((line.strip() for line in reversed(err) if line.strip()), "")
    failure = f"{why}: {last}"[:300]
  if failure:
    result["error"] = failure
  return result


def _ms(seconds: list[float]) -> str:
  return f"{statistics.median(seconds) * 1e3:,.1f}" if seconds else "-"


def _mib(n) -> str:
  return "-" if n is None else f"{n / MIB:,.0f}"


def _note(row: dict) -> str:
  if "skipped" in row:
    return row["skipped"]
  timed = len(row.get("plain_s", [])) + len(row.get("set_s", []))
  parts = []
  if timed:
    rewiring = _rewiring(parse_variant(row["variant"])[2])
    parts.append(f"{timed} timed" + (f" ({len(row['set_s'])} {rewiring})" if row["fan_in"]
                                     else ""))
  if "compiled_rewire" in row:
    parts.append(f"rewire step temp {_mib(row['compiled_rewire']['temp'])} MiB")
  if row.get("error"):
    parts.append(row["error"])
  elif row.get("peak_kind") == "device" and row.get("peak_bytes") == row.get("setup_peak_bytes"):
    parts.append("peak reached before the first step")
  if "loss" in row and not math.isfinite(row["loss"]):
    parts.append(f"loss {row['loss']}")
  return "; ".join(parts).replace("|", "/")


def _impl_cell(row: dict) -> str:
  fan_in, impl, _ = parse_variant(row["variant"])
  if not fan_in:
    return "-"
  dispatched = row.get("dispatched")
  return f"auto: {dispatched}" if impl == "auto" and dispatched else impl


def _dtype_cell(row: dict) -> str:
  """The compute dtype the trainer resolved, else the one asked for."""
  if "config" in row:  # a trainer without compute_dtype computes in float32
    return row["config"]["compute_dtype"] or "float32"
  return row.get("compute_dtype", "?")


def format_table(rows: list[dict], context: list[dict] | None = None) -> str:
  """The markdown table of ``rows`` (results of ``run_variant``).

  ``context`` (default ``rows``) holds the dense rows of the "vs dense" column:
  the dense variant of the same L in the same run.
  """
  runs = _runs(rows)
  dense = {(r["labels"], _run_of(r)): statistics.median(r["plain_s"])
           for r in (rows if context is None else context)
           if r["variant"] == "dense" and r.get("plain_s")}
  lines = ["| L | model | impl | K | compute dtype | classifier params | step ms "
           "| rewire step ms | vs dense | samples/s | peak MiB | compiled args MiB | temp MiB "
           "| out MiB | compile s | note |" + (" run |" if len(runs) > 1 else ""),
           "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
           + ("---:|" if len(runs) > 1 else "")]
  for row in rows:
    fan_in, _, regrowth = parse_variant(row["variant"])
    plain = row.get("plain_s", [])
    compiled = row.get("compiled", {})
    peak = _mib(row.get("peak_bytes"))
    if row.get("peak_kind") == "RSS":
      peak += " RSS"
    reference = dense.get((row["labels"], _run_of(row)))
    ratio = f"{statistics.median(plain) / reference:.2f}x" if plain and reference else "-"
    cells = [f"{row['labels']:,}",
             f"fixed fan-in, {_rewiring(regrowth)}" if fan_in else "dense",
             _impl_cell(row), str(fan_in or "-"), _dtype_cell(row),
             f"{row['classifier_params']:,}" if "classifier_params" in row else "-",
             _ms(plain), _ms(row.get("set_s", [])), ratio,
             f"{row['batch_size'] / statistics.median(plain):,.0f}" if plain else "-",
             peak, _mib(compiled.get("argument")), _mib(compiled.get("temp")),
             _mib(compiled.get("output")),
             f"{row['compile_s']:.1f}" if "compile_s" in row else "-", _note(row)]
    if len(runs) > 1:
      cells.append(str(runs.index(_run_of(row)) + 1))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _run_of(row: dict) -> tuple:
  return row["command"], row["date"]


def _runs(rows: list[dict]) -> list[tuple]:
  """The distinct (command, date) of ``rows``, in order of appearance."""
  return list(dict.fromkeys(_run_of(row) for row in rows))


def render_section(rows: list[dict]) -> str:
  """The BENCHMARKS.md section (without markers): setup, runs, table and the rows as JSON."""
  measured = next((row for row in rows if "device" in row), {})
  batch = measured.get("batch_size", "?")
  run_lines = []
  for number, (command, date) in enumerate(_runs(rows), 1):
    row = next(r for r in rows if _run_of(r) == (command, date))
    label = f"Run {number}" if len(_runs(rows)) > 1 else "Run"
    run_lines.append(f"- {label}: `{command}`, {date}; device {row.get('device', '?')}, "
                     f"{row.get('cpus', '?')} host CPUs, {row.get('host', '?')}; "
                     f"{row.get('versions', '?')}")
  data = json.dumps(rows, separators=(",", ":")).replace(">", "\\u003e")  # no "-->" inside
  return "\n".join([
      "## XMC trainer: peak memory and step time, dense vs fixed fan-in", "",
      "The XMC trainer's train step (`sparsejax.xmc.make_train_steps`) on synthetic data "
      f"({TRAIN_BATCHES} batches of points, {NUM_FEATURES:,} features): embedding bag of width "
      f"{MODEL['embed_dim']}, {MODEL['hidden_layers']} residual MLP block, a linear "
      f"intermediate layer of {MODEL['intermediate']}, then a dense or fixed fan-in "
      f"classifier over L labels; batch {batch}, squared hinge loss summed over label "
      f"chunks of {_chunk(measured)}, the trainer's `--compute_dtype "
      f"{measured.get('compute_dtype', '?')}` (auto: bfloat16 on GPU; the column gives the "
      "resolved dtype), Adam, SET (or RigL: model `fixed fan-in, RigL`) every "
      f"{measured.get('set_interval', '?')} updates for the fixed fan-in classifier, "
      "states donated. Each variant ran in its own process with `SPARSEJAX_KERNELS` set "
      "to its impl (`auto: X`: the dispatch chose X for the classifier's shape), "
      "compiled ahead of time (compile s), then "
      f"{measured.get('warmup', '?')} warm-up steps and the timed ones, each waited for. "
      "Step ms: median of the timed steps that do not rewire; rewire step ms: median of "
      "those that do (SET or RigL); vs dense: step ms over the dense variant's of the "
      "same L in the same run; samples/s = batch / step ms. Peak MiB: the device "
      "allocator's peak "
      "in that process (model, optimizer, data and steps; the note says when the "
      "steps did not raise it) or, marked RSS, the process's peak resident memory on "
      "CPU. Compiled MiB: XLA's memory analysis of the step (donated states are in "
      "both args and out); as in the trainer's loop, a rewired classifier has a plain "
      "step and a rewiring one (its temp in the note), compile s covers both.", "",
      *run_lines, "",
      format_table(rows), "",
      f"{ROWS_PREFIX}{data} -->"])


def read_rows(path: pathlib.Path) -> list[dict]:
  """The rows stored in ``path``'s section (none when absent)."""
  text = path.read_text() if path.exists() else ""
  match = re.search(re.escape(ROWS_PREFIX) + r"(.*?) -->", text)
  return json.loads(match[1]) if match else []


def _chunk(row: dict) -> str:
  resolved = (row.get("config") or {}).get("label_chunk")
  if row.get("label_chunk") == 0:
    return f"the trainer's auto (`--label_chunk 0`: {resolved or '?'})"
  return f"{row.get('label_chunk', '?')}"


def _order(row: dict) -> tuple:
  fan_in, impl, regrowth = parse_variant(row["variant"])
  return row["labels"], fan_in, regrowth == "rigl", IMPLS.index(impl)


def run(labels: list[int], variants: list[str], *, steps: int, xla_steps: int, warmup: int,
        batch_size: int, label_chunk: int, set_interval: int, timeout: float, command: str,
        output: pathlib.Path | None, merge: bool, compute_dtype: str = "auto") -> list[dict]:
  """Measures every (L, variant) in its own process; returns the rows, writing as it goes."""
  for name in variants:
    parse_variant(name)  # fail on a typo before any child starts
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  kept = read_rows(output) if output and merge else []
  rows = []
  for num_labels in labels:
    for name in variants:
      fan_in, impl, _ = parse_variant(name)
      spec = dict(labels=num_labels, variant=name, warmup=warmup,
                  steps=xla_steps if fan_in and impl == "xla" else steps,
                  batch_size=batch_size, label_chunk=label_chunk, set_interval=set_interval,
                  compute_dtype=compute_dtype)
      print(f"--- L={num_labels:,} {name}", file=sys.stderr, flush=True)
      start = time.perf_counter()
      rows.append(dict(run_variant(spec, timeout), command=command, date=date))
      print(format_table(rows[-1:], rows).splitlines()[-1], flush=True)
      print(f"--- {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
      if output:
        done = {(r["labels"], r["variant"]) for r in rows}
        table = sorted([r for r in kept if (r["labels"], r["variant"]) not in done] + rows,
                       key=_order)
        write_section(output, render_section(table))
  return rows


def define_flags() -> None:
  flags.DEFINE_list("labels", ["670091", "3000000"], "label counts L")
  flags.DEFINE_list("variants", ["dense", "k64-auto", "k128-auto", "k64-auto-rigl", "k64-pallas"],
                    "'dense' or 'k<K>-<impl>[-rigl]' (fixed fan-in K; impl, one of "
                    f"{', '.join(IMPLS)}, goes to SPARSEJAX_KERNELS; -rigl: RigL regrowth)")
  flags.DEFINE_integer("steps", 8, "timed steps of all but the XLA gather variants")
  flags.DEFINE_integer("xla_steps", 3, "timed steps of the k<K>-xla variants (slow on GPU)")
  flags.DEFINE_integer("warmup", 2, "untimed steps before the timed ones")
  flags.DEFINE_integer("batch_size", 256, "points per step")
  flags.DEFINE_integer("label_chunk", 0, "labels scored at once in the loss (0: the trainer's "
                       "auto, 65536 on GPU)")
  flags.DEFINE_string("compute_dtype", "auto", "the trainer's --compute_dtype: auto (bfloat16 "
                      "on GPU), float32 or bfloat16; dense and sparse variants alike")
  flags.DEFINE_integer("set_interval", 4, "SET/RigL rewires every this many updates; with the "
                       "defaults 2 of the 8 timed steps rewire")
  flags.DEFINE_float("timeout", 150, "seconds per variant (its process) before it is killed")
  flags.DEFINE_string("output", str(ROOT / "BENCHMARKS.md"),
                      "file whose xmc_trainer section is rewritten")
  flags.DEFINE_bool("no_write", False, "print the table only")
  flags.DEFINE_bool("merge", False, "keep the section's rows of (L, variant) pairs not measured "
                    "in this run")
  flags.DEFINE_string("_child", "", "internal: measure one variant (JSON spec) in this process")


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS
  if FLAGS._child:
    measure(json.loads(FLAGS._child))
    return
  command = shlex.join(["python", "benchmarks/xmc_trainer.py", *sys.argv[1:]])
  rows = run([int(n) for n in FLAGS.labels], FLAGS.variants, steps=FLAGS.steps,
             xla_steps=FLAGS.xla_steps, warmup=FLAGS.warmup, batch_size=FLAGS.batch_size,
             label_chunk=FLAGS.label_chunk, set_interval=FLAGS.set_interval,
             timeout=FLAGS.timeout, command=command, compute_dtype=FLAGS.compute_dtype,
             output=None if FLAGS.no_write else pathlib.Path(FLAGS.output), merge=FLAGS.merge)
  print()
  print(format_table(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
