"""HASH layers (Roller et al. 2021; paper_spec.md section 4.2).

A fixed, non-trainable table `[vocab, k]` maps each token id to its experts. It is drawn
once from `hash.seed` and stored with the parameters (so it is in every checkpoint and
identical across restarts and meshes). Methods:
- `balanced` (the default): a random permutation of the
  vocabulary dealt round-robin to experts, so every expert owns the same number of token
  ids (+-1); k > 1 takes the next experts round the ring.
- `random`: each token id draws k distinct experts uniformly at random.
No gate (weights 1), no router parameters, no auxiliary loss.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from routing_lm.errors import require
from routing_lm.routers import base


class HashTable(nnx.Variable):
  """A fixed routing table: saved in checkpoints, never updated by the optimizer."""


def make_table(vocab_size: int, num_experts: int, top_k: int, method: str,
               seed: int) -> np.ndarray:
  """Returns the `[vocab, k]` int32 table of experts for each token id."""
  rng = np.random.default_rng(seed)
  if method == "balanced":
    first = np.empty(vocab_size, np.int64)
    first[rng.permutation(vocab_size)] = np.arange(vocab_size) % num_experts
    table = (first[:, None] + np.arange(top_k)[None, :]) % num_experts
  else:
    if top_k == 1:
      table = rng.integers(0, num_experts, size=(vocab_size, 1))
    else:
      table = np.argsort(rng.random((vocab_size, num_experts)), axis=1)[:, :top_k]
  return table.astype(np.int32)


class HashRouter(base.Router):
  """HASH: a fixed token-id -> expert table; no parameters, no gate
  (`model.routing.hash`: method 'balanced' or 'random', seed)."""

  name = "hash"
  defaults = {"method": "balanced", "seed": 42}

  @classmethod
  def check_config(cls, spec: base.RouterSpec) -> None:
    super().check_config(spec)
    require(spec.cfg.method in ("random", "balanced"), "model.routing.hash.method",
            spec.cfg.method, "'random' or 'balanced'")

  def __init__(self, spec: base.RouterSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.table = HashTable(jnp.asarray(make_table(
        spec.vocab_size, spec.num_experts, spec.top_k, spec.cfg.method, int(spec.cfg.seed))))

  def __call__(self, x, token_ids, *, train, rng):
    ids = self.table[...][token_ids]                                # [T, k]
    weights = jnp.ones(ids.shape, jnp.float32)
    return base.Routing(ids, weights, {}, base.routing_metrics(ids, self.num_experts, None))
