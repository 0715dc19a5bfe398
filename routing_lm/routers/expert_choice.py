"""Expert Choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
Routing"; the router of Krajewski et al.'s law, finegrained_spec.md section 4).

Training: scores S = softmax over experts of the router logits, [T, E]. Each expert takes
its top C tokens of the routing group by its column of S,

    C = expert_dims.capacity(T, E, K, capacity_factor) = min(ceil(capacity_factor T K / E), T),

the same C the dispatch gives each expert, and a chosen token's gate is its score S[t, e].
Every expert is exactly full (C tokens), so the layer is balanced by construction and has
no auxiliary loss; a token gets 0..E experts (cf * K on average). Ties go to the earlier
token (`jax.lax.top_k` keeps the lower index among equal values).

Through the shared contract: ids and weights are `[T, k_max]`; token t's chosen experts
fill its first slots, best score first, and every unused slot holds the id E with weight
0, which the dispatch reads as "no assignment" (model/dispatch.py): it takes no slot and
is not counted as dropped. So each expert's buffer holds exactly its chosen tokens and
nothing else, whatever the dispatch's choice-major priority: an expert receives C real
assignments and has C slots, so none is ever over capacity. (Giving unused slots a real
expert id instead would not be exact: choice-major order can put token u's unused slot 0
before token t's chosen slot 1 at the same expert and evict the chosen one.)

k_max = min(E, max_experts_per_token or E). One token can be in the top C of every
expert, so only k_max = E represents every choice (the default, exact Zhou et al.). The
combine gathers `[T, k_max, d]`, E / (cf K) times the capacity buffer, so at large E a cap
(e.g. 2 cf K) saves memory: a token chosen by more than k_max experts keeps its k_max best
scores and the other experts leave that slot empty (no expert ever exceeds C).

Evaluation (`train=False`), and why: expert choice compares a token with every token of
its group, later ones included, so the training rule is neither causal nor independent of
the other sequences of the batch. At evaluation each token instead takes its top K*G
experts by the same scores S, gate = score (token choice). It depends on the token alone
(causal, batch-independent), needs no state (a per-expert score threshold estimated in
training would be the other option, at the cost of state updated in the train step), and
keeps the gates' scale: each gate is the score the expert saw in training. A token then
uses K*G experts instead of cf*K*G on average; the evaluated loss is that of this rule.

`model.routing.expert_choice`: max_experts_per_token (0 = E, exact).
Needs `model.routing.capacity_factor` (no dropless training); any G (C is unchanged by G).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from routing_lm import expert_dims
from routing_lm.errors import require
from routing_lm.routers import base


def choose(scores: jax.Array, cap: int, k_max: int) -> tuple[jax.Array, jax.Array]:
  """Expert choice on scores [T, E]: each expert takes its top `cap` tokens.

  Returns ids [T, k_max] (E = unused slot) and gates [T, k_max] (0 in unused slots); a
  token's chosen experts come first, best score first, at most k_max of them.
  """
  t, e = scores.shape
  _, top_tokens = jax.lax.top_k(scores.T, cap)                          # [E, C]
  chosen = jnp.zeros((e, t), bool).at[jnp.arange(e)[:, None], top_tokens].set(True).T
  masked = jnp.where(chosen, scores, -1.0)                               # scores are >= 0
  gates, ids = jax.lax.top_k(masked, k_max)                             # [T, k_max]
  used = jnp.take_along_axis(chosen, ids, axis=-1)
  return (jnp.where(used, ids, e).astype(jnp.int32),
          jnp.where(used, gates, 0.0).astype(jnp.float32))


class ExpertChoiceRouter(base.Router):
  """Expert choice in training (each expert its top C tokens), token choice top-K at
  evaluation (`model.routing.expert_choice`: max_experts_per_token, 0 = E)."""

  name = "expert_choice"
  defaults = {"max_experts_per_token": 0}

  @classmethod
  def check_config(cls, spec: base.RouterSpec) -> None:
    super().check_config(spec)
    cf = spec.capacity_factor
    require(cf is not None, "model.routing.capacity_factor", cf,
            "expert choice needs a capacity (each expert takes C = capacity_factor x T x K "
            "/ E tokens): dropless routing is not supported with router 'expert_choice'; "
            "set a number, e.g. 2.0 (Zhou et al.'s EC-CF2)")
    m = spec.cfg.max_experts_per_token
    require(isinstance(m, int) and not isinstance(m, bool) and m >= 0,
            "model.routing.expert_choice.max_experts_per_token", m,
            f"an integer >= 0 (0 = num_experts x granularity = {spec.num_experts}, exact)")

  def __init__(self, spec: base.RouterSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.w = base.router_weight(spec, rngs)
    self.capacity_factor = spec.capacity_factor
    self.k_max = min(spec.num_experts, int(spec.cfg.max_experts_per_token) or spec.num_experts)

  def __call__(self, x, token_ids, *, train, rng):
    scores = jax.nn.softmax(base.router_logits(x, self.w), axis=-1)     # [T, E]
    if train:
      cap = expert_dims.capacity(x.shape[0], self.num_experts, self.top_k, self.capacity_factor)
      ids, weights = choose(scores, cap, self.k_max)
    else:
      weights, ids = jax.lax.top_k(scores, self.top_k)
      ids = ids.astype(jnp.int32)
    metrics = base.routing_metrics(ids, self.num_experts, scores)
    per_token = jnp.sum(ids < self.num_experts, axis=-1)
    metrics["experts_per_token"] = jnp.mean(per_token).astype(jnp.float32)
    metrics["unrouted"] = jnp.mean(per_token == 0).astype(jnp.float32)
    return base.Routing(ids, weights, {}, metrics)
