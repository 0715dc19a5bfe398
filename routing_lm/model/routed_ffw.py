"""The routed FFW: router -> dispatch -> experts -> combine (paper_spec.md section 1).

The layer holds E*G experts of width d_ff/G (G = granularity, finegrained_spec.md
section 1) and routes each token to K*G of them; G = 1 is the paper's layer. Tokens are
split into `num_groups` groups (one per data x expert device under a mesh); routing and
capacity are per group, and the dispatch buffer `[groups, E, C, d]` is resharded from
groups to experts and back, which XLA lowers to two all-to-alls. Dropless
(`capacity_factor=None`, and evaluation by default) goes through `grouped`: sorted
assignments, grouped matmuls, an all-gather exchange over the `expert` axis.

Shared experts (DeepSeekMoE; `model.routing.shared_experts` = S, default 0): S always-on
experts of width d_ff/G that every token goes through, added unweighted to the routed
output (before `output_norm`). They are one dense FFW of width S*d_ff/G (`SharedFFW`:
the same function as S separate experts summed, in one matmul pair, sharded like the
dense FFW).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from routing_lm import parallel, routers
from routing_lm.expert_dims import expert_dims
from routing_lm.model import dispatch, grouped

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


class Experts(nnx.Module):
  """E stacked FFWs: wi [E, d_model, d_expert], wo [E, d_expert, d_model]."""

  def __init__(self, num_experts: int, d_model: int, d_expert: int, param_dtype: Any, *,
               rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                             in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.wi = nnx.Param(init(rngs.params(), (num_experts, d_model, d_expert), param_dtype),
                        out_sharding=("expert", "embed", "mlp"))
    self.wo = nnx.Param(init(rngs.params(), (num_experts, d_expert, d_model), param_dtype),
                        out_sharding=("expert", "mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., E, C, d] -> [..., E, C, d]: one batched matmul per projection.

    Leading dims that are all 1 (one routing group) are dropped for the matmuls: the
    same computation, and XLA:CPU runs `ecd,edf` 2x faster than `gecd,edf` with g = 1.
    """
    lead = x.shape[:-3]
    if lead and math.prod(lead) == 1:
      return self(x.reshape(x.shape[-3:])).reshape(x.shape)
    h = gelu(jnp.einsum("...ecd,edf->...ecf", x, self.wi[...].astype(x.dtype)))
    return jnp.einsum("...ecf,efd->...ecd", h, self.wo[...].astype(x.dtype))

