"""SμPar: init, forward multipliers and learning rates scaled by width and density.

With SμPar (Dey, Bergsma, Hestness, NeurIPS 2024) hyperparameters tuned on a
small dense model transfer to wider and sparser ones. ``m_d = d / d_base`` is
the width multiplier, ``m_rho = rho / rho_base`` the density multiplier of a
layer (``rho_base = 1``). Per parameter role:

=================  ===========  ==============  ======================
item               SP           μP              SμPar
=================  ===========  ==============  ======================
embedding init     s^2 / eta    s^2 / eta       s^2 / eta
embedding forward  x W          alpha_in x W    alpha_in x W
hidden init var    s^2          s^2 / m_d       s^2 / (m_d m_rho)
hidden LR (Adam)   eta          eta / m_d       eta / (m_d m_rho)
hidden LR (SGD)    eta          eta             eta / m_rho
output init / LR   s^2 / eta    s^2 / eta       s^2 / eta
output logits      h W          alpha_out h W   alpha_out h W / m_d
                                / m_d
attention logits   q.k/sqrt(d)  q.k / d_head    q.k / d_head
vector-like LR     eta          eta             eta
=================  ===========  ==============  ======================

Only hidden weights are sparse; each layer uses its own density, and with all
densities 1 SμPar is exactly μP. SμPar is derived for static sparsity; the
paper does not claim it for dynamic sparsity (RigL/GMP), where it overcorrects.
The derivation in brief and the reference: ``docs/methods.md``, "SμPar".

Pieces:

* ``ParamSpec(role, density)`` per parameter, keyed by leaf name
  (``"encoder/0/values"``): ``infer_specs`` derives it from a model built with
  sparsejax layers, or write it by hand for any pytree.
* ``SuPar``: the parameterization (SP, μP or SμPar, widths, base std,
  alpha_in/out) giving init stds, multipliers and LR multipliers.
* ``initialize``: redraws the weights with the per-role init std.
* ``scale_by_supar``: the optax transform applying the LR multipliers (and
  weight decay with either coupling).
* ``coord_check``: the coordinate check, mean |activation| per layer and step
  (``coord_check_optimizer`` its optimizer); ``coord_check_ratios`` and
  ``coord_check_drift`` compare settings with a reference.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsejax import _checks, _tree, nn
from sparsejax.fixed_fanin import FixedFanIn
from sparsejax.masked import MaskedDense
from sparsejax.topology import static_topology

__all__ = ["ROLES", "PARAMETERIZATIONS", "ParamSpec", "SuPar", "infer_specs", "initialize",
           "scale_by_supar", "CoordCheckModel", "coord_check", "coord_check_optimizer",
           "coord_check_ratios", "coord_check_drift"]

ROLES = ("embedding", "hidden", "output", "vector")
PARAMETERIZATIONS = ("sp", "mup", "supar")


class ParamSpec(NamedTuple):
  """What SμPar needs to know about one parameter.

  Attributes:
    role: ``"embedding"`` (input layer), ``"hidden"`` (width x width, may be
      sparse), ``"output"`` (readout), or ``"vector"`` (biases, norm gains).
    density: fraction of the dense weight that is stored, ``rho`` (hidden only).
  """
  role: str
  density: float = 1.0


def _check_spec(name: str, spec: ParamSpec) -> None:
  if spec.role not in ROLES:
    raise ValueError(f"{name}: role must be one of {ROLES}, got {spec.role!r}")
  if not 0 < spec.density <= 1:
    raise ValueError(f"{name}: density must be in (0, 1], got {spec.density!r}")
  if spec.role != "hidden" and spec.density != 1:
    raise ValueError(f"{name}: only hidden weights may be sparse, got {spec}")


@dataclasses.dataclass(frozen=True)
class SuPar:
  """A parameterization: SP, μP or SμPar at a given width.

  Arguments:
    parameterization: ``"sp"``, ``"mup"`` or ``"supar"``.
    width: model width ``d``.
    base_width: width ``d_base`` of the proxy the hyperparameters were tuned on.
    init_std: base init std ``s`` (of the proxy's weights).
    alpha_in: embedding forward multiplier (μP and SμPar).
    alpha_out: output forward multiplier (μP and SμPar), divided by ``m_d``.
  """
  parameterization: str = "supar"
  width: int = 256
  base_width: int = 256
  init_std: float = 0.02
  alpha_in: float = 1.0
  alpha_out: float = 1.0

  def __post_init__(self):
    if self.parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, "
                       f"got {self.parameterization!r}")
    for name in ("width", "base_width"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    if not self.init_std > 0:
      raise ValueError(f"init_std must be positive, got {self.init_std!r}")

  @property
  def width_multiplier(self) -> float:
    """``m_d = d / d_base``."""
    return self.width / self.base_width

  def _m_d(self) -> float:
    return 1.0 if self.parameterization == "sp" else self.width_multiplier

  def _m_rho(self, spec: ParamSpec) -> float:
    return spec.density if self.parameterization == "supar" else 1.0

  def init_std_of(self, spec: ParamSpec) -> float | None:
    """Init std of a parameter; ``None`` for vector-like ones (keep ones/zeros)."""
    if spec.role == "vector":
      return None
    if spec.role == "hidden":
      return self.init_std / math.sqrt(self._m_d() * self._m_rho(spec))
    return self.init_std

  def lr_multiplier(self, spec: ParamSpec, optimizer: str = "adam") -> float:
    """Factor on the base learning rate (Adam: 1/(m_d m_rho); SGD: 1/m_rho) for hidden."""
    if optimizer not in ("adam", "sgd"):
      raise ValueError(f"optimizer must be 'adam' (any Adam-family) or 'sgd', got {optimizer!r}")
    if spec.role != "hidden":
      return 1.0
    m_d = self._m_d() if optimizer == "adam" else 1.0
    return 1.0 / (m_d * self._m_rho(spec))

  @property
  def embedding_multiplier(self) -> float:
    """Multiplies the embedding output: ``alpha_in`` (1 under SP)."""
    return 1.0 if self.parameterization == "sp" else self.alpha_in

  @property
  def output_multiplier(self) -> float:
    """Multiplies the output logits: ``alpha_out / m_d`` (1 under SP)."""
    return 1.0 if self.parameterization == "sp" else self.alpha_out / self.width_multiplier

  def attention_scale(self, d_head: int) -> float:
    """Multiplies ``q.k``: ``1/d_head`` (μP, SμPar) or ``1/sqrt(d_head)`` (SP)."""
    return 1.0 / math.sqrt(d_head) if self.parameterization == "sp" else 1.0 / d_head


def _is_spec(x) -> bool:
  return isinstance(x, (ParamSpec, str))


def spec_table(specs) -> dict[str, ParamSpec]:
  """``{leaf name: ParamSpec}`` from a flat dict or a params-shaped pytree of specs.

  Leaves may be ``ParamSpec`` or a bare role string (density 1).
  """
  table = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]:
    name = _tree.path_name(path)
    spec = ParamSpec(spec) if isinstance(spec, str) else spec
    if not isinstance(spec, ParamSpec):
      raise ValueError(f"spec of {name!r} must be a ParamSpec or a role string, got {spec!r}")
    _check_spec(name, spec)
    table[name] = spec
  return table


# Layers that record their own density: SμPar's hidden weights whose rho it reads off the layer.
_DENSITY_LAYERS = (FixedFanIn, MaskedDense, nn.FixedFanInLinear, nn.MaskedLinear)


def _is_density_layer(node) -> bool:
  """A layer whose density ``rho`` its own fields give: fixed fan-in or masked dense.

  Not ``_tree.is_sparse_layer`` (the layers that SET rewires): that one also
  takes a plain ``values``/``indices`` mapping, which does not record ``in``
  (so its density must come from ``densities=``), and leaves out the masked
  layers, whose weight is stored dense.
  """
  return isinstance(node, _DENSITY_LAYERS)


def _weight_and_density(node) -> tuple[str, float]:
  """``(name of the weight field, density)`` of a ``_is_density_layer`` node."""
  weight = "values" if isinstance(node, (FixedFanIn, nn.FixedFanInLinear)) else "weight"
  if isinstance(node, (FixedFanIn, MaskedDense)):
    return weight, float(node.density)  # K / in, or the mask's mean
  return weight, node.fan_in / node.in_features


def _match(patterns: Mapping[str, Any] | None, name: str):
  for pattern, value in (patterns or {}).items():
    if re.search(pattern, name):
      return value
  return None


def infer_specs(model_or_params, *, roles: Mapping[str, str] | None = None,
                densities: Mapping[str, float] | None = None) -> dict[str, ParamSpec]:
  """Derives every float parameter's ``ParamSpec`` from a model.

  Sparse layers (``FixedFanIn``/``MaskedDense`` nodes, or the NNX
  ``FixedFanInLinear``/``MaskedLinear`` modules) are hidden with their own
  density ``K / in``; their biases and every other parameter of ndim <= 1 are
  vector-like; other matrices are dense hidden. Embedding and output layers
  cannot be told apart from the arrays: name them in ``roles``.

  Arguments:
    model_or_params: an ``nnx.Module`` (its ``nnx.Param`` state) or a pytree.
    roles: ``{regex: role}``; the first pattern found (``re.search``) in the
      name of a matrix (ndim >= 2) sets its role, e.g.
      ``{"embed": "embedding", "head": "output"}``. Leaves of ndim <= 1 are
      always vector-like.
    densities: ``{regex: density}`` overriding the inferred density.

  Returns:
    ``{leaf name: ParamSpec}``, names as in ``spec_table``/``scale_by_supar``.
  """
  if isinstance(model_or_params, nnx.Module):
    tree = nnx.as_pure(nnx.state(model_or_params, nnx.Param))
    nodes = nnx.iter_graph(model_or_params)
  else:
    tree = model_or_params
    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_density_layer)[0]
  known = {}
  for path, node in nodes:
    if _is_density_layer(node):
      weight, density = _weight_and_density(node)
      known[f"{_tree.path_name(path)}/{weight}"] = density

  specs = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = _tree.path_name(path)
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      continue  # indices, masks: not parameters
    role = "vector" if jnp.ndim(leaf) <= 1 else (_match(roles, name) or "hidden")
    override = _match(densities, name)
    if role == "hidden" and override is None and name not in known and name.endswith("values"):
      raise ValueError(f"cannot tell the density of {name!r} from its arrays; pass "
                       f"densities={{{name!r}: K / in}}")
    density = known.get(name, 1.0) if override is None else override
    spec = ParamSpec(role, float(density) if role == "hidden" else 1.0)
    _check_spec(name, spec)
    specs[name] = spec
  return specs


def initialize(params, specs, parameterization: SuPar, *, key: jax.Array):
  """Redraws every non-vector float leaf as ``N(0, init_std_of(spec)^2)``.

  Vector-like leaves and non-float leaves (indices, masks) are returned as they
  are. Entries outside a ``MaskedDense``'s mask are drawn too; they are never
  read. Leaf ``i`` (in sorted name order) uses ``fold_in(key, i)``.

  Arguments:
    params: a params pytree (use ``nnx.state(model, nnx.Param)`` and
      ``nnx.update`` for a Flax model).
    specs: ``{name: ParamSpec}`` or a params-shaped pytree of specs.
    parameterization: the ``SuPar`` giving the stds.
    key: PRNG key.

  Returns:
    ``params`` with the weights redrawn.
  """
  _checks.check_key(key)
  table = spec_table(specs)
  order = {name: i for i, name in enumerate(sorted(table))}

  def draw(path, leaf):
    name = _tree.path_name(path)
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      return leaf
    spec = _lookup(table, name)
    std = parameterization.init_std_of(spec)
    if std is None:
      return leaf
    noise = jax.random.normal(jax.random.fold_in(key, order[name]), jnp.shape(leaf), jnp.float32)
    return (std * noise).astype(jnp.result_type(leaf))

  return jax.tree_util.tree_map_with_path(draw, params)


def _lookup(table: Mapping[str, ParamSpec], name: str) -> ParamSpec:
  if name not in table:
    raise ValueError(f"no SμPar spec for parameter {name!r}; specs cover {sorted(table)}")
  return table[name]


def scale_by_supar(specs, parameterization: SuPar, *, optimizer: str = "adam",
                   weight_decay: float = 0.0,
                   decay_coupling: str = "lr") -> optax.GradientTransformation:
  """Scales each update by its SμPar LR multiplier, optionally adding weight decay.

  Place it after the optimizer's scaling and before the learning rate::

    optax.chain(optax.scale_by_adam(), scale_by_supar(specs, p, weight_decay=0.1),
                optax.scale_by_learning_rate(lr))

  Arguments:
    specs: ``{name: ParamSpec}`` (``infer_specs``) or a params-shaped pytree of
      ``ParamSpec``/role strings, like ``optax.multi_transform`` labels. Leaves
      are matched by name, so the same specs serve the params with or without
      sparse-layer indices (inside ``set_topology``). Non-float leaves pass through.
    parameterization: the ``SuPar`` giving the multipliers.
    optimizer: ``"adam"`` (Adam family: hidden ``1/(m_d m_rho)``) or ``"sgd"``
      (hidden ``1/m_rho``).
    weight_decay: decay rate ``wd`` on embedding, hidden and output weights.
    decay_coupling: ``"lr"`` (default, as in the reference code's AdamW): the
      decay is scaled by the LR multiplier too, so after the learning rate it
      is ``lr * mult * wd * w``. ``"independent"``: ``lr * wd * w`` for every
      weight (μP's decoupled variant).

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``.
  """
  table = spec_table(specs)
  if decay_coupling not in ("lr", "independent"):
    raise ValueError(f"decay_coupling must be 'lr' or 'independent', got {decay_coupling!r}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
  parameterization.lr_multiplier(ParamSpec("vector"), optimizer)  # validates optimizer

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if weight_decay and params is None:
      raise ValueError("scale_by_supar with weight_decay needs params")

    def scale(path, update, param=None):
      if not jnp.issubdtype(jnp.result_type(update), jnp.floating):
        return update
      spec = _lookup(table, _tree.path_name(path))
      mult = parameterization.lr_multiplier(spec, optimizer)
      scaled = mult * update
      if weight_decay and spec.role != "vector":
        decay = weight_decay * (mult if decay_coupling == "lr" else 1.0)
        scaled = scaled + decay * param
      return scaled.astype(jnp.result_type(update))

    if weight_decay:
      return jax.tree_util.tree_map_with_path(scale, updates, params), state
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


class CoordCheckModel(NamedTuple):
  """What ``coord_check`` trains.

  Attributes:
    params: params pytree.
    specs: ``{name: ParamSpec}`` for ``scale_by_supar``.
    forward: ``(params, batch) -> (loss, {layer name: activation})``.
  """
  params: Any
  specs: Mapping[str, ParamSpec]
  forward: Callable[[Any, Any], tuple[jax.Array, Mapping[str, jax.Array]]]


def coord_check(build: Callable[..., CoordCheckModel], batch, *, base: SuPar,
                parameterizations: Sequence[str] = PARAMETERIZATIONS,
                widths: Sequence[int] = (), densities: Sequence[float] = (1.0,),
                steps: int = 3, learning_rate: float = 1e-2, optimizer: str = "adam",
                seeds: int = 1, key: jax.Array) -> list[dict]:
  """The coordinate check: mean |activation| of every layer over a few steps.

  For every parameterization, width, density and seed, builds a model, takes
  ``steps`` optimizer steps on the fixed ``batch`` with the base learning
  rate scaled by ``scale_by_supar``, and records each layer's mean
  ``|activation|`` before the first step (``step=0``) and after each step. Under
  SμPar every layer's curve should not move with density or width where each
  output reads many inputs (``rho d`` >~ 16; see ``coord_check_drift``); under
  SP and μP activations shrink as density falls.

  Arguments:
    build: ``build(parameterization: SuPar, density, *, key) -> CoordCheckModel``.
    batch: fixed batch passed to ``forward``.
    base: ``SuPar`` template (base width, init std, alphas); its
      ``parameterization`` and ``width`` are replaced per run.
    parameterizations: subset of ``("sp", "mup", "supar")``.
    widths: widths to try (default: ``base.width``).
    densities: hidden-layer densities to try.
    steps: optimizer steps.
    learning_rate: base learning rate.
    optimizer: ``"adam"`` or ``"sgd"``.
    seeds: number of seeds; seed ``i`` builds with ``fold_in(key, i)``.
    key: PRNG key.

  Returns:
    Rows ``{"parameterization", "width", "density", "seed", "step", "layer",
    "mean_abs"}``, one per layer and step.
  """
  if steps < 0 or seeds < 1:
    raise ValueError(f"need steps >= 0 and seeds >= 1, got steps={steps}, seeds={seeds}")
  _checks.check_key(key)
  rows = []
  for name in parameterizations:
    for width in widths or (base.width,):
      p = dataclasses.replace(base, parameterization=name, width=width)
      for density in densities:
        for seed in range(seeds):
          model = build(p, density, key=jax.random.fold_in(key, seed))
          tx = coord_check_optimizer(model.specs, p, learning_rate=learning_rate,
                                     optimizer=optimizer)
          rows += _coord_run(model, tx, batch, steps, dict(
              parameterization=name, width=width, density=density, seed=seed))
  return rows


def coord_check_optimizer(specs, parameterization: SuPar, *, learning_rate: float,
                          optimizer: str = "adam") -> optax.GradientTransformation:
  """The optimizer of ``coord_check``: Adam (or plain SGD), ``scale_by_supar``, ``-learning_rate``.

  Arguments:
    specs: ``{name: ParamSpec}`` of the model's parameters.
    parameterization: the ``SuPar`` giving the LR multipliers.
    learning_rate: base learning rate.
    optimizer: ``"adam"`` or ``"sgd"``.

  Returns:
    The transform, wrapped in ``static_topology`` (sparse-layer indices pass through).
  """
  scale = optax.scale_by_adam() if optimizer == "adam" else optax.identity()
  return static_topology(optax.chain(
      scale, scale_by_supar(specs, parameterization, optimizer=optimizer),
      optax.scale(-learning_rate)))


def _coord_run(model: CoordCheckModel, tx, batch, steps: int, labels: dict) -> list[dict]:
  @jax.jit
  def step(params, state):
    (_, acts), grads = jax.value_and_grad(model.forward, has_aux=True, allow_int=True)(
        params, batch)
    updates, state = tx.update(grads, state, params)
    means = {layer: jnp.mean(jnp.abs(a.astype(jnp.float32))) for layer, a in acts.items()}
    return optax.apply_updates(params, updates), state, means

  params, state, rows = model.params, tx.init(model.params), []
  for t in range(steps + 1):
    new_params, new_state, means = step(params, state)
    rows += [dict(labels, step=t, layer=layer, mean_abs=float(value))
             for layer, value in means.items()]
    params, state = new_params, new_state
  return rows


def coord_check_ratios(rows: Sequence[dict], *, width: int, density: float,
                       steps: Sequence[int] = (1, 2, 3)) -> list[dict]:
  """Every setting's seed-averaged mean |activation| over the reference's, per layer and step.

  Arguments:
    rows: ``coord_check`` rows.
    width, density: the reference setting.
    steps: the steps compared.

  Returns:
    Rows ``{"parameterization", "layer", "step", "width", "density", "ratio"}``,
    one per setting (the reference's own included, ratio 1).
  """
  table = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in rows:
    if r["step"] in steps:
      key = (r["parameterization"], r["layer"], r["step"])
      table[key][(r["width"], r["density"])].append(r["mean_abs"])
  ratios = []
  for (name, layer, step), by_setting in table.items():
    if (width, density) not in by_setting:
      raise ValueError(f"no reference run at width={width}, density={density} "
                       f"for {name} {layer} step {step}")
    reference = sum(by_setting[width, density]) / len(by_setting[width, density])
    ratios += [dict(parameterization=name, layer=layer, step=step, width=w, density=d,
                    ratio=(sum(values) / len(values)) / reference)
               for (w, d), values in by_setting.items()]
  return ratios


def coord_check_drift(rows: Sequence[dict], *, width: int, density: float,
                      steps: Sequence[int] = (1, 2, 3)) -> dict[str, float]:
  """The largest factor by which any layer's mean |activation| departs from a reference.

  For each parameterization, over every layer, the given steps and every
  (width, density) setting, the seed-averaged mean |activation| is compared with
  that of the reference setting ``(width, density)`` at the same layer and
  step (``coord_check_ratios``); the worst ratio ``max(r, 1/r)`` is returned.
  SμPar's claim is < 1.2 where the fan-in ``rho d`` is large: its LR holds the
  aligned part of an update fixed, while the rest grows as ``1/sqrt(rho d)``
  (``docs/supar_coord_check/RESULTS.md``).

  Returns:
    ``{parameterization: worst ratio}``.
  """
  worst = {}
  for r in coord_check_ratios(rows, width=width, density=density, steps=steps):
    name = r["parameterization"]
    worst[name] = max(worst.get(name, 1.0), r["ratio"], 1 / r["ratio"])
  return worst
