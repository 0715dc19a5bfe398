"""The paper's three findings at CPU scale, with seeds: 2 sizes x E in {1, 4, 16, 64} x
routers {sbase, hash, rlr} x 3 seeds (the dense E = 1 once per size and seed): 60 runs,
about 80 minutes on 2 cores (measured: docs/sweeps.md).

    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_paper.py --workdir=results/cpu_paper
    python -m routing_lm.findings --results=results/cpu_paper/results.csv \\
        --out=results/cpu_paper/findings

Parts. The sweep skips finished points and resumes unfinished ones, so it can run in parts
with `--only=<substring>` and the same --workdir (results.csv always collects every finished
point). Point names are `seed<k>_<size>_<router>_e<E>` and `seed<k>_<size>_dense`:
  --only=seed0_        one seed: 20 runs (s about 10 min, m about 16)
  --only=seed1_        the second seed (findings gives intervals from here on)
  --only=seed0_m_      one size of one seed (10 runs)
  --only=_e64_         every E = 64 point (the slowest)
The trailing '_' keeps `seed1_` from matching a future `seed10_`. More seeds: raise SEEDS
(new points get new names; finished ones are kept). A third size (cpu_mini's `l`, d = 128,
about 25 min a seed): `make_sweep(sizes=("s", "m", "l"))` in a sweep file of your own, run
with the same --workdir, adds only the new points. configs/sweeps/cpu_after_paper.py adds
the routers that came after the paper the same way.

Seeds. Seed k sets both `train.seed` (initialisation, and dropout and RL-R sampling keys)
and `data.seed` (the order of the training batches), so the spread over seeds covers both
sources of run-to-run noise, and the routed and dense runs of seed k see the same batches
in the same order: `routing_lm.findings` pairs them by seed. Validation batches do not
depend on data.seed (routing_lm/data/pipeline.py), so every run is scored on the same
tokens.

Setup as cpu_mini (docs/sweeps.md): `stdlib_text`, a 2,048-token vocabulary, 16 sequences of
64 tokens per step, R = 0.5, K = 1, capacity factor 2 in training, AdamW 3e-3, 30 warmup
steps, cosine to 10%; validation over 16 batches. Two blocks, the second routed; widths
64 / 96 (d_ff = 4 d); N = 24 d^2:
  s  d_model  64:  N =  98,304
  m  d_model  96:  N = 221,184
The difference from cpu_mini: 600 steps (614,400 tokens) instead of 200, which cpu_mini
showed to be too few for the learned routers to leave uniform (router entropy at E = 16
still 2.65 of 2.77), E up to 64, and 3 seeds per cell. 614,400 tokens are less than one
pass over the training split, so `train_loss_smoothed` (the mean training loss of the last
10% of logged steps, each on batches the model has not seen) is a second, in-distribution
held-out loss beside `val_loss` (held-out files: a shifted distribution).
"""

from routing_lm.config import load_module

cpu_mini = load_module("configs/sweeps/cpu_mini.py")   # the same shapes and setup

ROUTERS, BATCH, SEQ = cpu_mini.ROUTERS, cpu_mini.BATCH, cpu_mini.SEQ
_shape = cpu_mini._shape
SIZES = ("s", "m")
EXPERTS = (4, 16, 64)
SEEDS = (0, 1, 2)
STEPS = 600


def points(sizes=SIZES, experts=EXPERTS, routers=ROUTERS, seeds=SEEDS, dense=True,
           router_overrides: dict | None = None) -> list[dict]:
  """The grid's points, seed-major (so `--only=seed0_` runs one whole replicate first).
  router_overrides: {router: {field: value}} added to that router's points."""
  out = []
  for seed in seeds:
    seeded = {"train.seed": seed, "data.seed": seed}
    for size in sizes:
      if dense:
        out.append({"name": f"seed{seed}_{size}_dense",
                    "overrides": {**_shape(size), **seeded, "model.routing.num_experts": 1}})
      for router in routers:
        for e in experts:
          out.append({"name": f"seed{seed}_{size}_{router}_e{e}",
                      "overrides": {**_shape(size), **seeded, "model.routing.router": router,
                                    "model.routing.num_experts": e,
                                    **(router_overrides or {}).get(router, {})}})
  return out


def make_sweep(steps: int = STEPS, name: str = "cpu_paper", **grid) -> dict:
  """The sweep dict with `steps` optimiser steps per run; `grid` narrows `points()`."""
  return {
      "name": name,
      "config": "configs/tiny.py",
      "overrides": {**cpu_mini.OVERRIDES,
                    "train.warmup_steps": min(30, max(1, steps // 10)),
                    "train.checkpoint_every": 200},
      "tokens": BATCH * SEQ * steps,
      "points": points(**grid),
  }


def get_sweep() -> dict:
  return make_sweep()
