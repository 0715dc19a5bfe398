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
  (`reinforce_surrogate`) that the loss adds for its `log_probs`;
- `wants_token_counts` / `fit_to_data(counts)`: a router that sets its fixed variables
  from the train split's token frequencies (HASH's `frequency` table) says so; the
  trainer calls `fit_to_data` once, on a fresh run, before the first step;
- `takes_seq_len`: True when `__call__` takes `seq_len=` (the routed FFW then passes the
  sequence length, so the router can split its tokens into whole sequences);
- `update_state(metrics)`: updates the router's non-trained state (`RouterState`
  variables) between steps, from its layer's step metrics (global over every routing
  group). The train step calls it after the optimizer update, outside the model's
  forward (which may be rematerialised and must not mutate variables).

Router health: every learned router takes a `z_loss_coef` (ST-MoE's router z-loss,
`z_loss_terms`) and reports the unweighted z as the metric `z_loss`.

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
import numpy as np
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
  granularity is G (for error messages and routers that care);
  capacity_factor is the training one (`model.routing.capacity_factor`, None = dropless),
  for routers whose choice depends on the capacity (expert choice);
  init_scale is the learned projection's init scale (`model.routing.router_init_scale`).
  """
  d_model: int
  num_experts: int
  top_k: int
  vocab_size: int
  cfg: ml_collections.ConfigDict = dataclasses.field(
      default_factory=ml_collections.ConfigDict)
  granularity: int = 1
  capacity_factor: float | None = None
  init_scale: float = 0.1

  @classmethod
  def from_model_config(cls, m: ml_collections.ConfigDict) -> "RouterSpec":
    """The spec of model config `m`'s routed layers, with `model.routing.<router>`."""
    r = m.routing
    dims = expert_dims(r.num_experts, r.top_k, r.granularity, m.d_ff)
    return cls(m.d_model, dims.num_experts, dims.top_k, m.vocab_size,
               r.get(r.router, ml_collections.ConfigDict()), r.granularity,
               r.capacity_factor, r.get("router_init_scale", cls.init_scale))


class Router(nnx.Module):
  """Base class. Subclasses set `name`, implement `__call__`, and may override the rest."""

  name: ClassVar[str] = ""
  defaults: ClassVar[dict[str, Any]] = {}
  max_top_k: ClassVar[int] = 1 << 30
  global_scope: bool = False
  policy_gradient_coef: float | None = None
  takes_seq_len: ClassVar[bool] = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if cls.name:
      REGISTRY[cls.name] = cls

  def __init__(self, spec: RouterSpec, *, rngs: nnx.Rngs):
    self.num_experts = spec.num_experts
    self.top_k = spec.top_k

  @classmethod
  def num_params(cls, spec: RouterSpec) -> int:
    """Trained router parameters of one layer: the [d_model, E] projection by default
    (counted in P and, as its matmul, in F: `model/counting.py`)."""
    return spec.d_model * spec.num_experts

  @classmethod
  def check_config(cls, spec: RouterSpec) -> None:
    """Raises ConfigError for a section or a layer this router cannot run."""
    require(spec.top_k <= cls.max_top_k, "model.routing.top_k", spec.top_k // spec.granularity,
            f"router '{cls.name}' routes at most {cls.max_top_k} expert(s) per token "
            f"(top_k * granularity = {spec.top_k}); lower top_k or granularity, or pick "
            "a router without that limit")
    unknown = sorted(set(spec.cfg) - set(cls.defaults))
    require(not unknown, f"model.routing.{cls.name}", unknown,
            f"unknown field(s); '{cls.name}' has {sorted(cls.defaults) or 'no fields'}")
    if "z_loss_coef" in cls.defaults:
      coef = spec.cfg.get("z_loss_coef", cls.defaults["z_loss_coef"])
      require(isinstance(coef, (int, float)) and coef >= 0,
              f"model.routing.{cls.name}.z_loss_coef", coef, "a number >= 0 (0 = off)")

  @property
  def wants_token_counts(self) -> bool:
    """Whether `fit_to_data` uses the train split's token counts."""
    return False

  def fit_to_data(self, token_counts: np.ndarray) -> None:
    """Sets fixed (non-trained) variables from the train split's token counts [vocab]."""

  def __call__(self, x: jax.Array, token_ids: jax.Array, *, train: bool,
               rng: jax.Array | None) -> Routing:
    raise NotImplementedError

  def update_state(self, metrics: dict[str, jax.Array]) -> None:
    """Updates `RouterState` variables from this layer's step metrics (`load` [E] is the
    global load of the step). Called inside the jitted train step, after the optimizer
    update. Default: no state, nothing to do."""


class RouterState(nnx.Variable):
  """Router state that the optimizer does not train (it is not an `nnx.Param`) but
  `Router.update_state` changes between steps: kept in the train state's `other`
  collection, so it is in every checkpoint and restored bit for bit."""


def router_weight(spec: RouterSpec, rngs: nnx.Rngs) -> nnx.Param:
  """The learned routers' `[d_model, num_experts]` float32 projection: truncated normal of
  variance spec.init_scale / d_model (Switch's small init: scale 0.1, the default)."""
  init = nnx.initializers.variance_scaling(spec.init_scale, "fan_in", "truncated_normal")
  return nnx.Param(init(rngs.params(), (spec.d_model, spec.num_experts), jnp.float32),
                   out_sharding=("embed", None))


def router_logits(x: jax.Array, w: nnx.Param) -> jax.Array:
  """[tokens, d_model] x [d_model, E] -> [tokens, E] logits in float32."""
  return jnp.dot(x.astype(jnp.float32), w[...])


def z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss mean_t logsumexp(logits_t)^2 for logits [T, E] (float32)."""
  return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def z_loss_terms(logits: jax.Array, coef: float
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The z-loss of a learned router's logits [T, E]: ({"z_loss": coef * z} if coef > 0
  else {}, {"z_loss": z}) -> (aux losses, metrics). The metric is always reported."""
  z = z_loss(logits)
  return ({"z_loss": coef * z} if coef > 0 else {}), {"z_loss": z}


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


def agreement(expert_ids: jax.Array, logits: jax.Array) -> jax.Array:
  """Fraction of tokens whose training choice is the one evaluation would make (the
  top-k of the raw scores, as a set): 1.0 when training routes like evaluation.

  expert_ids [T, k] chosen in training, logits [T, E] -> scalar.
  """
  _, eval_ids = jax.lax.top_k(logits, expert_ids.shape[-1])
  same = jnp.sort(expert_ids, axis=-1) == jnp.sort(eval_ids, axis=-1)
  return jnp.mean(jnp.all(same, axis=-1).astype(jnp.float32))


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
