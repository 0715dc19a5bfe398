"""The router contract shared by every router, and the metrics every router reports.

A router maps token representations to expert choices. It never dispatches tokens: the
dispatch (`model/dispatch.py`) is shared and does not know which router chose.

    router = SomeRouter(spec, rngs=rngs)            # spec: RouterSpec (below)
    routing = router(x, token_ids, train=True, rng=key)
    x:         [tokens, d_model]   token representations (any dtype; router math is float32)
    token_ids: [tokens]            int32, for routers that hash the input token
    routing.expert_ids  [tokens, k] int32, distinct per token
    routing.weights     [tokens, k] float32 combine weights
    routing.aux_losses  {name: scalar}, already multiplied by their config coefficients
    routing.metrics     {name: array}
    routing.log_probs   [tokens, k] or None: log pi(chosen expert) for policy-gradient routers

What a router owns, so that no other module ever tests a router's name:
- `name` (its registry key and config section `model.routing.<name>`) and `defaults`
  (that section's fields and default values; configs/base.py builds the section from it);
- `check_config(spec)`: validates its section and what it supports (`max_top_k`: most
  experts per token, top_k * granularity), raising ConfigError naming the field;
- `global_scope`: True when it must see all tokens of the batch at once rather than one
  routing group at a time (the model then routes the flattened groups in one call);
- `policy_gradient_coef`: None, or the weight of the REINFORCE surrogate
  (`reinforce_surrogate`) that the loss adds for its `log_probs`.

Adding a router: one file in this package with a `Router` subclass that sets `name`;
`routers/__init__.py` imports every module here and registers each such class.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from routing_lm.errors import require
from routing_lm.expert_dims import expert_dims

REGISTRY: dict[str, type["Router"]] = {}


@flax.struct.dataclass
class Routing:
  expert_ids: jax.Array
  weights: jax.Array
  aux_losses: dict[str, jax.Array]
  metrics: dict[str, jax.Array]
  log_probs: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  """What every router is built from: the layer's sizes and the router's config section.

  num_experts and top_k count the layer's experts (E*G, K*G: `routing_lm.expert_dims`);
  capacity_factor is the training one (`model.routing.capacity_factor`, None = dropless),
  for routers whose choice depends on the capacity (expert choice).
  """
  d_model: int
  num_experts: int
  top_k: int
  vocab_size: int
  cfg: ml_collections.ConfigDict = dataclasses.field(
      default_factory=ml_collections.ConfigDict)
  capacity_factor: float | None = None

  @classmethod
  def from_model_config(cls, m: ml_collections.ConfigDict) -> "RouterSpec":
    """The spec of model config `m`'s routed layers, with `model.routing.<router>`."""
    r = m.routing
    dims = expert_dims(r.num_experts, r.top_k, r.granularity, m.d_ff)
    return cls(m.d_model, dims.num_experts, dims.top_k, m.vocab_size,
               r.get(r.router, ml_collections.ConfigDict()), r.capacity_factor)


class Router(nnx.Module):
  """Base class. Subclasses set `name`, implement `__call__`, and may override the rest."""

  name: ClassVar[str] = ""
  defaults: ClassVar[dict[str, Any]] = {}
  max_top_k: ClassVar[int] = 1 << 30
  global_scope: bool = False
  policy_gradient_coef: float | None = None

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if cls.name:
      REGISTRY[cls.name] = cls

  def __init__(self, spec: RouterSpec, *, rngs: nnx.Rngs):
    self.num_experts = spec.num_experts
    self.top_k = spec.top_k

  @classmethod
  def check_config(cls, spec: RouterSpec) -> None:
    """Raises ConfigError for a section or a layer this router cannot run."""
    require(spec.top_k <= cls.max_top_k, "model.routing.top_k", spec.top_k,
            f"router '{cls.name}' routes at most {cls.max_top_k} expert(s) per token "
            f"(top_k * granularity = {spec.top_k}); pick a router without that limit")
    unknown = sorted(set(spec.cfg) - set(cls.defaults))
    require(not unknown, f"model.routing.{cls.name}", unknown,
            f"unknown field(s); '{cls.name}' has {sorted(cls.defaults) or 'no fields'}")

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


def reinforce_surrogate(log_probs: jax.Array, rewards: jax.Array) -> jax.Array:
  """Policy-gradient surrogate for log_probs [T, 1] and rewards [T], leave-one-out baseline.

      mean_t[ -stop_gradient(r_t - b_t) * log pi(e_t | x_t) ],  b_t = mean of the others' r

  b_t does not depend on e_t, so the gradient is an unbiased estimate of -grad E[r]; its
  value is not meaningful (paper_spec.md section 4.3).
  """
  r = jax.lax.stop_gradient(rewards.astype(jnp.float32))
  n = r.shape[0]
  baseline = (jnp.sum(r) - r) / jnp.maximum(n - 1, 1)
  return -jnp.mean((r - baseline) * log_probs[:, 0])


def routing_metrics(expert_ids: jax.Array, num_experts: int,
                    probs: jax.Array | None) -> dict[str, jax.Array]:
  """Metrics every router reports.

  load:        [E] fraction of the (token, choice) assignments each expert received
               (ids equal to E are no assignment: expert choice's unused slots)
  max_load:    max(load) * E (1.0 = perfectly balanced)
  dead_experts fraction of experts that received nothing
  entropy:     mean per-token entropy of the router's distribution (nats; 0 if fixed)
  """
  counts = jnp.bincount(expert_ids.reshape(-1), length=num_experts)
  load = counts / jnp.maximum(jnp.sum(counts), 1)
  if probs is None:
    entropy = jnp.zeros((), jnp.float32)
  else:
    entropy = -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=-1).mean()
  return {"load": load.astype(jnp.float32),
          "max_load": (jnp.max(load) * num_experts).astype(jnp.float32),
          "dead_experts": jnp.mean(counts == 0).astype(jnp.float32),
          "entropy": entropy}
