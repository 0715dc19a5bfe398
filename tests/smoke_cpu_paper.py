"""configs/sweeps/cpu_paper.py shrunk to a smoke run of the whole chain (sweep -> results.csv
-> routing_lm.findings): sizes s and m, E in {4, 16}, all three routers, seeds 0 and 1, 4
steps per run (28 runs, mostly compiling: 10-15 min on 2 busy cores). Two E > 1 and two
sizes are the least that lets findings fit the routed law per router.

    python -m routing_lm.sweep --sweep=tests/smoke_cpu_paper.py --workdir=/tmp/smoke_cpu_paper
    python -m routing_lm.findings --results=/tmp/smoke_cpu_paper/results.csv \\
        --out=/tmp/smoke_cpu_paper/findings --n_bootstrap=50
"""
from routing_lm import config as config_lib

cpu_paper = config_lib.load_module("configs/sweeps/cpu_paper.py")


def get_sweep() -> dict:
  return cpu_paper.make_sweep(steps=4, name="smoke_cpu_paper", sizes=("s", "m"),
                              experts=(4, 16), seeds=(0, 1))
