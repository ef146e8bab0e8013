"""The XMC model: a sparse-feature encoder and a classifier over all labels.

::

  feature bag --EmbeddingBag--> z --(z + Linear(ReLU(z))) x hidden_layers--> z
  z --(optional intermediate Linear)--> h --classifier--> L label scores
  z --aux head (Linear)--> cluster scores   (auxiliary objective, early training)

The classifier is a ``FixedFanInLinear`` (each label reads ``fan_in`` of the
``h`` features) or, as the dense baseline, a ``LabelMajorLinear``. Both expose
their parameters as a label-major pytree (every leaf ``(L, ...)``, see
``sparsejax.xmc.classifier``) so that the chunked loss and top-k can score the
labels chunk by chunk and the ``(batch, L)`` logits never exist. The
intermediate layer is linear: it only widens the pool of features that a
sparse label can read (``docs/methods.md``, "The XMC recipe").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax import supar
from sparsejax.mvue import PrunedGrad
from sparsejax.nn import EmbeddingBag, FixedFanInLinear
from sparsejax.xmc.classifier import LabelMajorLinear, dense_logits, fixed_fanin_logits
from sparsejax.xmc.sharded import pad_labels

__all__ = ["CLASSIFIER", "XMCModel", "in_classifier", "supar_classifier"]

# The attribute of ``XMCModel`` that holds the classifier: the first key of its
# state paths, its SET layer name and its optimizer param group. The label-sharded
# layout, the row fitting on restore and the param groups find it by this name.
CLASSIFIER = "classifier"


def in_classifier(path) -> bool:
  """Whether a pytree key path (a model, optimizer or checkpoint state leaf) is the classifier's.

  True when any key of ``path`` is ``CLASSIFIER``: the model's
  ``classifier/values`` and the Adam moments under the optimizer state's
  ``.../classifier/values`` alike.
  """
  return any(getattr(key, "key", None) == CLASSIFIER for key in path)


class XMCModel(nnx.Module):
  """Encoder over a bag of sparse features, optional intermediate layer, classifier, aux head.

  Arguments:
    num_features: size of the sparse input (feature vocabulary).
    num_labels: ``L``.
    embed_dim: width of the feature embedding (the bag's output) and of the MLP.
    hidden_layers: how many residual blocks ``z + Linear(ReLU(z))`` follow the
      bag; 0 gives a linear encoder (the bag alone). Residual, so that the
      linear path from features to labels, which sparse tf-idf data favours,
      is there from the start.
    intermediate: width of the linear layer between encoder and classifier,
      or 0 for none.
    fan_in: ``K`` of the fixed fan-in classifier, or 0 for the dense baseline.
    num_clusters: outputs of the auxiliary cluster head, or 0 for no head.
    grad_prune: ``""``, or ``"method:n:m"`` (``"mvue:1:2"``, ``"mvue:2:4"``,
      ``"mvue_approx:2:4"``, ``"greedy:n:m"``): each ``mlp`` layer is wrapped in
      ``PrunedGrad`` so that its weight gradient uses dY N:M-pruned along the
      batch (``sparsejax.mvue``; the input keeps the dense gradient). Its keys
      come from ``rngs.params()`` drawn after every initialisation, so the
      initial weights are those of the unpruned model.
    classifier_bias: initial bias of every label. Almost every label is a
      negative for almost every point, so starting all scores at the negative
      optimum (``-1`` for squared hinge, about ``-log L`` for BCE; see
      ``sparsejax.xmc.initial_classifier_bias``) spares the first steps from
      pushing all L scores down. The aux head's bias starts at ``-log
      num_clusters`` for the same reason.
    rngs: parameter initialisation (``rngs.params()``).

  Attributes:
    bag, mlp (list of ``(embed_dim, embed_dim)`` ``nnx.Linear``, each in a ``PrunedGrad``
    with ``grad_prune``), intermediate (or
    None), classifier (``FixedFanInLinear`` or ``LabelMajorLinear``), aux_head (or None).
  """

  def __init__(self, *, num_features: int, num_labels: int, embed_dim: int, hidden_layers: int,
               intermediate: int, fan_in: int, num_clusters: int, grad_prune: str = "",
               classifier_bias: float = 0.0, rngs: nnx.Rngs):
    self.bag = EmbeddingBag(num_features, embed_dim, rngs=rngs)
    self.mlp = nnx.List([nnx.Linear(embed_dim, embed_dim, rngs=rngs)
                         for _ in range(hidden_layers)])
    self.intermediate = nnx.Linear(embed_dim, intermediate, rngs=rngs) if intermediate else None
    classifier_in = intermediate or embed_dim
    self.classifier = (FixedFanInLinear(classifier_in, num_labels, fan_in, rngs=rngs) if fan_in
                       else LabelMajorLinear(classifier_in, num_labels, rngs=rngs))
    self.classifier.bias[...] = jnp.full((num_labels,), classifier_bias, jnp.float32)
    # BCE over clusters: its bias starts near the all-negative optimum too.
    self.aux_head = (nnx.Linear(embed_dim, num_clusters, rngs=rngs,
                                bias_init=nnx.initializers.constant(-math.log(num_clusters)))
                     if num_clusters else None)
    if grad_prune:
      method, n, m = grad_prune.split(":")
      key = rngs.params()
      self.mlp = nnx.List([
          PrunedGrad(layer, n=int(n), m=int(m), method=method,
                     rngs=nnx.Rngs(grad_prune=jax.random.fold_in(key, i)))
          for i, layer in enumerate(self.mlp)])

  @property
  def sparse(self) -> bool:
    """Whether the classifier is a fixed fan-in layer."""
    return isinstance(self.classifier, FixedFanInLinear)

  @property
  def logits_fn(self):
    """``(classifier chunk, h) -> (B, chunk)`` logits, for the chunked loss and top-k."""
    return fixed_fanin_logits if self.sparse else dense_logits

  def encode(self, feature_ids: jax.Array, feature_values: jax.Array,
             feature_mask: jax.Array) -> jax.Array:
    """Padded feature bags ``(B, F)`` (ids, values, mask) -> encoder output ``(B, d_enc)``."""
    z = self.bag(feature_ids, feature_values, feature_mask)
    for layer in self.mlp:
      z = z + layer(jax.nn.relu(z))
    return z

  def classifier_input(self, z: jax.Array) -> jax.Array:
    """Encoder output ``(B, d_enc)`` -> classifier input ``(B, d_cls)``."""
    return z if self.intermediate is None else self.intermediate(z)

  def classifier_params(self) -> dict:
    """The classifier as a label-major pytree: every leaf ``(rows, ...)``.

    ``{"values": (L, K), "indices": (L, K), "bias": (L,)}`` for the fixed
    fan-in classifier, ``{"kernel_t": (L, d), "bias": (L,)}`` for the dense
    one; ``rows`` is ``L``, or more after ``pad_labels``.
    """
    c = self.classifier
    if self.sparse:
      return {"values": c.values[...], "indices": c.indices[...], "bias": c.bias[...]}
    return {"kernel_t": c.kernel_t[...], "bias": c.bias[...]}

  def pad_labels(self, num_padded: int) -> None:
    """Pads the classifier's arrays (in place) with zero rows up to ``num_padded``.

    For label sharding (``sparsejax.xmc.Layout``): the first ``L`` rows stay
    those of the unsharded model, and ``classifier.out_features`` stays ``L``.
    """
    for name, value in pad_labels(self.classifier_params(), num_padded).items():
      getattr(self.classifier, name).set_value(value)

  def num_params(self) -> dict[str, int]:
    """``{"total", "classifier"}``: parameter counts (not the indices), without padding rows."""
    num_labels = self.classifier.out_features
    classifier = jax.tree.leaves(nnx.state(self.classifier, nnx.Param))
    unpadded = lambda x: x.size // x.shape[0] * num_labels  # classifier leaves: (rows, ...)
    total = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
    return {"total": int(total - sum(x.size - unpadded(x) for x in classifier)),
            "classifier": int(sum(unpadded(x) for x in classifier))}


def supar_classifier(model: XMCModel, *, key: jax.Array) -> float:
  """SμPar for a fixed fan-in classifier: redraws its values, returns its LR multiplier.

  The classifier is a hidden layer of density ``rho = K / in`` (``sparsejax.supar``)
  against the dense classifier of the same width (``m_d = 1``), whose init std is
  ``1 / sqrt(3 in)`` (uniform on ``+-1 / sqrt(in)``): the values are redrawn normal
  with std ``1 / sqrt(3 in rho) = 1 / sqrt(3 K)`` and the classifier's Adam learning
  rate is to be multiplied by ``1 / rho = in / K``. (The fixed fan-in init already has
  that variance: SμPar's change here is the learning rate.) Call it before
  ``XMCModel.pad_labels``.

  Arguments:
    model: an ``XMCModel`` with a fixed fan-in classifier (changed in place).
    key: the values' draw.

  Returns:
    The classifier's learning-rate multiplier ``in / K``.
  """
  if not model.sparse:
    raise ValueError("SμPar scales a sparse classifier; this model's classifier is dense")
  c = model.classifier
  parameterization = supar.SuPar("supar", width=c.in_features, base_width=c.in_features,
                                 init_std=1 / math.sqrt(3 * c.in_features))
  spec = supar.ParamSpec("hidden", density=c.fan_in / c.in_features)
  values = c.values[...]
  c.values[...] = (parameterization.init_std_of(spec)
                   * jax.random.normal(key, values.shape, jnp.float32)).astype(values.dtype)
  return parameterization.lr_multiplier(spec)
