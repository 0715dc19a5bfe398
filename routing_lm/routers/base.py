"""The router contract shared by every router, and the metrics every router reports.

A router maps token representations to expert choices. It never dispatches tokens: the
dispatch (`model/dispatch.py`) is shared and does not know which router chose.

    routing = router(x, token_ids, train=True, rng=key)
    x:         [tokens, d_model]   token representations (any dtype; router math is float32)
    token_ids: [tokens]            int32, for routers that hash the input token
    routing.expert_ids  [tokens, k] int32, distinct per token
    routing.weights     [tokens, k] float32 combine weights
    routing.aux_losses  {name: scalar}, already multiplied by their config coefficients
    routing.metrics     {name: array}
    routing.log_probs   [tokens, k] or None: log pi(chosen expert) for policy-gradient routers

Adding a router: one file with a `Router` subclass, and one line in `routers/__init__.py`.
"""
from __future__ import annotations

from typing import ClassVar

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx


@flax.struct.dataclass
class Routing:
  expert_ids: jax.Array
  weights: jax.Array
  aux_losses: dict[str, jax.Array]
  metrics: dict[str, jax.Array]
  log_probs: jax.Array | None = None


class Router(nnx.Module):
  """Base class. Subclasses implement `__call__` and may lower `max_top_k`."""

  max_top_k: ClassVar[int] = 1 << 30

  def __init__(self, d_model: int, num_experts: int, top_k: int, vocab_size: int,
               cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.num_experts = num_experts
    self.top_k = top_k

  def __call__(self, x: jax.Array, token_ids: jax.Array, *, train: bool,
               rng: jax.Array | None) -> Routing:
    raise NotImplementedError


def router_weight(d_model: int, num_experts: int, rngs: nnx.Rngs) -> nnx.Param:
  """A `[d_model, num_experts]` float32 router projection, small init (Switch: 0.1 scale)."""
  init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
  return nnx.Param(init(rngs.params(), (d_model, num_experts), jnp.float32),
                   out_sharding=("embed", None))


def router_logits(x: jax.Array, w: nnx.Param) -> jax.Array:
  """[tokens, d_model] x [d_model, E] -> [tokens, E] logits in float32."""
  return jnp.dot(x.astype(jnp.float32), w[...])


def take(values: jax.Array, ids: jax.Array) -> jax.Array:
  """values [T, E], ids [T, k] -> values at the chosen experts, [T, k]."""
  return jnp.take_along_axis(values, ids, axis=-1)


def routing_metrics(expert_ids: jax.Array, num_experts: int,
                    probs: jax.Array | None) -> dict[str, jax.Array]:
  """Metrics every router reports.

  load:        [E] fraction of the (token, choice) assignments each expert received
  max_load:    max(load) * E (1.0 = perfectly balanced)
  dead_experts fraction of experts that received nothing
  entropy:     mean per-token entropy of the router's distribution (nats; 0 if fixed)
  """
  counts = jnp.bincount(expert_ids.reshape(-1), length=num_experts)
  load = counts / jnp.maximum(expert_ids.size, 1)
  if probs is None:
    entropy = jnp.zeros((), jnp.float32)
  else:
    entropy = -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=-1).mean()
  return {"load": load.astype(jnp.float32),
          "max_load": (jnp.max(load) * num_experts).astype(jnp.float32),
          "dead_experts": jnp.mean(counts == 0).astype(jnp.float32),
          "entropy": entropy}

