"""S-BASE: Sinkhorn-balanced assignment (paper_spec.md section 4.1).

Training: run Sinkhorn on the (stop-gradient) router scores, a fixed number of iterations
inside `lax.fori_loop` (scaling form with log-space potentials, `sinkhorn`), so that each
token has mass 1/T and each expert 1/E; each token takes the top-k experts of the
balanced matrix. `temperature` divides the scores first: entropic optimal transport
approaches the exact balanced assignment (BASE layers' linear assignment) as it goes to
0, at the cost of more iterations.
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
No balance loss: balance comes from the assignment (an optional router z-loss,
`z_loss_coef`, default 0). The remaining row-marginal error after the last iteration is
reported as the metric `sinkhorn_error`, and the share of tokens whose balanced expert is
the one evaluation picks (the top-k of the raw scores) as `agreement` (training and
evaluation route alike only as far as it is near 1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from routing_lm.errors import require
from routing_lm.routers import base

ABSORB_EVERY = 5   # Sinkhorn iterations between re-formings of the kernel (`sinkhorn`)


def _shifted(log_m: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log_m [T, E] minus its row maxima, then minus the column maxima b [E] of what is
  left (returned too): <= 0, with a 0 in every row and every column."""
  z = log_m - jnp.max(log_m, axis=1, keepdims=True)
  b = jnp.max(z, axis=0)
  return z - b[None, :], b


def sinkhorn(log_k: jax.Array, num_iters: int) -> tuple[jax.Array, jax.Array]:
  """Balances exp(log_k) [T, E] to row sums 1/T and column sums 1/E (Sinkhorn-Knopp).

  Scaling form with log-space potentials f [T], g [E] and the balanced matrix
  log K + f + g: each iteration is two matrix-vector products with K = exp(log K),
  f = log(1/T) - log(K exp(g)) and g = log(1/E) - log(K^T exp(f)), exponentiating only
  the vectors (shifted by their max), where logsumexp iterations exponentiate [T, E]
  twice: 3x faster on CPU at [131072, 512]. log K starts as log_k shifted so that every
  row and every column holds a 0 (`_shifted`); every `ABSORB_EVERY` iterations the
  potentials are absorbed into it and K is formed again (one exp over [T, E]), so that
  the terms that carry each row and column never underflow, even for logits thousands
  of temperatures apart (log-stabilised scaling, Schmitzer 2019; tested against
  logsumexp iterations, whose iterates these are: paper_spec.md section 4.1).

  Returns the balanced log-matrix [T, E] and the max relative row-marginal error after
  the last (column) update.
  """
  t, e = log_k.shape
  log_r, log_c = -jnp.log(t), -jnp.log(e)
  tiny = jnp.finfo(log_k.dtype).tiny
  matvec = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)

  def log_row_sums(kernel, g):                                  # log sum_e K_te exp(g_e), [T]
    m = jnp.max(g)
    return jnp.log(jnp.maximum(matvec("te,e->t", kernel, jnp.exp(g - m)), tiny)) + m

  def log_col_sums(kernel, f):                                  # log sum_t K_te exp(f_t), [E]
    m = jnp.max(f)
    return jnp.log(jnp.maximum(matvec("te,t->e", kernel, jnp.exp(f - m)), tiny)) + m

  def iterate(kernel, f, g, n):
    def step(_, fg):
      f = log_r - log_row_sums(kernel, fg[1])
      return f, log_c - log_col_sums(kernel, f)
    return jax.lax.fori_loop(0, n, step, (f, g))

  log_kernel, g = _shifted(log_k)     # g = b: the same matrix as log_k up to row scaling
  f = absorbed_f = jnp.zeros((t,), log_k.dtype)
  absorbed_g = jnp.zeros((e,), log_k.dtype)
  kernel = jnp.exp(log_kernel)
  for start in range(0, num_iters, ABSORB_EVERY):
    if start:   # rows and columns are near their marginals now: one scalar shift suffices
      absorbed_f, absorbed_g, g = absorbed_f + f, absorbed_g + g, jnp.zeros_like(g)
      absorbed_f -= jnp.max(log_kernel + absorbed_f[:, None] + absorbed_g[None, :])
      kernel = jnp.exp(log_kernel + absorbed_f[:, None] + absorbed_g[None, :])
    f, g = iterate(kernel, f, g, min(ABSORB_EVERY, num_iters - start))
  row_error = jnp.max(jnp.abs(jnp.exp(f + log_row_sums(kernel, g) - log_r) - 1.0))
  return log_kernel + (absorbed_f + f)[:, None] + (absorbed_g + g)[None, :], row_error


