"""Routers by name.

Every module of this package is imported here, and every `base.Router` subclass that sets
`name` registers itself in `REGISTRY`: adding a router is adding one file.
"""
import importlib
import pkgutil

from routing_lm.routers.base import (REGISTRY, Router, RouterSpec, Routing,
                                     reinforce_surrogate)

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")


def get(name: str) -> type[Router]:
  if name not in REGISTRY:
    raise ValueError(f"config.model.routing.router={name!r} is unknown: one of {sorted(REGISTRY)}.")
  return REGISTRY[name]


__all__ = ["REGISTRY", "Router", "RouterSpec", "Routing", "get", "reinforce_surrogate"]
