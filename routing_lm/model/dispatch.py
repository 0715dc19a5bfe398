"""Moving tokens to experts and back, shared by every router.

Capacity path (default): sort the (token, choice) assignments by expert, gather the
tokens into a fixed `[E, C, d]` buffer, run the experts as one batched matmul, gather the
results back and combine with the router's weights. Cost is O(T*K*d + E*C*d) =
O(capacity_factor * T * K * d) plus an O(T*K log(T*K)) sort: it does not grow with E at a
fixed token count, and there is no `[T, E, C]` one-hot tensor.

Priority: assignments are ordered choice-major (every token's first choice before any
second choice), then by token position, so an expert over capacity keeps the earliest
tokens of its best-ranked choices and drops the rest. A dropped assignment contributes
nothing: the token keeps its residual only (and its other choices, if any).

No assignment: an expert id equal to `num_experts` (for routers that give
tokens a variable number of experts: expert choice) is sorted after every real one, takes
no slot and is not counted as dropped; its combine weight must be 0. Capacity path only.

Both gathers have hand-written transposes (custom VJPs): kept assignments and filled
slots are in one-to-one correspondence, so the backward of each gather is a gather
through the inverse map instead of a scatter-add (XLA:CPU scatters are slow). The
combines stay einsums: written as multiply-and-sum they are up to 10x slower under the
routed FFW's vmap over groups.

Dropless path (`capacity_factor=None`, `dropless`): the assignments sorted by expert go
through one grouped matmul per projection with the per-expert counts as group sizes
(`routing_lm/model/grouped.py`: ragged_dot or megablox gmm, and the all-gather exchange
over the `expert` axis). On the CPU backend ragged_dot costs about E/2 times the capacity
path (measured: 13x at E = 64).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from routing_lm import expert_dims


capacity = expert_dims.capacity   # C = min(ceil(capacity_factor T K / E), T), per group


class Plan(NamedTuple):
  """Where each assignment goes. Shapes for T tokens, K choices, E experts, C slots."""
  order: jax.Array        # [K*T] assignment indices (choice-major) sorted by expert
  counts: jax.Array       # [E] assignments per expert (before capacity)
  slot_token: jax.Array   # [E, C] token in each buffer slot (T = empty slot)
  token_slot: jax.Array   # [T, K] flat buffer slot of each assignment (E*C = dropped)
  dropped: jax.Array      # scalar: fraction of assignments over capacity
  slot_assign: jax.Array  # [E, C] assignment k*T + t in each slot (K*T = empty slot)


def plan(expert_ids: jax.Array, num_experts: int, cap: int) -> Plan:
  """Sorts assignments `expert_ids [T, K]` (values in [0, E], E = no assignment) by expert
  and gives each a slot."""
  t, k = expert_ids.shape
  flat = expert_ids.T.reshape(-1)                                   # [K*T], choice-major
  order = jnp.argsort(flat, stable=True)
  counts_all = jnp.bincount(flat, length=num_experts + 1)           # [E + 1]: E = none
  counts = counts_all[:num_experts]
  starts = jnp.cumsum(counts_all) - counts_all                      # [E + 1]
  rank = jnp.arange(t * k) - starts[flat[order]]                    # position within expert
  pos = jnp.zeros((t * k,), jnp.int32).at[order].set(rank.astype(jnp.int32))
  real = flat < num_experts
  kept = (pos < cap) & real
  token_slot = jnp.where(kept, flat * cap + pos, num_experts * cap)
  slot = starts[:num_experts, None] + jnp.arange(cap)[None, :]     # [E, C]
  filled = jnp.arange(cap)[None, :] < counts[:, None]
  slot_assign = jnp.where(filled, order[jnp.minimum(slot, t * k - 1)], t * k)
  slot_token = jnp.where(filled, slot_assign % t, t)
  dropped = jnp.sum(real & ~kept) / jnp.maximum(jnp.sum(real), 1)
  return Plan(order, counts, slot_token, token_slot.reshape(k, t).T,
              dropped.astype(jnp.float32), slot_assign)


# The kept assignments and the filled slots are in one-to-one correspondence, so the
# transpose of each gather below is another gather (through the inverse map), not a
# scatter-add: XLA:CPU scatters are several times slower than gathers.

def _pad(rows: jax.Array) -> jax.Array:
  """[N, d] -> [N + 1, d] with a zero last row (the target of empty/dropped indices)."""
  return jnp.concatenate([rows, jnp.zeros((1,) + rows.shape[1:], rows.dtype)])


@jax.custom_vjp
def _gather_in(x: jax.Array, slot_token: jax.Array, token_slot: jax.Array) -> jax.Array:
  return _pad(x)[slot_token]


def _gather_in_fwd(x, slot_token, token_slot):
  return _gather_in(x, slot_token, token_slot), (slot_token, token_slot)


def _gather_in_bwd(res, g):
  slot_token, token_slot = res
  dx = jnp.sum(_pad(g.reshape(-1, g.shape[-1]))[token_slot], axis=1)      # [T, d]
  return dx, None, None


_gather_in.defvjp(_gather_in_fwd, _gather_in_bwd)


def gather_in(x: jax.Array, p: Plan) -> jax.Array:
  """x [T, d] -> buffer [E, C, d] (empty slots are zero)."""
  return _gather_in(x, p.slot_token, p.token_slot)


@jax.custom_vjp
def _gather_out(y: jax.Array, w: jax.Array, token_slot: jax.Array,
                slot_assign: jax.Array) -> jax.Array:
  picked = _pad(y.reshape(-1, y.shape[-1]))[token_slot]                   # [T, K, d]
  return jnp.einsum("tkd,tk->td", picked, w)


def _gather_out_fwd(y, w, token_slot, slot_assign):
  return _gather_out(y, w, token_slot, slot_assign), (y, w, token_slot, slot_assign)


def _gather_out_bwd(res, g):
  y, w, token_slot, slot_assign = res
  t, k = w.shape
  filled = slot_assign < t * k
  w_slot = jnp.where(filled, w.T.reshape(-1)[jnp.minimum(slot_assign, t * k - 1)], 0)
  g_slot = g[jnp.where(filled, slot_assign % t, 0)]                         # [E, C, d]
  dy = (w_slot[..., None] * g_slot).astype(y.dtype).reshape(y.shape)
  picked = _pad(y.reshape(-1, y.shape[-1]))[token_slot]
  dw = jnp.einsum("tkd,td->tk", picked, g).astype(w.dtype)
  return dy, dw, None, None


_gather_out.defvjp(_gather_out_fwd, _gather_out_bwd)


def gather_out(y: jax.Array, p: Plan, weights: jax.Array) -> jax.Array:
  """buffer y [E, C, d] -> combined [T, d] = sum_k weights[t, k] * y[slot(t, k)]."""
  return _gather_out(y, weights.astype(y.dtype), p.token_slot, p.slot_assign)


def dropless(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, ffw,
             num_experts: int, first_expert: jax.Array | int = 0) -> jax.Array:
  """Dropless: sort the assignments to experts [first_expert, first_expert + num_experts)
  by expert and run `ffw(x_sorted [K*T, d], group_sizes [num_experts])` on them.

  x [T, d], expert_ids [T, K] (any ids: those of other experts, or the no-assignment id,
  are sorted last, left out of the group sizes and contribute 0), weights [T, K].
  `ffw` must give 0 for rows past sum(group_sizes). Returns the combined [T, d].
  """
  t, k = expert_ids.shape
  local = expert_ids - first_expert
  here = (local >= 0) & (local < num_experts)
  flat = jnp.where(here, local, num_experts).T.reshape(-1)          # [K*T], choice-major
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # the last id left out
  y_sorted = ffw(x[order % t], sizes)                               # [K*T, d]
  y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(k, t, -1)
  return jnp.einsum("ktd,tk->td", y, jnp.where(here, weights, 0).astype(y.dtype))
