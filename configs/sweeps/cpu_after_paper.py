"""The routers that came after the paper beside the paper's, in the same grid: cpu_paper's
60 points plus `lossfree` and `expert_choice` at both sizes, E = 16, the same 3 seeds
(12 more runs, about 20 minutes on 2 cores). One E per size gives findings 1 and 3 and the
size trend of finding 2, not a fit of the routed law (that needs two E > 1: add 4 to
EXPERTS, 12 more runs). Run it in cpu_paper's workdir: the paper's
points are skipped as finished, and results.csv then holds every router.

    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_after_paper.py \\
        --workdir=results/cpu_paper
    python -m routing_lm.findings --results=results/cpu_paper/results.csv \\
        --out=results/cpu_paper/findings

Compute. With K = 1 and capacity factor 2, the token-choice routers send one expert per
token and keep room for twice the mean load. Expert choice fills every expert to its
capacity C = capacity_factor x T x K / E, so capacity factor 2 would give each token two
experts on average: twice the routed FFW compute of the others. Its points use capacity
factor 1, the same mean compute per token (K = 1) as the other routers (Zhou et al.'s
"EC-CF1"). At evaluation it routes each token to its top K experts (routers/expert_choice.py).
"""
from routing_lm.config import load_module

cpu_paper = load_module("configs/sweeps/cpu_paper.py")

ROUTERS = ("lossfree", "expert_choice")
EXPERTS = (16,)
ROUTER_OVERRIDES = {"expert_choice": {"model.routing.capacity_factor": 1.0}}


def get_sweep() -> dict:
  sweep = cpu_paper.make_sweep(name="cpu_after_paper")
  sweep["points"] += cpu_paper.points(experts=EXPERTS, routers=ROUTERS, dense=False,
                                      router_overrides=ROUTER_OVERRIDES)
  return sweep
