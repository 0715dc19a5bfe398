"""The configuration error every layer raises, and the one helper that builds its message.

A leaf module (no imports from the package), so routers, the model, the data pipeline and
the config validation can all name a bad field the same way.
"""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """A config field has a value that cannot run. The message says which and how to fix it."""


def fail(field: str, value: Any, allowed: str) -> None:
  """Raises ConfigError: `config.<field>=<value> is invalid: <allowed>.`"""
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}.")


def require(cond: bool, field: str, value: Any, allowed: str) -> None:
  """`fail(field, value, allowed)` unless `cond`."""
  if not cond:
    fail(field, value, allowed)
