"""The routed FFW: router -> dispatch -> experts -> combine (paper_spec.md section 1).

The layer holds E*G experts of width d_ff/G (G = granularity, finegrained_spec.md
section 1) and routes each token to K*G of them; G = 1 is the paper's layer. Tokens are
split into `num_groups` groups (one per data x expert device under a mesh); routing and
capacity are per group, and the dispatch buffer `[groups, E, C, d]` is resharded from
groups to experts and back, which XLA lowers to two all-to-alls.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from routing_lm import cpu_malloc, parallel, routers
from routing_lm.model import dispatch

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


@jax.custom_vjp
def expert_loop(x: jax.Array, wi: jax.Array, wo: jax.Array) -> jax.Array:
  """x [E, C, d], wi [E, d, f], wo [E, f, d] -> [E, C, d], one expert at a time.

  The CPU path of `Experts`. Its hand-written backward is one loop over experts that
  reads each expert's weights once and writes its gradients once; autodiff of a loop
  (or of the batched einsum) moves the [E, ...] weight and gradient arrays several times.
  """
  return _expert_loop_fwd(x, wi, wo)[0]


def _expert_loop_fwd(x, wi, wo):
  def one(a):
    x, wi, wo = a
    pre = x @ wi                                                   # [C, f]
    return gelu(pre) @ wo, pre
  y, pre = jax.lax.map(one, (x, wi, wo))
  return y, (x, wi, wo, pre)


def _expert_loop_bwd(res, g):
  def one(a):
    x, wi, wo, pre, g = a
    h, gelu_vjp = jax.vjp(gelu, pre)
    (dpre,) = gelu_vjp(g @ wo.T)
    return dpre @ wi.T, x.T @ dpre, h.T @ g                         # dx, dwi, dwo
  return jax.lax.map(one, (*res, g))


expert_loop.defvjp(_expert_loop_fwd, _expert_loop_bwd)


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

    One exception, on the CPU backend with one group (no mesh; leading dims of size 1),
    fewer slots per expert than the expert is wide (C < d_expert) and glibc's default
    malloc (`cpu_malloc` not active: tests, notebooks, library calls): `expert_loop`.
    There the batched backward's large temporaries are page-faulted in afresh every
    step, and the loop is 1.2x faster at E = 64 and 512 (d_ff 1024, 32,768 tokens).
    Under `cpu_malloc`'s settings (every CLI) the batched matmul is faster: 1.04x at
    E = 64, 1.3x at E = 512 (2-core VM, experts alone, forward+backward).
    """
    lead = x.shape[:-3]
    if (lead and math.prod(lead) == 1 and jax.default_backend() == "cpu"
        and parallel.active_mesh() is None):
      x3 = x.reshape(x.shape[-3:])       # a unit batch dim makes XLA:CPU's dots 2x slower
      if x3.shape[1] < self.wi.shape[-1] and not cpu_malloc.active():
        wi, wo = self.wi[...].astype(x.dtype), self.wo[...].astype(x.dtype)
        return expert_loop(x3, wi, wo).reshape(x.shape)
      return self._ffw(x3).reshape(x.shape)
    return self._ffw(x)

  def _ffw(self, x: jax.Array) -> jax.Array:
    h = gelu(jnp.einsum("...ecd,edf->...ecf", x, self.wi[...].astype(x.dtype)))
    return jnp.einsum("...ecf,efd->...ecd", h, self.wo[...].astype(x.dtype))

  def ragged(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Dropless: x_sorted [N, d] sorted by expert, group_sizes [E] -> [N, d]."""
    wi, wo = self.wi[...].astype(x_sorted.dtype), self.wo[...].astype(x_sorted.dtype)
    h = gelu(jax.lax.ragged_dot(x_sorted, wi, group_sizes))
    return jax.lax.ragged_dot(h, wo, group_sizes)


class RoutedFFW(nnx.Module):
  """Routes each token of x [B, S, d] to top_k*granularity experts."""

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    r = m.routing
    g = r.granularity
    self.num_experts = r.num_experts * g
    self.top_k = r.top_k * g
    self.num_groups = r.num_groups
    self.capacity_factor = r.capacity_factor
    self.eval_capacity_factor = r.eval_capacity_factor
    self.global_router = r.router == "sbase" and r.sbase.scope == "global"
    router_cfg = r.get(r.router, ml_collections.ConfigDict())
    self.router = routers.get(r.router)(m.d_model, self.num_experts, self.top_k, m.vocab_size,
                                        router_cfg, rngs=rngs)
    self.experts = Experts(self.num_experts, m.d_model, m.d_ff // g, DTYPES[m.param_dtype],
                           rngs=rngs)
    self.norm = nnx.LayerNorm(m.d_model, rngs=rngs) if r.output_norm else None

  def route(self, x: jax.Array, ids: jax.Array, train: bool, rng: jax.Array) -> routers.Routing:
    """x [G, T, d], ids [G, T] -> Routing with a leading group axis."""
    g, t, d = x.shape
    if self.global_router:   # Sinkhorn over all tokens at once (sbase.scope = "global")
      out = self.router(x.reshape(g * t, d), ids.reshape(-1), train=train, rng=rng)
      split = lambda a: a.reshape(g, t, *a.shape[1:])
      return out.replace(expert_ids=split(out.expert_ids), weights=split(out.weights),
                         log_probs=None if out.log_probs is None else split(out.log_probs),
                         metrics=jax.tree.map(lambda a: a[None], out.metrics))  # 1 "group"
    call = lambda xg, ig, rg: self.router(xg, ig, train=train, rng=rg)
    return jax.vmap(call)(x, ids, jax.random.split(rng, g))

  def __call__(self, x: jax.Array, token_ids: jax.Array, *, train: bool,
               rng: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """x [B, S, d], token_ids [B, S] -> (y [B, S, d], {aux_losses, metrics, log_probs})."""
    b, s, d = x.shape
    g = self.num_groups
    xg = parallel.constrain(x.reshape(g, b * s // g, d), ("group", None, "embed"))
    routing = self.route(xg, token_ids.reshape(g, -1), train, rng)
    cf = self.capacity_factor if train else self.eval_capacity_factor
    if cf is None:
      y, dropped = dispatch.ragged(xg.reshape(b * s, d), routing.expert_ids.reshape(b * s, -1),
                                   routing.weights.reshape(b * s, -1), self.num_experts,
                                   self.experts.ragged)
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
    if self.norm is not None:
      y = self.norm(y)
    metrics = jax.tree.map(lambda a: jnp.mean(a, axis=0), routing.metrics)
    metrics["dropped"] = dropped
    aux = {k: jnp.mean(v) for k, v in routing.aux_losses.items()}
    log_probs = None if routing.log_probs is None else routing.log_probs.reshape(b, s, -1)
    return y.reshape(b, s, d), {"aux_losses": aux, "metrics": metrics, "log_probs": log_probs}
