"""Every config the validation accepts trains, for `tests/test_every_config.py`.

    python tests/every_config_checks.py --mesh expert --out results.json

Runs in its own process with 2 simulated CPU devices (set before importing jax). For
each point (every router x the rows of `L4` over remat, granularity, capacity) on the
given mesh (`one`: 1 device;
`expert`: mesh (1, 2, 1), experts split over 2 devices), at tiny shapes: the config is
either refused by validation (`config.validate`, `parallel.validate_mesh`) with a
ConfigError, or it trains 2 steps (the real jitted train step on a synthetic batch)
and evaluates once (dropless evaluation: once per point with a training capacity). One JSON record per point: {"point", "outcome": "refused" | "trained"
| "crashed", "error", "losses", "val"}.
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2"
                           + " --xla_backend_optimization_level=0"
                           + " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from routing_lm import parallel, routers, train  # noqa: E402
from routing_lm.bench.harness import synthetic_batch  # noqa: E402
from routing_lm.config import ConfigError, load  # noqa: E402

MESHES = {"one": (1, 1, 1), "expert": (1, 2, 1)}
REMAT = ("none", "full")
GRANULARITY = (1, 2)
CAPACITY = (2.0, None)            # None: dropless (ragged_dot)
TINY = {"model.vocab_size": 64, "model.d_model": 16, "model.num_layers": 1,
        "model.routing.routing_frequency": 1.0,                  # one block, routed
        "model.num_heads": 2, "model.d_ff": 32, "model.routing.num_experts": 4,
        "model.routing.top_k": 1, "data.seq_len": 8, "data.batch_size": 4,
        "train.warmup_steps": 0, "train.learning_rate": 1e-2}


# The 2-level orthogonal array L4 over (remat, granularity, capacity): in its 4 rows every
# pair of values of any two of the three appears once. With every router, each router
# meets every remat x granularity, remat x capacity and granularity x capacity pair (all
# the 3-way interactions with the router) in half the full product's 8 points per router;
# only the 4-way ones are left out.
L4 = ((0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0))


def points() -> list[dict]:
  return [dict(router=r, remat=REMAT[a], granularity=GRANULARITY[b],
               capacity_factor=CAPACITY[c])
          for r in sorted(routers.REGISTRY) for a, b, c in L4]


def run_point(point: dict, mesh_shape: tuple[int, int, int]) -> dict:
  overrides = {**TINY, "model.routing.router": point["router"],
               "model.remat": point["remat"],
               "model.routing.granularity": point["granularity"],
               "model.routing.capacity_factor": point["capacity_factor"]}
  overrides.update(zip(("mesh.data", "mesh.expert", "mesh.model"), mesh_shape))
  try:
    config = load("configs/tiny.py", overrides)
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:int(np.prod(mesh_shape))])
    s = train.setup(config, mesh)                 # validate + validate_mesh
  except ConfigError as e:
    return {"outcome": "refused", "error": str(e)}
  host = synthetic_batch(4, 8, 64)
  step, eval_step = train.make_train_step(s), train.make_eval_step(s)   # jit: lazy
  state = train.init_state(s)
  losses = []
  with jax.set_mesh(s.mesh):
    for _ in range(2):
      state, metrics = step(state, train.to_global(s, host))
      losses.append(float(metrics["loss"]))
  # Evaluation keeps every token (dropless) whatever the training capacity: one check
  # per (router, remat, granularity) suffices.
  val = (train.evaluate(s, eval_step, state, [host])["val_loss"]
         if point["capacity_factor"] is not None else float("nan"))
  return {"outcome": "trained", "losses": losses, "val": val,
          "steps": int(state["step"])}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mesh", choices=sorted(MESHES), required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  records = []
  for point in points():
    try:
      record = run_point(point, MESHES[args.mesh])
    except Exception:  # noqa: BLE001 - every crash is a finding; the test names it
      record = {"outcome": "crashed", "error": traceback.format_exc()}
    records.append({"point": point, **record})
    print(json.dumps(records[-1]), flush=True)
  with open(args.out, "w") as f:
    json.dump(records, f, indent=1)


if __name__ == "__main__":
  main()
