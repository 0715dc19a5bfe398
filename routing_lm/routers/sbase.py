"""S-BASE: Sinkhorn-balanced assignment (paper_spec.md section 4.1).

Training: run Sinkhorn in log space on the (stop-gradient) router scores, a fixed number
of iterations inside `lax.fori_loop`, so that each token has mass 1/T and each expert
1/E; each token takes the top-k experts of the balanced matrix. `temperature` divides the
scores first: entropic optimal transport approaches the exact balanced assignment
(BASE layers' linear assignment) as it goes to 0, at the cost of more iterations.
For k = 1, `balance_rounds` rounds of capacity-constrained greedy matching then round
the balanced matrix to an assignment with floor(T/E) or ceil(T/E) tokens per expert: each
unplaced token proposes to its best expert with room, each expert accepts its best
proposals (each round fills an expert or places every token, so E rounds always finish;
a few suffice after Sinkhorn). Every expert first gets floor(T/E) slots, then the
T mod E leftover tokens one extra slot each on distinct experts. Tokens still unplaced
keep their Sinkhorn argmax. The same number of pairwise-swap rounds then improves the
total score without changing any load: each pair of experts that are each other's best
partner exchanges the one token each whose exchange gains most (2-opt; the greedy alone
is 1-2% below the optimal linear assignment on random scores, with swaps within 0.2%).
Evaluation: top-k of the raw scores. Gate: sigmoid(score) of the chosen expert for k = 1
(BASE layers), softmax over experts for k > 1 (as Megatron-Core's Sinkhorn router).
No auxiliary loss: balance comes from the assignment. The remaining row-marginal error
after the last iteration is reported as the metric `sinkhorn_error`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from routing_lm.routers import base


def sinkhorn(log_k: jax.Array, num_iters: int) -> tuple[jax.Array, jax.Array]:
  """Balances exp(log_k) [T, E] to row sums 1/T and column sums 1/E, in log space.

  Returns the balanced log-matrix [T, E] and the max relative row-marginal error.
  """
  t, e = log_k.shape
  log_r, log_c = -jnp.log(t), -jnp.log(e)

  def step(_, uv):
    u, v = uv
    u = log_r - jax.nn.logsumexp(log_k + v[None, :], axis=1)
    v = log_c - jax.nn.logsumexp(log_k + u[:, None], axis=0)
    return u, v

  u, v = jax.lax.fori_loop(0, num_iters, step,
                           (jnp.zeros((t,), log_k.dtype), jnp.zeros((e,), log_k.dtype)))
  log_p = log_k + u[:, None] + v[None, :]
  row_error = jnp.max(jnp.abs(jnp.exp(jax.nn.logsumexp(log_p, axis=1) - log_r) - 1.0))
  return log_p, row_error


def _greedy_rounds(scores: jax.Array, assigned: jax.Array, room: jax.Array,
                   num_rounds: int) -> tuple[jax.Array, jax.Array]:
  """`num_rounds` rounds of proposals: unplaced tokens to their best expert with room."""
  t, e = scores.shape

  def round_(_, state):
    assigned, room = state
    open_ = (assigned < 0)[:, None] & (room > 0)[None, :]
    masked = jnp.where(open_, scores, -jnp.inf)
    choice = jnp.argmax(masked, axis=1)
    proposing = jnp.any(open_, axis=1)
    choice = jnp.where(proposing, choice, e)                       # e = no proposal
    score = jnp.take_along_axis(masked, jnp.minimum(choice, e - 1)[:, None], 1)[:, 0]
    order = jnp.lexsort((-score, choice))                          # by expert, best first
    counts = jnp.bincount(choice, length=e + 1)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.zeros((t,), jnp.int32).at[order].set(
        jnp.arange(t, dtype=jnp.int32) - starts[choice[order]].astype(jnp.int32))
    room_ext = jnp.concatenate([room, jnp.zeros((1,), room.dtype)])
    accept = proposing & (rank < room_ext[choice])
    assigned = jnp.where(accept, choice, assigned)
    room = room - jnp.bincount(jnp.where(accept, choice, e), length=e + 1)[:e]
    return assigned, room

  return jax.lax.fori_loop(0, num_rounds, round_, (assigned, room))


def _swap_rounds(scores: jax.Array, ids: jax.Array, num_rounds: int) -> jax.Array:
  """Pairwise exchanges that raise sum_t scores[t, ids[t]] and keep every load.

  gain[t, b] = scores[t, b] - scores[t, ids[t]]; best[a, b] = max gain of a token of
  expert a moving to b. Exchanging those tokens of a and b gains best[a, b] + best[b, a];
  every pair of experts that are each other's best partner (positive gain) exchanges.
  Cost per round O(T*E + E^2).
  """
  t, e = scores.shape
  tokens = jnp.arange(t)

  def round_(_, ids):
    gain = scores - jnp.take_along_axis(scores, ids[:, None], 1)   # [T, E]
    best = jax.ops.segment_max(gain, ids, num_segments=e)          # [E, E], -inf if empty
    who = jax.ops.segment_min(jnp.where(gain >= best[ids], tokens[:, None], t), ids,
                              num_segments=e)                      # [E, E] its token
    pair = jnp.where(jnp.eye(e, dtype=bool), -jnp.inf, best + best.T)
    partner = jnp.argmax(pair, axis=1)
    swap = (partner[partner] == jnp.arange(e)) & (jnp.max(pair, axis=1) > 0)
    mover = jnp.where(swap, who[jnp.arange(e), partner], t)        # t = no move
    return ids.at[mover].set(partner.astype(ids.dtype), mode="drop")

  return jax.lax.fori_loop(0, num_rounds, round_, ids)


def balanced_assignment(scores: jax.Array, num_rounds: int) -> jax.Array:
  """Rounds scores [T, E] to expert ids [T] with floor(T/E) or ceil(T/E) tokens each.

  `num_rounds` greedy rounds at floor(T/E) slots per expert (and as many for the
  T mod E leftover tokens, one extra slot per expert), then `num_rounds` swap rounds.
  A token still unplaced after the greedy rounds falls back to its argmax.
  """
  t, e = scores.shape
  assigned = jnp.full((t,), -1, jnp.int32)
  assigned, room = _greedy_rounds(scores, assigned, jnp.full((e,), t // e), num_rounds)
  if t % e:
    assigned, _ = _greedy_rounds(scores, assigned, room + 1, num_rounds)
  ids = jnp.where(assigned >= 0, assigned, jnp.argmax(scores, axis=1)).astype(jnp.int32)
  return _swap_rounds(scores, ids, num_rounds)


class SBaseRouter(base.Router):
  """S-BASE: Sinkhorn-balanced top-k in training, plain top-k at evaluation."""

  def __init__(self, d_model: int, num_experts: int, top_k: int, vocab_size: int,
               cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(d_model, num_experts, top_k, vocab_size, cfg, rngs=rngs)
    self.w = base.router_weight(d_model, num_experts, rngs)
    self.num_iters = int(cfg.sinkhorn_iters)
    self.temperature = float(cfg.temperature)
    self.balance_rounds = int(cfg.balance_rounds)

  def __call__(self, x, token_ids, *, train, rng):
    logits = base.router_logits(x, self.w)                          # [T, E]
    metrics = {}
    if train:
      balanced, error = sinkhorn(jax.lax.stop_gradient(logits) / self.temperature,
                                 self.num_iters)
      if self.top_k == 1 and self.balance_rounds > 0:
        ids = balanced_assignment(balanced, self.balance_rounds)[:, None]
      else:
        _, ids = jax.lax.top_k(balanced, self.top_k)
      metrics["sinkhorn_error"] = error
    else:
      _, ids = jax.lax.top_k(logits, self.top_k)
    if self.top_k == 1:
      probs = None
      weights = jax.nn.sigmoid(base.take(logits, ids))
    else:
      probs = jax.nn.softmax(logits, axis=-1)
      weights = base.take(probs, ids)
    metrics.update(base.routing_metrics(ids, self.num_experts,
                                        probs if probs is not None else jax.nn.softmax(logits)))
    return base.Routing(ids.astype(jnp.int32), weights, {}, metrics)
