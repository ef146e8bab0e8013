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

from sparsejax.nn import EmbeddingBag, FixedFanInLinear
from sparsejax.xmc.classifier import LabelMajorLinear, dense_logits, fixed_fanin_logits
from sparsejax.xmc.sharded import pad_labels

__all__ = ["CLASSIFIER", "XMCModel", "in_classifier"]

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
    classifier_bias: initial bias of every label. Almost every label is a
      negative for almost every point, so starting all scores at the negative
      optimum (``-1`` for squared hinge, about ``-log L`` for BCE; see
      ``sparsejax.xmc.initial_classifier_bias``) spares the first steps from
      pushing all L scores down. The aux head's bias starts at ``-log
      num_clusters`` for the same reason.
    rngs: parameter initialisation (``rngs.params()``).

  Attributes:
    bag, mlp (list of ``(embed_dim, embed_dim)`` ``nnx.Linear``), intermediate (or
    None), classifier (``FixedFanInLinear`` or ``LabelMajorLinear``), aux_head (or None).
  """

  def __init__(self, *, num_features: int, num_labels: int, embed_dim: int, hidden_layers: int,
               intermediate: int, fan_in: int, num_clusters: int, classifier_bias: float = 0.0,
               rngs: nnx.Rngs):
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