def _max_and_first(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """Maxima of x along `axis` and the first index attaining each (int32).

  Two plain reductions: 2.5x faster on XLA:CPU than `jnp.argmax`'s variadic one.
  """
  best = jnp.max(x, axis=axis)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
  first = jnp.min(jnp.where(x == jnp.expand_dims(best, axis), index, x.shape[axis]), axis=axis)
  return best, first


def _greedy_round(scores: jax.Array, assigned: jax.Array,
                  room: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Unplaced tokens (assigned < 0) propose to their best expert with room; each expert
  accepts its best `room` proposals. scores [N, E], assigned [N], room [E]."""
  n, e = scores.shape
  best, choice = _max_and_first(jnp.where(room[None, :] > 0, scores, -jnp.inf), axis=1)
  proposing = (assigned < 0) & (best > -jnp.inf)
  choice = jnp.where(proposing, choice, e)                         # e = no proposal
  order = jnp.lexsort((-best, choice))                             # by expert, best first
  counts = jnp.bincount(choice, length=e + 1)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.zeros((n,), jnp.int32).at[order].set(
      jnp.arange(n, dtype=jnp.int32) - starts[choice[order]].astype(jnp.int32))
  room_ext = jnp.concatenate([room, jnp.zeros((1,), room.dtype)])
  accept = proposing & (rank < room_ext[choice])
  room = room - jnp.bincount(jnp.where(accept, choice, e), length=e + 1)[:e]
  return jnp.where(accept, choice, assigned), room


def _greedy_rounds(scores: jax.Array, assigned: jax.Array, room: jax.Array,
                   num_rounds: int) -> tuple[jax.Array, jax.Array]:
  """`num_rounds` greedy rounds over scores [T, E] (`_greedy_round`).

  After Sinkhorn the first round places most tokens (98% on random logits), so once at
  most T/8 are unplaced the remaining rounds run on those alone (gathered in token
  order: the same proposals and acceptances as on all T, at an eighth of the cost).
  """
  t, e = scores.shape
  m = -(-t // 8)

  def full_round(state):
    assigned, room, done = state
    return (*_greedy_round(scores, assigned, room), done + 1)

  assigned, room, done = jax.lax.while_loop(
      lambda s: (s[2] < num_rounds) & (jnp.sum(s[0] < 0) > m), full_round,
      (assigned, room, jnp.zeros((), jnp.int32)))
  idx = jnp.nonzero(assigned < 0, size=m, fill_value=t)[0]        # [m], t = padding
  sub_scores = scores[jnp.minimum(idx, t - 1)]
  sub, room = jax.lax.fori_loop(
      done, num_rounds, lambda _, s: _greedy_round(sub_scores, *s),
      (jnp.where(idx < t, -1, 0).astype(assigned.dtype), room))    # padding never proposes
  return assigned.at[idx].set(sub, mode="drop"), room


def _swap_rounds(scores: jax.Array, ids: jax.Array, num_rounds: int) -> jax.Array:
  """Pairwise exchanges that raise sum_t scores[t, ids[t]] and keep every load.

  gain = scores[t, b] - scores[t, ids[t]]; best[a, b] = max gain of a token of expert a
  moving to b. Exchanging those tokens of a and b gains best[a, b] + best[b, a]; every
  pair of experts that are each other's best partner (positive gain) exchanges, which
  moves two slots' contents. The tokens sit in slots [E, ceil(T/E)] by expert, with
  their score rows gathered once into [E, ceil(T/E), E]: a round is one max over slots
  and small gathers (a scatter-max over T per round was 5x slower on CPU). Tokens
  beyond an expert's ceil(T/E) slots (only after an argmax fallback) stay put. Per
  round O(T*E + E^2).
  """
  t, e = scores.shape
  cs = -(-t // e)
  experts = jnp.arange(e)
  order = jnp.argsort(ids, stable=True)
  counts = jnp.bincount(ids, length=e)
  slot = (jnp.cumsum(counts) - counts)[:, None] + jnp.arange(cs)[None, :]
  valid = jnp.arange(cs)[None, :] < counts[:, None]                       # [E, cs]
  slot_token = jnp.where(valid, order[jnp.minimum(slot, t - 1)], t)
  rows = scores[jnp.minimum(slot_token, t - 1)]                             # [E, cs, E]
  own = jnp.take_along_axis(rows, experts[:, None, None], axis=2)[..., 0]  # [E, cs]

  def round_(_, state):
    slot_token, rows, own = state
    gain = lambda a, b: jnp.where(valid[a], rows[a, :, b] - own[a], -jnp.inf)  # [.., cs]
    best = jnp.max(jnp.where(valid[..., None], rows - own[..., None], -jnp.inf), axis=1)
    pair = jnp.where(jnp.eye(e, dtype=bool), -jnp.inf, best + best.T)        # [E, E]
    partner = jnp.argmax(pair, axis=1)
    swap = (partner[partner] == experts) & (jnp.max(pair, axis=1) > 0)
    mine = jnp.argmax(gain(experts, partner), axis=1)        # the slot of a's mover
    theirs = jnp.argmax(gain(partner, experts), axis=1)      # the slot of its partner's
    target = (jnp.where(swap, experts, e), mine)                            # e = no move
    incoming = rows[partner, theirs]                                        # [E, E]
    return (slot_token.at[target].set(slot_token[partner, theirs], mode="drop"),
            rows.at[target].set(incoming, mode="drop"),
            own.at[target].set(incoming[experts, experts], mode="drop"))

  slot_token, _, _ = jax.lax.fori_loop(0, num_rounds, round_, (slot_token, rows, own))
  return ids.at[slot_token.reshape(-1)].set(jnp.repeat(experts, cs).astype(ids.dtype),
                                            mode="drop")


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
  ids = jnp.where(assigned >= 0, assigned, _max_and_first(scores, axis=1)[1]).astype(jnp.int32)
  return _swap_rounds(scores, ids, num_rounds)


class SBaseRouter(base.Router):
  """S-BASE: Sinkhorn-balanced top-k in training, plain top-k at evaluation.

  Config (`model.routing.sbase`): sinkhorn_iters, temperature, balance_rounds (greedy and
  swap rounds after Sinkhorn for k = 1; 0 = plain top-k of the balanced matrix, as
  Megatron), scope ('group': Sinkhorn over each routing group; 'global': over every token
  of the batch at once), z_loss_coef (router z-loss, `base.z_loss_terms`; 0 = off).
  """

  name = "sbase"
  defaults = {"sinkhorn_iters": 30, "temperature": 0.1, "balance_rounds": 8, "scope": "group",
              "z_loss_coef": 0.0}

  @classmethod
  def check_config(cls, spec: base.RouterSpec) -> None:
    super().check_config(spec)
    c = spec.cfg
    require(isinstance(c.sinkhorn_iters, int) and c.sinkhorn_iters >= 1,
            "model.routing.sbase.sinkhorn_iters", c.sinkhorn_iters, "an integer >= 1")
    require(c.temperature > 0, "model.routing.sbase.temperature", c.temperature,
            "a number > 0 (lower = closer to the exact balanced assignment)")
    require(isinstance(c.balance_rounds, int) and c.balance_rounds >= 0,
            "model.routing.sbase.balance_rounds", c.balance_rounds, "an integer >= 0")
    require(c.scope in ("group", "global"), "model.routing.sbase.scope", c.scope,
            "'group' (Sinkhorn over each token group) or 'global' (over all tokens)")

  def __init__(self, spec: base.RouterSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    cfg = spec.cfg
    self.w = base.router_weight(spec, rngs)
    self.num_iters = int(cfg.sinkhorn_iters)
    self.temperature = float(cfg.temperature)
    self.balance_rounds = int(cfg.balance_rounds)
    self.global_scope = cfg.scope == "global"
    self.z_loss_coef = float(cfg.z_loss_coef)

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
      metrics["agreement"] = base.agreement(ids, logits)
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
    aux, z_metrics = base.z_loss_terms(logits, self.z_loss_coef)
    return base.Routing(ids.astype(jnp.int32), weights, aux, {**metrics, **z_metrics})
