"""Parameter and FLOP counts (paper_spec.md sections 1 and 3; finegrained_spec.md
sections 1 and 5). All counts exclude embeddings, the output layer and norms
(Kaplan et al.); rotary positions have no parameters.

    attention per block   4 d h k                  (q, k, v, o; h heads of size k, h k = d usually)
    FFW per block         2 d d_ff                 (one expert's worth when routed)
    shared_params         n_routed S 2 d d_ff / G  S shared experts of width d_ff/G
    n_params  (N)         L (4 d h k + 2 d d_ff) + shared   the dense-equivalent size
    total_params (P)      N + n_routed ((E-1) 2 d d_ff) + router params    experts + router
    active_params_nonemb  N + n_routed (K-1) 2 d d_ff             what one token uses
    total_params_nonemb   P - router params                       (Krajewski's N)
    router_params         n_routed x the router's own count       (`Router.num_params`:
                          d E G for a learned [d, E G] projection, 0 for HASH's table)
    flops_per_token (F)   2 active + 2 router params + 2 L S h k  forward: the router matmul
                          and attention scores (Kaplan's 2 n_layer n_ctx d_attn, with the
                          attention width d_attn = h k, which differs from d in the
                          paper's 130m: 16 x 64 = 1024 against 896)
    train_flops_per_token 6 active + 14 router params             (finegrained Eq. 10)

N with shared experts (S > 0): the paper's N is the dense model a routed model is built
from, i.e. what a token uses at K = 1. A token of a routed layer goes through G routed
experts' worth (one d_ff FFW) per unit of K plus S always-on experts of width d_ff/G, so
N counts the shared experts, like the dense layers: N = the dense model whose routed
layers' FFW is (1 + S/G) d_ff wide. They are in P, active and both FLOP counts the same
way; the router stays over the E*G routed experts only.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from routing_lm import routers
from routing_lm.expert_dims import expert_dims
from routing_lm.model.transformer import head_dim, routed_layer_indices


@dataclasses.dataclass(frozen=True)
class Counts:
  n_params: int
  total_params: int
  active_params_nonemb: int
  total_params_nonemb: int
  router_params: int
  shared_params: int
  embedding_params: int
  flops_per_token: int
  train_flops_per_token: int
  num_routed_layers: int

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def count(m: ml_collections.ConfigDict, seq_len: int) -> Counts:
  """Counts for the model config `m` at sequence length `seq_len`."""
  r = m.routing
  d, f, layers = m.d_model, m.d_ff, m.num_layers
  e, k = r.num_experts, r.top_k
  n_routed = len(routed_layer_indices(layers, r.routing_frequency, e))
  ffw = 2 * d * f
  dims = expert_dims(e, k, r.granularity, f)
  shared = n_routed * r.get("shared_experts", 0) * 2 * d * dims.d_expert
  d_attn = m.num_heads * head_dim(m)
  n = layers * (4 * d * d_attn + ffw) + shared
  router = n_routed * (routers.get(r.router).num_params(routers.RouterSpec.from_model_config(m))
                       if n_routed else 0)
  experts_extra = n_routed * (e - 1) * ffw
  active = n + n_routed * (k - 1) * ffw
  return Counts(
      n_params=n,
      total_params=n + experts_extra + router,
      active_params_nonemb=active,
      total_params_nonemb=n + experts_extra,
      router_params=router,
      shared_params=shared,
      embedding_params=2 * m.vocab_size * d,
      flops_per_token=2 * active + 2 * router + 2 * layers * seq_len * d_attn,
      train_flops_per_token=6 * active + 14 * router,
      num_routed_layers=n_routed)


def train_step_flops(m: ml_collections.ConfigDict, batch_size: int, seq_len: int) -> float:
  """Model FLOPs of one train step: 3 x (F + output layer 2 d V) x tokens (the MFU
  numerator of the benchmarks and the TPU compile check)."""
  counts = count(m, seq_len)
  return 3.0 * (counts.flops_per_token + 2 * m.d_model * m.vocab_size) * batch_size * seq_len
