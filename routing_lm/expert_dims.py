"""The routed layer's expert dimensions, derived from the config in one place.

A routed FFW at expansion E, granularity G and K experts per token holds E*G experts of
width d_ff/G and routes every token to K*G of them (finegrained_spec.md section 1; G = 1
is the paper's layer). The model, the parameter and FLOP counts, the laws and the config
validation all take these numbers from `expert_dims`. Pure Python: no jax, so
`routing_lm.scaling` can use it.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class ExpertDims:
  num_experts: int   # E*G experts in the layer
  top_k: int         # K*G experts per token
  d_expert: int      # d_ff / G, each expert's hidden width


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """C = min(ceil(capacity_factor * T * K / E), T): slots per expert per routing group
  (at least 1). Used by the dispatch and by routers whose choice depends on it."""
  return max(1, min(math.ceil(capacity_factor * num_tokens * top_k / num_experts), num_tokens))


def check_granularity(d_ff: int, granularity: int, field: str = "granularity") -> None:
  """Raises ValueError unless G >= 1 is an integer dividing d_ff (finegrained_spec.md 1)."""
  if isinstance(granularity, bool) or granularity < 1 or int(granularity) != granularity:
    raise ValueError(f"{field} must be an integer >= 1 (G = 1 is a standard MoE); "
                     f"got {granularity!r}.")
  if d_ff % granularity:
    raise ValueError(f"d_ff={d_ff} is not divisible by {field}={granularity}: each expert "
                     f"is d_ff/G wide; pick G among the divisors of d_ff.")


def expert_dims(num_experts: int, top_k: int, granularity: int, d_ff: int) -> ExpertDims:
  """(E, K, G, d_ff) -> ExpertDims(E*G, K*G, d_ff // G); G must divide d_ff."""
  check_granularity(d_ff, granularity)
  return ExpertDims(num_experts * granularity, top_k * granularity, d_ff // granularity)
