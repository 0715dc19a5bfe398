"""What makes S-BASE learn at CPU scale: one knob at a time against the default, at
cpu_paper's size s, E = 16, 3 seeds (seed k: same init and batch order as cpu_paper's
seed k, so `routing_lm.ablation` pairs every variant with the default by seed). 15 runs,
about 20 minutes on 2 cores (the default points equal cpu_paper's `seed<k>_s_sbase_e16`;
copying those folders in skips them). Results: docs/sweeps.md.

    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_router_knobs.py \\
        --workdir=results/cpu_router_knobs
    python -m routing_lm.ablation --results=results/cpu_router_knobs/results.csv \\
        --baseline=default

The knobs (defaults in configs/base.py and routers/sbase.py):
  temperature      model.routing.sbase.temperature: 0.1 -> 1.0 (Sinkhorn on softer scores,
                   closer to a converged transport plan in 30 iterations)
  iters            model.routing.sbase.sinkhorn_iters: 30 -> 100
  router_lr        train.router_lr_scale: 1 -> 3 (the router projection learns 3x faster)
  router_init      model.routing.router_init_scale: 0.1 -> 1.0 (a 3.2x wider initial spread)
Point names are `seed<k>_<variant>`.
"""
from routing_lm.config import load_module

cpu_paper = load_module("configs/sweeps/cpu_paper.py")

SIZE, EXPERTS = "s", 16
VARIANTS = {
    "default": {},
    "temperature": {"model.routing.sbase.temperature": 1.0},
    "iters": {"model.routing.sbase.sinkhorn_iters": 100},
    "router_lr": {"train.router_lr_scale": 3.0},
    "router_init": {"model.routing.router_init_scale": 1.0},
}


def get_sweep() -> dict:
  sweep = cpu_paper.make_sweep(name="cpu_router_knobs")
  base = cpu_paper.points(sizes=(SIZE,), experts=(EXPERTS,), routers=("sbase",), dense=False)
  sweep["points"] = [
      {"name": f"seed{p['overrides']['train.seed']}_{variant}",
       "overrides": {**p["overrides"], **changes}}
      for p in base for variant, changes in VARIANTS.items()]
  return sweep
