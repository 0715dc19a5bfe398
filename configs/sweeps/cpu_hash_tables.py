"""Which HASH table to make the default: `balanced` (token ids dealt evenly) against
`frequency` (Roller et al.'s balanced hashing: training tokens dealt evenly), at cpu_paper's
size s, E = 64 (where frequent tokens overflow an expert most), 3 seeds paired by seed:
6 runs, about 8 minutes on 2 cores. Results: docs/sweeps.md.

    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_hash_tables.py \\
        --workdir=results/cpu_hash_tables
    python -m routing_lm.ablation --results=results/cpu_hash_tables/results.csv \\
        --baseline=balanced

The `balanced` points equal cpu_paper's `seed<k>_s_hash_e64`. The metric that moves is
the share of tokens dropped at capacity factor 2 (`router/block1/dropped` in each run's
metrics.jsonl) and, through it, the loss.
"""
from routing_lm.config import load_module

cpu_paper = load_module("configs/sweeps/cpu_paper.py")

SIZE, EXPERTS = "s", 64
METHODS = ("balanced", "frequency")


def get_sweep() -> dict:
  sweep = cpu_paper.make_sweep(name="cpu_hash_tables")
  base = cpu_paper.points(sizes=(SIZE,), experts=(EXPERTS,), routers=("hash",), dense=False)
  sweep["points"] = [
      {"name": f"seed{p['overrides']['train.seed']}_{method}",
       "overrides": {**p["overrides"], "model.routing.hash.method": method}}
      for p in base for method in METHODS]
  return sweep
