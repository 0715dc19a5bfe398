"""Auxiliary-loss-free balancing (DeepSeek-V3, Liu et al. 2024, section 2.1.2; Wang et al.
2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").

    affinity  s_te = sigmoid(x_t . w_e)          [T, E]   (`score`: 'sigmoid', DeepSeek-V3;
                                                           'softmax' for softmax(x W))
    selection ids_t = top-k_e (s_te + b_e)               b [E]: a per-expert bias
    gate      g_te = s_te for the chosen e, WITHOUT b; for k > 1 normalised over the k
              chosen (g = s / sum_chosen s, DeepSeek-V3); for k = 1 the raw affinity (a
              normalised single weight is 1, which would leave the router no gradient
              from the language-model loss; S-BASE's k = 1 gate is the same sigmoid)
    update    b_e <- b_e + update_rate * sign(mean_e' load_e' - load_e)   after each step

The bias only selects: it is a `base.RouterState` (not trained by the optimizer, in
every checkpoint), changed by `update_state` in the jitted train step after the
optimizer update, from the step's global load (the routed FFW averages the routing
groups' loads: an all-reduce on a mesh). A training step's forward therefore routes each
token from its own representation and the bias alone: a sequence's outputs do not depend
on the other sequences of the batch (dropless, or a capacity that drops nothing); only
the bias update between steps sees the whole batch.

Optional complementary sequence-wise balance loss (`seq_balance_coef`; 0 = off, the
default: the method needs no auxiliary loss; DeepSeek-V3 used 1e-4), per sequence of
S tokens, averaged over sequences:

    L = coef * sum_e f_e P_e,  f_e = E / (K S) sum_t 1[e chosen for t],
                               P_e = 1/S sum_t s'_te,  s'_te = s_te / sum_e' s_te'

and the router z-loss on the logits (`z_loss_coef`, default 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from routing_lm.errors import require
from routing_lm.routers import base

SCORES = ("sigmoid", "softmax")


def affinities(logits: jax.Array, score: str) -> jax.Array:
  """logits [T, E] -> affinities [T, E] in (0, 1): sigmoid or softmax (`score`)."""
  return jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits, axis=-1)


def gate_weights(scores: jax.Array, ids: jax.Array) -> jax.Array:
  """The chosen experts' affinities [T, k] (no bias); normalised over the k if k > 1."""
  chosen = base.take(scores, ids)
  if ids.shape[-1] == 1:
    return chosen
  return chosen / jnp.maximum(jnp.sum(chosen, axis=-1, keepdims=True), 1e-20)


def sequence_balance_loss(scores: jax.Array, ids: jax.Array, seq_len: int) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss sum_e f_e P_e (module docstring), averaged
  over the T / seq_len sequences of scores [T, E], ids [T, k]; 1 when balanced."""
  t, e = scores.shape
  k = ids.shape[-1]
  n = t // seq_len
  chosen = jax.nn.one_hot(ids, e, dtype=jnp.float32).sum(axis=1).reshape(n, seq_len, e)
  f = chosen.sum(axis=1) * e / (k * seq_len)                                    # [n, E]
  normed = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-20)
  p = normed.reshape(n, seq_len, e).mean(axis=1)                                # [n, E]
  return jnp.mean(jnp.sum(f * p, axis=-1))


def bias_step(bias: jax.Array, load: jax.Array, update_rate: float) -> jax.Array:
  """b + update_rate * sign(mean(load) - load): overloaded experts down, underloaded up."""
  return bias + update_rate * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)


class LossFreeRouter(base.Router):
  """Top-k on affinities plus a selection-only per-expert bias, updated between steps.

  Config (`model.routing.lossfree`): score ('sigmoid' or 'softmax'), update_rate (the bias
  step, DeepSeek-V3's gamma = 1e-3), seq_balance_coef (0 = no auxiliary loss),
  z_loss_coef (0 = off).
  """

  name = "lossfree"
  defaults = {"score": "sigmoid", "update_rate": 1e-3, "seq_balance_coef": 0.0,
              "z_loss_coef": 0.0}
  takes_seq_len = True

  @classmethod
  def check_config(cls, spec: base.RouterSpec) -> None:
    super().check_config(spec)
    c = spec.cfg
    require(c.score in SCORES, "model.routing.lossfree.score", c.score, f"one of {SCORES}")
    require(c.update_rate >= 0, "model.routing.lossfree.update_rate", c.update_rate,
            "a number >= 0 (0 freezes the bias)")
    require(c.seq_balance_coef >= 0, "model.routing.lossfree.seq_balance_coef",
            c.seq_balance_coef, "a number >= 0 (0 = off)")

  def __init__(self, spec: base.RouterSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    cfg = spec.cfg
    self.w = base.router_weight(spec, rngs)
    self.bias = base.RouterState(jnp.zeros((spec.num_experts,), jnp.float32))
    self.score = str(cfg.score)
    self.update_rate = float(cfg.update_rate)
    self.seq_balance_coef = float(cfg.seq_balance_coef)
    self.z_loss_coef = float(cfg.z_loss_coef)

  def __call__(self, x, token_ids, *, train, rng, seq_len=None):
    """seq_len: tokens per sequence (x holds whole sequences); None = one sequence."""
    logits = base.router_logits(x, self.w)                                  # [T, E]
    scores = affinities(logits, self.score)
    _, ids = jax.lax.top_k(jax.lax.stop_gradient(scores) + self.bias[...], self.top_k)
    weights = gate_weights(scores, ids)
    aux, z_metrics = base.z_loss_terms(logits, self.z_loss_coef)
    if self.seq_balance_coef > 0 and train:
      aux["seq_balance"] = self.seq_balance_coef * sequence_balance_loss(
          scores, ids, seq_len or x.shape[0])
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    metrics = {**base.routing_metrics(ids, self.num_experts, probs), **z_metrics,
               "bias_range": jnp.max(self.bias[...]) - jnp.min(self.bias[...])}
    return base.Routing(ids.astype(jnp.int32), weights, aux, metrics)

  def update_state(self, metrics):
    self.bias[...] = bias_step(self.bias[...], metrics["load"], self.update_rate)
