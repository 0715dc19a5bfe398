"""RL-R: routing as a policy trained with REINFORCE (paper_spec.md section 4.3).

The router is a policy pi(e | x) = softmax(W stop_gradient(x)). Training samples one
expert per token; evaluation takes the argmax. The combine weight is pi(e | x) with its
gradient stopped (`rlr.scale_output`; 1.0 when off), so the language-model loss never
reaches the router's parameters. Instead the loss (`train.py`, the one place that builds
the differentiated scalar) adds the REINFORCE surrogate

    reinforce_coef * mean_t[ -stop_gradient(r_t - b_t) * log pi(e_t | x_t) ]

with reward r_t = -(token t's next-token NLL) and the leave-one-out baseline
b_t = mean of the other tokens' rewards (unbiased: b_t does not depend on e_t). The
router also gets an entropy bonus and a Switch-style balance term on pi, as aux losses,
and an optional router z-loss on its logits (`z_loss_coef`, default 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from routing_lm.routers import base
from routing_lm.routers.topk import balance_loss


class RLRRouter(base.Router):
  """RL-R: a softmax policy over experts, sampled in training, trained by REINFORCE.

  Config (`model.routing.rlr`): entropy_coef, balance_coef, scale_output, reinforce_coef
  (the weight of `base.reinforce_surrogate` in the loss: `policy_gradient_coef`),
  z_loss_coef (router z-loss, `base.z_loss_terms`; 0 = off).
  """

  name = "rlr"
  defaults = {"entropy_coef": 0.01, "balance_coef": 0.01, "scale_output": True,
              "reinforce_coef": 1.0, "z_loss_coef": 0.0}
  max_top_k = 1

  def __init__(self, spec: base.RouterSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    cfg = spec.cfg
    self.w = base.router_weight(spec, rngs)
    self.entropy_coef = float(cfg.entropy_coef)
    self.balance_coef = float(cfg.balance_coef)
    self.scale_output = bool(cfg.scale_output)
    self.policy_gradient_coef = float(cfg.reinforce_coef)
    self.z_loss_coef = float(cfg.z_loss_coef)

  def __call__(self, x, token_ids, *, train, rng):
    logits = base.router_logits(jax.lax.stop_gradient(x), self.w)      # [T, E]
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_pi)
    if train:
      ids = jax.random.categorical(rng, logits, axis=-1)[:, None]
    else:
      ids = jnp.argmax(logits, axis=-1)[:, None]
    ids = ids.astype(jnp.int32)
    log_probs = base.take(log_pi, ids)                                  # [T, 1]
    weights = (jax.lax.stop_gradient(jnp.exp(log_probs)) if self.scale_output
               else jnp.ones(ids.shape, jnp.float32))
    z_aux, z_metrics = base.z_loss_terms(logits, self.z_loss_coef)
    metrics = {**base.routing_metrics(ids, self.num_experts, probs), **z_metrics}
    if train:                         # the sampled expert is the greedy (eval) one
      metrics["agreement"] = base.agreement(ids, logits)
    aux = {"entropy_bonus": -self.entropy_coef * metrics["entropy"],
           "balance": self.balance_coef * balance_loss(probs, ids), **z_aux}
    return base.Routing(ids, weights, aux, metrics, log_probs=log_probs)
