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

Dropless path (`capacity_factor=None`): the sorted tokens go through
`jax.lax.ragged_dot` with the per-expert counts as group sizes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """C = min(ceil(capacity_factor * T * K / E), T): slots per expert per group."""
  return max(1, min(math.ceil(capacity_factor * num_tokens * top_k / num_experts), num_tokens))


class Plan(NamedTuple):
  """Where each assignment goes. Shapes for T tokens, K choices, E experts, C slots."""
  order: jax.Array        # [K*T] assignment indices (choice-major) sorted by expert
  counts: jax.Array       # [E] assignments per expert (before capacity)
  slot_token: jax.Array   # [E, C] token in each buffer slot (T = empty slot)
  token_slot: jax.Array   # [T, K] flat buffer slot of each assignment (E*C = dropped)
  dropped: jax.Array      # scalar: fraction of assignments over capacity


def plan(expert_ids: jax.Array, num_experts: int, cap: int) -> Plan:
  """Sorts assignments `expert_ids [T, K]` by expert and gives each a slot."""
  t, k = expert_ids.shape
  flat = expert_ids.T.reshape(-1)                                   # [K*T], choice-major
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts)
  starts = jnp.cumsum(counts) - counts                              # [E]
  rank = jnp.arange(t * k) - starts[flat[order]]                    # position within expert
  pos = jnp.zeros((t * k,), jnp.int32).at[order].set(rank.astype(jnp.int32))
  kept = pos < cap
  token_slot = jnp.where(kept, flat * cap + pos, num_experts * cap)
  slot = starts[:, None] + jnp.arange(cap)[None, :]                 # [E, C]
  filled = jnp.arange(cap)[None, :] < counts[:, None]
  slot_token = jnp.where(filled, order[jnp.minimum(slot, t * k - 1)] % t, t)
  return Plan(order, counts, slot_token, token_slot.reshape(k, t).T,
              jnp.mean((~kept).astype(jnp.float32)))


def gather_in(x: jax.Array, p: Plan) -> jax.Array:
  """x [T, d] -> buffer [E, C, d] (empty slots are zero)."""
  x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])
  return x_pad[p.slot_token]


def gather_out(y: jax.Array, p: Plan, weights: jax.Array) -> jax.Array:
  """buffer y [E, C, d] -> combined [T, d] = sum_k weights[t, k] * y[slot(t, k)]."""
  d = y.shape[-1]
  y_pad = jnp.concatenate([y.reshape(-1, d), jnp.zeros((1, d), y.dtype)])
  picked = y_pad[p.token_slot]                                      # [T, K, d]
  return jnp.einsum("tkd,tk->td", picked, weights.astype(y.dtype))


def ragged(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, num_experts: int,
           ffw) -> tuple[jax.Array, jax.Array]:
  """Dropless: sort assignments by expert and run `ffw(x_sorted [K*T, d], group_sizes [E])`.

  Returns the combined output [T, d] and a zero dropped fraction.
  """
  t, k = expert_ids.shape
  flat = expert_ids.T.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts)
  y_sorted = ffw(x[order % t], counts)                              # [K*T, d]
  y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(k, t, -1)
  return jnp.einsum("ktd,tk->td", y, weights.astype(y.dtype)), jnp.zeros((), jnp.float32)
