"""A round-robin router with no parameters: isolates dispatch cost in benchmarks."""
from __future__ import annotations

import jax.numpy as jnp

from routing_lm.routers import base


class UniformRouter(base.Router):
  """Uniform: token t takes experts (t*k + j) mod E; perfectly balanced, weights 1."""

  name = "uniform"

  @classmethod
  def num_params(cls, spec: base.RouterSpec) -> int:
    return 0

  def __call__(self, x, token_ids, *, train, rng):
    t = x.shape[0]
    ids = (jnp.arange(t)[:, None] * self.top_k + jnp.arange(self.top_k)[None, :])
    ids = (ids % self.num_experts).astype(jnp.int32)
    return base.Routing(ids, jnp.ones(ids.shape, jnp.float32), {},
                        base.routing_metrics(ids, self.num_experts, None))
