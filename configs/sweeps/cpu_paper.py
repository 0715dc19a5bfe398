"""The paper's three findings at CPU scale, with seeds: 3 sizes x E in {1, 4, 16, 64} x
routers {sbase, hash, rlr} x 3 seeds (the dense E = 1 once per size and seed): 90 runs.

    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_paper.py --workdir=results/cpu_paper
    python -m routing_lm.findings --results=results/cpu_paper/results.csv \\
        --out=results/cpu_paper/findings

Parts. The sweep skips finished points and resumes unfinished ones, so it can run in parts
with `--only=<substring>` and the same --workdir (results.csv always collects every finished
point). Point names are `seed<k>_<size>_<router>_e<E>` and `seed<k>_<size>_dense`:
  --only=seed0_        one seed: 30 runs, about 27 min on 2 idle cores (s 5 min, m 8, l 14)
  --only=seed1_        the second seed (findings gives intervals from here on)
  --only=seed2_        the third seed
  --only=seed0_l_      one size of one seed (10 runs); `_s_` and `_m_` likewise
  --only=_e64_         every E = 64 point (the slowest)
The trailing '_' keeps `seed1_` from matching a future `seed10_`. More seeds: raise SEEDS
(new points get new names; finished ones are kept).

Seeds. Seed k sets both `train.seed` (initialisation, and dropout and RL-R sampling keys)
and `data.seed` (the order of the training batches), so the spread over seeds covers both
sources of run-to-run noise, and the routed and dense runs of seed k see the same batches
in the same order: `routing_lm.findings` pairs them by seed. Validation batches do not
depend on data.seed (routing_lm/data/pipeline.py), so every run is scored on the same
tokens.

Setup as cpu_mini (docs/sweeps.md): `stdlib_text`, a 2,048-token vocabulary, 16 sequences of
64 tokens per step, R = 0.5, K = 1, capacity factor 2 in training, AdamW 3e-3, 30 warmup
steps, cosine to 10%; validation over 16 batches. Two blocks, the second routed; widths
64 / 96 / 128 (d_ff = 4 d); N = 24 d^2:
  s  d_model  64:  N =  98,304
  m  d_model  96:  N = 221,184
  l  d_model 128:  N = 393,216
The difference from cpu_mini: 600 steps (614,400 tokens) instead of 200, which cpu_mini
showed to be too few for the learned routers to leave uniform (router entropy at E = 16
still 2.65 of 2.77), E up to 64, and 3 seeds per cell.

Time, estimated (not yet run at this size) from cpu_mini's measured runs on 2 idle cores:
about 10-15 s per run for compiling and evaluation, plus about 35 / 60 / 115 ms per step
at d = 64 / 96 / 128 (cpu_mini: 17-33 s per 200-step run; cpu_granularity at d = 128:
30 s at 200 steps, 71 s at 600). Per seed: s 10 x ~30 s, m 10 x ~50 s, l 10 x ~80 s, about
27 min, so 3 seeds take about 80-90 min. E = 64 adds up to ~20% on its points
(docs/benchmarks.md). A machine under load takes up to twice as long: run it in parts.
"""

from routing_lm.config import load_module

cpu_mini = load_module("configs/sweeps/cpu_mini.py")   # the same shapes and setup

SIZES, ROUTERS, BATCH, SEQ = cpu_mini.SIZES, cpu_mini.ROUTERS, cpu_mini.BATCH, cpu_mini.SEQ
_shape = cpu_mini._shape
EXPERTS = (4, 16, 64)
SEEDS = (0, 1, 2)
STEPS = 600


def points(sizes=tuple(SIZES), experts=EXPERTS, routers=ROUTERS, seeds=SEEDS) -> list[dict]:
  """The grid's points, seed-major (so `--only=seed0_` runs one whole replicate first)."""
  out = []
  for seed in seeds:
    seeded = {"train.seed": seed, "data.seed": seed}
    for size in sizes:
      out.append({"name": f"seed{seed}_{size}_dense",
                  "overrides": {**_shape(size), **seeded, "model.routing.num_experts": 1}})
      for router in routers:
        for e in experts:
          out.append({"name": f"seed{seed}_{size}_{router}_e{e}",
                      "overrides": {**_shape(size), **seeded, "model.routing.router": router,
                                    "model.routing.num_experts": e}})
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
