"""The dropless expert path: assignments sorted by expert, one grouped matmul per
projection (`model.routing.capacity_factor=None`; evaluation by default).

Grouped matmul (`model.routing.grouped_matmul`):
- "ragged_dot": `jax.lax.ragged_dot` (XLA, every backend; on CPU its cost grows with E).
- "gmm": megablox `gmm`, the Pallas TPU kernel (run in the Pallas interpreter off TPU:
  tests only). Its grid skips the row tiles past the last group, so rows that are not
  this device's cost no FLOPs.
- "auto" (default): gmm when compiling for TPU, ragged_dot elsewhere.

On a mesh the layer runs under `jax.shard_map`, because Mosaic kernels are not partitioned
automatically and GSPMD would otherwise gather every expert's weights to every device.
The exchange is an all-gather dispatch (Megatron-LM's "allgather" token dispatcher), which
needs no ragged all-to-all (not implemented on XLA:CPU). Each device
 1. all-gathers the tokens, choices and weights of its `expert`-axis peers
    ([ep * N, d] for its own N tokens),
 2. sorts the assignments to its E / ep local experts by expert and runs the grouped
    matmuls on them (everything else is sorted last and skipped),
 3. combines them with the router's weights and reduce-scatters the sums back over
    `expert` (summing `model`'s partial products of the d_ff split on the way).
Per device and routed layer this moves (ep - 1) N d in and out, against the capacity
path's two all-to-alls of cf K N d (ep - 1) / ep: ep / (cf K) times the bytes, in exchange
for no dropped token and no padded slot. docs/tpu.md compares the two compiled for TPU.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from routing_lm import parallel
from routing_lm.config import GROUPED_MATMULS as KERNELS
from routing_lm.model import dispatch

# megablox gmm's (m, k, n) tile; a dimension smaller than its tile takes its own size.
GMM_TILING = (512, 1024, 1024)


def resolve_kernel(kind: str) -> str:
  """`model.routing.grouped_matmul` -> "ragged_dot" or "gmm" ("auto": gmm for TPU)."""
  if kind not in KERNELS:
    raise ValueError(f"config.model.routing.grouped_matmul={kind!r} is not one of {KERNELS}.")
  if kind == "auto":
    return "gmm" if parallel.target_platform() == "tpu" else "ragged_dot"
  return kind


def _gmm(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array) -> jax.Array:
  """megablox gmm: lhs [M, k], rhs [G, k, n] -> [M, n]; M is padded to the row tile."""
  from jax.experimental.pallas.ops.tpu.megablox import ops
  m, k = lhs.shape
  n = rhs.shape[-1]
  tm = min(GMM_TILING[0], -(-m // 8) * 8)
  pad = -m % tm
  tiling = (tm, min(GMM_TILING[1], k), min(GMM_TILING[2], n))
  out = ops.gmm(jnp.pad(lhs, ((0, pad), (0, 0))), rhs, sizes, lhs.dtype, tiling, None, None,
                False, parallel.target_platform() != "tpu")
  return out[:m]


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, kernel: str) -> jax.Array:
  """lhs [M, k] sorted by group, rhs [G, k, n], sizes [G] -> [M, n]: rows of group g times
  rhs[g]. Rows past sum(sizes) are 0."""
  out = _gmm(lhs, rhs, sizes) if kernel == "gmm" else jax.lax.ragged_dot(lhs, rhs, sizes)
  valid = jnp.arange(lhs.shape[0]) < jnp.sum(sizes)
  return jnp.where(valid[:, None], out, 0)   # gmm leaves unvisited rows unwritten


def grouped_ffw(x_sorted: jax.Array, sizes: jax.Array, wi: jax.Array, wo: jax.Array,
                activation: Callable[[jax.Array], jax.Array], kernel: str) -> jax.Array:
  """x_sorted [M, d], sizes [E], wi [E, d, f], wo [E, f, d] -> [M, d]."""
  h = activation(grouped_matmul(x_sorted, wi.astype(x_sorted.dtype), sizes, kernel))
  return grouped_matmul(h, wo.astype(x_sorted.dtype), sizes, kernel)


def _local(x, expert_ids, weights, wi, wo, *, activation, kernel, on_mesh):
  """One device's share: x [G, T, d], expert_ids/weights [G, T, K] -> [G, T, d]."""
  g, t, d = x.shape
  x, ids, w = x.reshape(g * t, d), expert_ids.reshape(g * t, -1), weights.reshape(g * t, -1)
  first = 0
  if on_mesh:
    x, ids, w = (jax.lax.all_gather(a, "expert", tiled=True) for a in (x, ids, w))
    first = jax.lax.axis_index("expert") * wi.shape[0]
  ffw = functools.partial(grouped_ffw, wi=wi, wo=wo, activation=activation, kernel=kernel)
  y = dispatch.dropless(x, ids, w, ffw, wi.shape[0], first)
  if on_mesh:
    y = jax.lax.psum(jax.lax.psum_scatter(y, "expert", tiled=True), "model")
  return y.reshape(g, t, d)


def dropless_ffw(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, wi: jax.Array,
                 wo: jax.Array, activation: Callable[[jax.Array], jax.Array],
                 kernel: str) -> jax.Array:
  """x [G, T, d] (token groups), expert_ids/weights [G, T, K], wi [E, d, f], wo [E, f, d]
  -> sum_k weights * expert_k(x) [G, T, d], every assignment computed (see module doc)."""
  kernel = resolve_kernel(kernel)
  mesh = parallel.active_mesh()
  local = functools.partial(_local, activation=activation, kernel=kernel,
                            on_mesh=mesh is not None)
  if mesh is None:
    return local(x, expert_ids, weights, wi, wo)
  groups = parallel.logical_to_spec(("group", None, None))
  # The Pallas call of gmm declares no varying mesh axes, so vma checking refuses it; the
  # gradients are the same unchecked (the `dropless` parallel check, both kernels).
  return jax.shard_map(
      local, mesh=mesh, out_specs=groups, check_vma=kernel != "gmm",
      in_specs=(groups, groups, groups, parallel.logical_to_spec(("expert", "embed", "mlp")),
                parallel.logical_to_spec(("expert", "mlp", "embed"))),
  )(x, expert_ids, weights, wi, wo)
