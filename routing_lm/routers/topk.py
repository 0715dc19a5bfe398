"""Top-k softmax routing with the Switch/GShard load-balancing loss and the ST-MoE
router z-loss (paper_spec.md section 4.4): the baseline most users compare against.

    balance = E * sum_e f_e * p_e     f_e: fraction of assignments to e, p_e: mean prob of e
    z_loss  = mean_t logsumexp(logits_t)^2
Combine weights are the softmax probabilities of the chosen experts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from routing_lm.routers import base


def balance_loss(probs: jax.Array, expert_ids: jax.Array) -> jax.Array:
  """Switch load-balancing loss E * sum_e f_e p_e for probs [T, E], ids [T, k]; 1 if uniform."""
  num_experts = probs.shape[-1]
  f = jnp.bincount(expert_ids.reshape(-1), length=num_experts) / expert_ids.size
  return num_experts * jnp.sum(f * probs.mean(axis=0))


z_loss = base.z_loss    # the shared router z-loss (routers/base.py)


class TopKRouter(base.Router):
  """Top-k softmax router with load-balancing and z losses
  (`model.routing.topk`: balance_coef, z_loss_coef)."""

  name = "topk"
  defaults = {"balance_coef": 0.01, "z_loss_coef": 0.001}

  def __init__(self, spec: base.RouterSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.w = base.router_weight(spec, rngs)
    self.balance_coef = float(spec.cfg.balance_coef)
    self.z_loss_coef = float(spec.cfg.z_loss_coef)

  def __call__(self, x, token_ids, *, train, rng):
    logits = base.router_logits(x, self.w)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, self.top_k)
    z_aux, z_metrics = base.z_loss_terms(logits, self.z_loss_coef)
    aux = {"balance": self.balance_coef * balance_loss(probs, ids), **z_aux}
    return base.Routing(ids.astype(jnp.int32), weights, aux,
                        {**base.routing_metrics(ids, self.num_experts, probs), **z_metrics})
