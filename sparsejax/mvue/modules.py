"""``PrunedGrad``: the Flax NNX wrapper that N:M-prunes a layer's output gradient.

Re-exported as ``sparsejax.nn.PrunedGrad`` beside the other NNX modules.
"""

from __future__ import annotations

import jax
from flax import nnx

from sparsejax.mvue.backward import prune_grad, prune_weight_grad

__all__ = ["PrunedGrad"]


class PrunedGrad(nnx.Module):
  """Wraps a layer so that the gradient w.r.t. its output, dY, is N:M-pruned.

  Works with any module called as ``layer(x)`` with output ``(..., out)``:
  ``nnx.Linear``, ``FixedFanInLinear``, ``MaskedLinear``. Every call draws a
  fresh key from ``rngs`` (stream ``grad_prune``, else ``default``), so every
  step prunes differently and the same seed repeats exactly.

  Arguments:
    layer: the wrapped module.
    n, m, method: as in ``sparsejax.nm_prune`` (``"mvue"``, ``"mvue_approx"``,
      ``"greedy"``).
    weight_grad_only: if True (the 2:4 training recipe), only the layer's
      own parameters see the pruned dY, pruned along the token axis (the
      contraction axis of ``dW = dY^T X``), and its input gets the dense
      gradient. If False, dY itself is pruned for every consumer.
    axis: with ``weight_grad_only=False``: ``"tokens"`` (all leading axes
      flattened) or ``"features"`` (the last axis, the contraction axis of
      ``dX = dY W^T``).
    deterministic: True (``model.eval()`` sets it; ``model.train()`` clears it): the
      layer alone, no key drawn, nothing pruned. For inference, where there is no
      backward pass, so any number of tokens goes.
    rngs: source of the keys.
  """

  def __init__(self, layer: nnx.Module, *, n: int, m: int, method: str,
               weight_grad_only: bool = True, axis: str = "tokens", deterministic: bool = False,
               rngs: nnx.Rngs):
    if axis not in ("tokens", "features"):
      raise ValueError(f"axis must be 'tokens' or 'features', got {axis!r}")
    self.layer, self.rngs = layer, rngs
    self.n, self.m, self.method = n, m, method
    self.weight_grad_only, self.axis = weight_grad_only, axis
    self.deterministic = deterministic

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic:
      return self.layer(x)
    key = None if self.method == "greedy" else self.rngs.grad_prune()
    prune = dict(n=self.n, m=self.m, method=self.method)
    if self.weight_grad_only:
      graphdef, state = nnx.split(self.layer)
      return prune_weight_grad(lambda x, state: nnx.merge(graphdef, state)(x), x, state, key=key,
                               **prune)
    y = self.layer(x)
    tokens = y.reshape(-1, y.shape[-1])
    axis = 0 if self.axis == "tokens" else 1
    return prune_grad(tokens, key=key, axis=axis, **prune).reshape(y.shape)
