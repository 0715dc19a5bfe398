"""HASH layers (Roller et al. 2021; paper_spec.md section 4.2).

A fixed, non-trainable table `[vocab, k]` maps each token id to its experts. It is made
once and stored with the parameters (so it is in every checkpoint and identical across
restarts and meshes). Methods:
- `balanced` (the default): a random permutation (from `hash.seed`) of the vocabulary
  dealt round-robin to experts, so every expert owns the same number of token ids
  (+-1); k > 1 takes the next experts round the ring.
- `random`: each token id draws k distinct experts uniformly at random.
- `frequency` (Roller et al.'s balanced hashing): balanced by how often each token
  occurs in the train split, not by how many ids each expert owns: token ids in
  decreasing count go to the expert with the least total count so far (longest
  processing time first; ties by `hash.seed`'s permutation), so every expert gets
  close to 1/E of the training tokens; k > 1 takes the next experts round the ring.
  The counts come from the data (`fit_to_data`, called by the trainer on a fresh run);
  until then the table is `balanced`.
No gate (weights 1), no router parameters, no auxiliary loss.
"""
from __future__ import annotations

import heapq

import jax.numpy as jnp
import numpy as np
from flax import nnx

from routing_lm.errors import require
from routing_lm.routers import base


class HashTable(nnx.Variable):
  """A fixed routing table: saved in checkpoints, never updated by the optimizer."""


def frequency_table(counts: np.ndarray, num_experts: int, top_k: int,
                    seed: int) -> np.ndarray:
  """`[vocab, k]` int32: token ids by decreasing count, each to the expert with the least
  total count so far (ties between equal counts broken by a permutation from `seed`)."""
  counts = np.asarray(counts, np.int64)
  vocab = counts.shape[0]
  order = np.random.default_rng(seed).permutation(vocab)
  order = order[np.argsort(-counts[order], kind="stable")]
  heap = [(0, e) for e in range(num_experts)]                 # (total count, expert)
  first = np.empty(vocab, np.int64)
  for token in order:
    load, e = heapq.heappop(heap)
    first[token] = e
    heapq.heappush(heap, (load + int(counts[token]), e))
  return ((first[:, None] + np.arange(top_k)[None, :]) % num_experts).astype(np.int32)


def make_table(vocab_size: int, num_experts: int, top_k: int, method: str,
               seed: int) -> np.ndarray:
  """Returns the `[vocab, k]` int32 table of experts for each token id (`frequency`
  starts as `balanced`: see `HashRouter.fit_to_data`)."""
  rng = np.random.default_rng(seed)
  if method in ("balanced", "frequency"):
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
  def num_params(cls, spec: base.RouterSpec) -> int:
    return 0          # a fixed table: no router weights, no router matmul

  @classmethod
  def check_config(cls, spec: base.RouterSpec) -> None:
    super().check_config(spec)
    require(spec.cfg.method in ("random", "balanced", "frequency"), "model.routing.hash.method",
            spec.cfg.method, "'random', 'balanced' (token ids) or 'frequency' (token counts "
            "of the train split)")

  def __init__(self, spec: base.RouterSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    self.method, self.seed = spec.cfg.method, int(spec.cfg.seed)
    self.table = HashTable(jnp.asarray(make_table(
        spec.vocab_size, spec.num_experts, spec.top_k, self.method, self.seed)))

  @property
  def wants_token_counts(self) -> bool:
    return self.method == "frequency"

  def fit_to_data(self, token_counts: np.ndarray) -> None:
    if self.wants_token_counts:
      vocab, k = self.table.shape
      counts = np.zeros(vocab, np.int64)
      counts[:min(vocab, len(token_counts))] = token_counts[:vocab]
      self.table[...] = jnp.asarray(frequency_table(counts, self.num_experts, k, self.seed))

  def __call__(self, x, token_ids, *, train, rng):
    ids = self.table[...][token_ids]                                # [T, k]
    weights = jnp.ones(ids.shape, jnp.float32)
    return base.Routing(ids, weights, {}, base.routing_metrics(ids, self.num_experts, None))