class SharedFFW(nnx.Module):
  """The shared experts: wi [d_model, width], wo [width, d_model], GELU, logical axes
  embed/mlp like the dense FFW (width = S * d_ff / G)."""

  def __init__(self, d_model: int, width: int, param_dtype: Any, *, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.wi = nnx.Param(init(rngs.params(), (d_model, width), param_dtype),
                        out_sharding=("embed", "mlp"))
    self.wo = nnx.Param(init(rngs.params(), (width, d_model), param_dtype),
                        out_sharding=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., d] -> [..., d]; the matmuls run on [tokens, d]."""
    flat = x.reshape(-1, x.shape[-1])
    h = gelu(flat @ self.wi[...].astype(x.dtype))
    return (h @ self.wo[...].astype(x.dtype)).reshape(x.shape)


class RoutedFFW(nnx.Module):
  """Routes each token of x [B, S, d] to top_k*granularity experts."""

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    r = m.routing
    spec = routers.RouterSpec.from_model_config(m)
    self.num_experts, self.top_k = spec.num_experts, spec.top_k
    self.num_groups = r.num_groups
    self.capacity_factor = r.capacity_factor
    self.eval_capacity_factor = r.eval_capacity_factor
    self.grouped_matmul = r.get("grouped_matmul", "auto")
    self.router = routers.get(r.router)(spec, rngs=rngs)
    d_expert = expert_dims(r.num_experts, r.top_k, r.granularity, m.d_ff).d_expert
    self.experts = Experts(self.num_experts, m.d_model, d_expert, DTYPES[m.param_dtype],
                           rngs=rngs)
    self.norm = nnx.LayerNorm(m.d_model, rngs=rngs) if r.output_norm else None
    num_shared = r.get("shared_experts", 0)
    self.shared = (SharedFFW(m.d_model, num_shared * d_expert, DTYPES[m.param_dtype],
                             rngs=rngs) if num_shared else None)

  def route(self, x: jax.Array, ids: jax.Array, train: bool, rng: jax.Array,
            seq_len: int | None = None) -> routers.Routing:
    """x [G, T, d], ids [G, T] -> Routing with a leading group axis. Each group holds
    whole sequences of `seq_len` tokens (passed to routers that take it; None: one)."""
    g, t, d = x.shape
    kw = {"seq_len": seq_len} if self.router.takes_seq_len else {}
    if self.router.global_scope:   # the router sees every token of the batch at once
      out = self.router(x.reshape(g * t, d), ids.reshape(-1), train=train, rng=rng, **kw)
      split = lambda a: a.reshape(g, t, *a.shape[1:])
      return out.replace(expert_ids=split(out.expert_ids), weights=split(out.weights),
                         log_probs=None if out.log_probs is None else split(out.log_probs),
                         metrics=jax.tree.map(lambda a: a[None], out.metrics))  # 1 "group"
    call = lambda xg, ig, rg: self.router(xg, ig, train=train, rng=rg, **kw)
    return jax.vmap(call)(x, ids, jax.random.split(rng, g))

  def __call__(self, x: jax.Array, token_ids: jax.Array, *, train: bool,
               rng: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """x [B, S, d], token_ids [B, S] -> (y [B, S, d], {aux_losses, metrics, log_probs,
    policy_gradient_coef, expert_ids [B, S, K]}) (log_probs and policy_gradient_coef from
    `routers.base.Router`; metrics averaged over the groups: the global load)."""
    b, s, d = x.shape
    g = self.num_groups
    xg = parallel.constrain(x.reshape(g, b * s // g, d), ("group", None, "embed"))
    routing = self.route(xg, token_ids.reshape(g, -1), train, rng, s)
    cf = self.capacity_factor if train else self.eval_capacity_factor
    if cf is None:
      y = grouped.dropless_ffw(xg, routing.expert_ids, routing.weights, self.experts.wi[...],
                               self.experts.wo[...], gelu, self.grouped_matmul)
      dropped = jnp.zeros((), jnp.float32)
    else:
      cap = dispatch.capacity(b * s // g, self.num_experts, self.top_k, cf)
      plan = jax.vmap(lambda ids: dispatch.plan(ids, self.num_experts, cap))(routing.expert_ids)
      buf = parallel.constrain(jax.vmap(dispatch.gather_in)(xg, plan),
                               ("group", None, None, "embed"))
      buf = parallel.constrain(buf, ("expert_group", "expert", None, "embed"))  # all-to-all
      out = parallel.constrain(self.experts(buf), ("expert_group", "expert", None, "embed"))
      out = parallel.constrain(out, ("group", None, None, "embed"))             # all-to-all
      y = jax.vmap(dispatch.gather_out)(out, plan, routing.weights)
      dropped = jnp.mean(plan.dropped)
    if self.shared is not None:
      y = y.reshape(b, s, d) + self.shared(x)
    if self.norm is not None:
      y = self.norm(y)
    metrics = jax.tree.map(lambda a: jnp.mean(a, axis=0), routing.metrics)
    metrics["dropped"] = dropped
    aux = {k: jnp.mean(v) for k, v in routing.aux_losses.items()}
    log_probs = None if routing.log_probs is None else routing.log_probs.reshape(b, s, -1)
    return y.reshape(b, s, d), {"aux_losses": aux, "metrics": metrics, "log_probs": log_probs,
                                "policy_gradient_coef": self.router.policy_gradient_coef,
                                "expert_ids": routing.expert_ids.reshape(b, s, -1)}
