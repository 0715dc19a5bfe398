"""Routers by name. Adding a router: write `routers/<name>.py` with a `base.Router`
subclass and add one line to REGISTRY."""
from routing_lm.routers.base import Router, Routing
from routing_lm.routers.hash import HashRouter
from routing_lm.routers.rlr import RLRRouter, reinforce_surrogate
from routing_lm.routers.sbase import SBaseRouter, sinkhorn
from routing_lm.routers.topk import TopKRouter
from routing_lm.routers.uniform import UniformRouter

REGISTRY: dict[str, type[Router]] = {
    "sbase": SBaseRouter,
    "hash": HashRouter,
    "rlr": RLRRouter,
    "topk": TopKRouter,
    "uniform": UniformRouter,
}


def get(name: str) -> type[Router]:
  if name not in REGISTRY:
    raise ValueError(f"config.model.routing.router={name!r} is unknown: one of {sorted(REGISTRY)}.")
  return REGISTRY[name]
