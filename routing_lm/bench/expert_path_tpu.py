"""The two expert paths compiled for a TPU slice: capacity (fixed [E, C, d] buffers, batched
einsum, two all-to-alls) against dropless grouped matmuls (megablox gmm or ragged_dot under
shard_map, all-gather exchange; routing_lm/model/grouped.py). Nothing runs: libtpu compiles
one routed FFW layer's forward and backward at the config's batch on any host.

    python -m routing_lm.bench.expert_path_tpu --config=configs/paper.py:130m,sbase,64 \
        --topology=v5e:4x4 --mesh=4,4,1

Per chip, for each path: HBM temporaries (the arguments are the same on every path), FLOPs
(the compiler's, and the analytic count of the matmuls that path does: the capacity path
computes cf x the routed tokens, padding included; gmm only the routed rows), HBM bytes
accessed, each collective (count and bytes), and the roofline time max(FLOPs / peak,
bytes / bandwidth) with the larger of the two FLOP counts (the compiler sees no FLOPs
inside a Pallas kernel). The last lines give the ratios to the capacity path. What it
cannot tell: real step time (ICI bandwidth and contention are not in the roofline; the
collectives' bytes are printed so that they can be weighed against the slice's
interconnect).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from routing_lm import config as config_lib, parallel, tpu_compile
from routing_lm.model import dispatch
from routing_lm.model.routed_ffw import RoutedFFW

PATHS = ("capacity", "gmm", "ragged_dot")


@dataclasses.dataclass
class PathReport:
  path: str
  temporaries: int
  compiler_flops: float
  analytic_flops: float
  bytes_accessed: float
  collectives: dict[str, dict[str, int]]

  def roofline(self, chip: tpu_compile.Chip) -> tpu_compile.Roofline:
    flops = max(self.compiler_flops, self.analytic_flops)
    return tpu_compile.roofline(flops, self.bytes_accessed, self.analytic_flops, chip)


def layer_config(spec: str, path: str, mesh: Sequence[int]):
  """The config's model with the routed FFW on `path`, token groups one per device."""
  c = config_lib.load(spec, lock=False)
  r = c.model.routing
  if path != "capacity":
    r.capacity_factor = None
    r.grouped_matmul = path
  c.mesh.data, c.mesh.expert, c.mesh.model = mesh
  r.num_groups = mesh[0] * mesh[1]
  return c


def analytic_flops(c, path: str, devices: int) -> float:
  """Per-chip forward+backward FLOPs of the expert matmuls: 3 x 4 d f x rows, rows = K T
  (dropless) or E C (capacity: cf K T rounded up per group)."""
  m, r, d = c.model, c.model.routing, c.data
  tokens = d.batch_size * d.seq_len
  rows = tokens * r.top_k
  if path == "capacity":
    per_group = tokens // r.num_groups
    cap = dispatch.capacity(per_group, r.num_experts, r.top_k, r.capacity_factor)
    rows = r.num_groups * r.num_experts * cap
  return 3.0 * 4 * m.d_model * m.d_ff * rows / devices


def compile_path(spec: str, path: str, topo: tpu_compile.Topology,
                 mesh_shape: Sequence[int]) -> PathReport:
  c = layer_config(spec, path, mesh_shape)
  mesh = parallel.make_mesh(c.mesh, topo.devices)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: RoutedFFW(c.model, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  shard = lambda tree: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
      parallel.mesh_shardings(mesh, nnx.get_partition_spec(tree)))
  b, s, d = c.data.batch_size, c.data.seq_len, c.model.d_model
  dtype = jnp.dtype(c.model.dtype)
  x = jax.ShapeDtypeStruct((b, s, d), dtype, sharding=jax.sharding.NamedSharding(
      mesh, parallel.logical_to_spec(("batch", "length", "embed"))))
  ids = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=parallel.batch_sharding(mesh))

  def loss(params, rest, x, ids):
    y, aux = nnx.merge(graphdef, params, rest)(x, ids, train=True, rng=jax.random.key(0))
    return jnp.mean(y.astype(jnp.float32) ** 2) + sum(aux["aux_losses"].values(), 0.0)

  step = jax.jit(parallel.on_mesh(mesh, jax.grad(loss, argnums=(0, 2))))
  compiled = step.lower(shard(params), shard(rest), x, ids).compile()
  mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return PathReport(path, int(mem.temp_size_in_bytes),
                    float(cost.get("flops", math.nan)), analytic_flops(c, path, len(topo.devices)),
                    float(cost.get("bytes accessed", math.nan)),
                    tpu_compile.collectives(compiled.as_text()))


def table(reports: list[PathReport], chip: tpu_compile.Chip) -> list[str]:
  gib, mib = tpu_compile.GIB, 2 ** 20
  head = ("| path | temporaries GiB | compiler GFLOP | analytic GFLOP | HBM GiB accessed | "
          "all-to-all MiB | all-gather MiB | reduce-scatter MiB | all-reduce MiB | "
          "collective MiB | roofline ms |")
  lines = [head, "|" + "---|" * 11]
  for r in reports:
    col = {k: v["bytes"] / mib for k, v in r.collectives.items()}
    roof = r.roofline(chip)
    lines.append(
        f"| {r.path} | {r.temporaries / gib:.2f} | {r.compiler_flops / 1e9:.0f} | "
        f"{r.analytic_flops / 1e9:.0f} | {r.bytes_accessed / gib:.2f} | "
        f"{col['all-to-all']:.0f} | {col['all-gather']:.0f} | {col['reduce-scatter']:.0f} | "
        f"{col['all-reduce']:.0f} | {sum(col.values()):.0f} | {roof.time_s * 1e3:.2f} |")
  return lines


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/paper.py:130m,sbase,64")
  p.add_argument("--topology", default="v5e:4x4")
  p.add_argument("--mesh", default="4,4,1", help="data,expert,model")
  p.add_argument("--paths", default=",".join(PATHS))
  a = p.parse_args(argv)
  topo = tpu_compile.get_topology(a.topology)
  mesh = tuple(int(v) for v in a.mesh.split(","))
  reports = []
  for path in a.paths.split(","):
    reports.append(compile_path(a.config, path, topo, mesh))
    print(f"compiled {path}", flush=True)
  print(f"{a.config} on {a.topology}, mesh {a.mesh}: one routed FFW layer, forward + "
        f"backward, per chip")
  print("\n".join(table(reports, topo.chip)))
  base = reports[0]
  col = lambda x: sum(v["bytes"] for v in x.collectives.values())
  for r in reports[1:]:
    print(f"{r.path}_over_{base.path}: temporaries={r.temporaries / base.temporaries:.2f} "
          f"collective_bytes={col(r) / max(col(base), 1):.2f} "
          f"hbm_bytes={r.bytes_accessed / base.bytes_accessed:.2f} "
          f"roofline={r.roofline(topo.chip).time_s / base.roofline(topo.chip).time_s:.2f}")


if __name__ == "__main__":
  main()
