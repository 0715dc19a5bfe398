"""Step time and per-device memory of configs/tiny.py on each (data, expert, model) mesh.

    python -m routing_lm.bench.parallel [--steps 10] [--router sbase] [--experts 8]
                                        [--batch 16] [--meshes 8,1,1 2,4,1 2,2,2 1,8,1]

Runs on 8 simulated CPU devices (`jax_num_cpu_devices`, set before the first
computation), so the step times compare the programs XLA builds for each mesh
(their collectives and per-device work) on 2-16 host cores, not real interconnects. For
each mesh, with ZeRO-1 off and on: the compiled train step (`train.make_train_step`),
warm-up steps (`bench.harness`), then the median of `--steps` timed steps (each ending
in `block_until_ready`). Memory is per device, from the shards of the live arrays on the
mesh's first device: parameters, optimizer state, and their sum; `temp` is XLA's
scratch estimate for the step (`memory_analysis().temp_size_in_bytes`). A 1-device
row (same token grouping as the 8-device meshes) comes first as the reference; `loss`
is the first step's, the same on every mesh.
The last line is `zero1_opt_ratio_<mesh>=..` for each mesh (per-device optimizer
bytes with ZeRO-1 / without).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from routing_lm import config as config_lib, cpu_malloc
from routing_lm.bench import harness

DEFAULT_MESHES = ("8,1,1", "2,4,1", "2,2,2", "1,8,1")


def device_bytes(tree, device) -> int:
  """Bytes of `tree`'s shards that live on `device`."""
  return sum(sh.data.nbytes for a in jax.tree.leaves(tree) for sh in a.addressable_shards
             if sh.device == device)


def measure(config, mesh_shape: tuple[int, int, int], zero1: bool, steps: int,
            num_groups: int = 1) -> dict:
  from routing_lm import parallel, train
  c = config.copy_and_resolve_references()
  c.mesh.data, c.mesh.expert, c.mesh.model = mesh_shape
  c.train.zero1 = zero1
  c.model.routing.num_groups = num_groups
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:int(np.prod(mesh_shape))])
  s = train.setup(c, mesh)
  state = train.init_state(s)
  step = train.make_train_step(s)
  host = harness.synthetic_batch(c.data.batch_size, c.data.seq_len, c.model.vocab_size)
  dev = s.mesh.devices.flat[0]
  row = {"params": device_bytes(state["params"], dev), "opt": device_bytes(state["opt"], dev)}
  with jax.set_mesh(s.mesh):
    batch = train.to_global(s, host)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    row["compile_s"] = time.perf_counter() - t0
    hlo = compiled.as_text()
    row["all_to_all"] = hlo.count(" all-to-all(") + hlo.count(" all-to-all-start(")
    mem = compiled.memory_analysis()
    row["temp"] = getattr(mem, "temp_size_in_bytes", float("nan")) if mem else float("nan")
    state, metrics = compiled(state, batch)    # the first step's loss: same on every mesh
    row["loss"] = float(metrics["loss"])
    row["step_s"], _, _ = harness.time_steps(lambda state: compiled(state, batch), state,
                                             steps)
  row["groups"] = s.config.model.routing.num_groups
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--router", default="sbase")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
  parser.add_argument("--meshes", nargs="+", default=list(DEFAULT_MESHES))
  args = parser.parse_args()
  jax.config.update("jax_num_cpu_devices", 8)     # before the first computation
  config = config_lib.load(f"configs/tiny.py:{args.router},{args.experts}",
                           {"data.batch_size": args.batch})
  meshes = [tuple(int(x) for x in m.split(",")) for m in args.meshes]
  groups = max(m[0] * m[1] for m in meshes)
  mib = lambda b: b / 2 ** 20
  print(f"tiny {args.router} E={args.experts}: d_model {config.model.d_model}, "
        f"{config.model.num_layers} layers, batch {args.batch} x {config.data.seq_len}, "
        f"{config.model.dtype}; {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"median of {args.steps} steps; XLA:CPU malloc settings {cpu_malloc.status()}")
  header = (f"{'mesh (d,e,m)':<13}{'zero1':>6}{'groups':>7}{'step ms':>9}{'compile s':>10}"
            f"{'a2a':>5}{'params MiB':>11}{'opt MiB':>9}{'p+opt MiB':>10}{'temp MiB':>9}"
            f"{'loss':>8}")
  print(header)
  print("-" * len(header))
  ratios = {}
  runs = [((1, 1, 1), False, groups)] + [(m, z, 1) for m in meshes for z in (False, True)]
  for mesh, zero1, g in runs:
    r = measure(config, mesh, zero1, args.steps, num_groups=g)
    print(f"{str(mesh):<13}{'on' if zero1 else 'off':>6}{r['groups']:>7}"
          f"{1e3 * r['step_s']:>9.1f}{r['compile_s']:>10.1f}{r['all_to_all']:>5}"
          f"{mib(r['params']):>11.3f}{mib(r['opt']):>9.3f}{mib(r['params'] + r['opt']):>10.3f}"
          f"{mib(r['temp']):>9.3f}{r['loss']:>8.4f}", flush=True)
    ratios.setdefault(mesh, {})[zero1] = r["opt"]
  print(" ".join(f"zero1_opt_ratio_{'x'.join(map(str, m))}={v[True] / v[False]:.3f}"
                 for m, v in ratios.items() if True in v and False in v))


if __name__ == "__main__":
  main()
