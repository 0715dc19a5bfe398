"""Config files: the one loader, the argument helper they share, and validation.

    config = load("configs/paper.py:130m,sbase,64", {"train.num_steps": 1000})

`load` reads a config file's `get_config(arg)` and applies flattened overrides; main,
sweep, demo, the benchmarks and the notebooks all load configs this way. A path is taken
as given (absolute, or relative to the working directory); a `configs/...` path that is
not there is read from the configs shipped with the package (the repo's top-level
`configs/` folder, installed as `routing_lm.configs`), so a pip-installed package names
them the same way. Config files reach their shared pieces the same way:
`load_module("configs/base.py")`. Nothing edits the import path.

`validate(config)` runs when a run starts (train, eval, sweep points, benchmarks), before
any array is allocated. It checks types, ranges and the model's internal divisibility;
each router checks its own section (`routers.base.Router.check_config`); `validate_mesh`
(in `parallel.py`) checks the config against the devices. Every error names the field,
the value and what is allowed.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import importlib.util
import os
import pathlib
import sys
import types
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from routing_lm.errors import ConfigError, fail, require
from routing_lm.expert_dims import expert_dims

__all__ = ["ConfigError", "apply_overrides", "check_field", "load", "load_module", "parse_arg", "resolve",
           "shipped_dir", "split_spec", "validate", "validate_model"]

KNOWN_TASKS = ("stdlib_text", "text_files", "c4")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
CONFIGS = "configs"   # the shipped folder's name, as users write it: configs/tiny.py


# ---------------------------------------------------------------- loading
def shipped_dir() -> pathlib.Path:
  """The configs shipped with the package (in a checkout: the repo's `configs/`)."""
  return pathlib.Path(str(importlib.resources.files("routing_lm.configs")))


def resolve(path: str) -> pathlib.Path:
  """A config or sweep file: `path` as given if it exists, else the shipped copy of a
  `configs/...` path. Raises ConfigError saying where it looked."""
  given = pathlib.Path(os.path.expanduser(path))
  if given.is_file():
    return given.resolve()
  looked = [str(given.absolute())]
  if not given.is_absolute() and given.parts[:1] == (CONFIGS,):
    shipped = shipped_dir().joinpath(*given.parts[1:])
    if shipped.is_file():
      return shipped
    looked.append(str(shipped))
  raise ConfigError(f"config file {path!r} does not exist (looked at {' and '.join(looked)}); "
                    f"give a path to a .py file, e.g. configs/tiny.py.")


def load_module(path: str) -> types.ModuleType:
  """Imports a config or sweep file by path (`resolve`), afresh on every call: the file as
  it is now, even if it changed since an earlier call in this process (notebooks)."""
  file = resolve(path)
  name = "routing_lm_config_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module      # for code in the file that looks itself up (dataclasses)
  spec.loader.exec_module(module)
  return module


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/paper.py:130m,sbase,64' -> ('configs/paper.py', '130m,sbase,64')."""
  path, sep, arg = spec.partition(".py:")
  return (path + ".py", arg) if sep else (spec, None)


def load(spec: str, overrides: Mapping[str, Any] | None = None, *,
         lock: bool = True) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the file in `spec` (`file.py[:arg]`), then `overrides`.

  The result is locked (a misspelt field is an error, not a new field), like
  `--config` on the command line.
  """
  path, arg = split_spec(spec)
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config().")
  config = module.get_config() if arg is None else module.get_config(arg)
  if lock:
    config.lock()
  apply_overrides(config, overrides or {}, f"--config={spec}")
  return config


def check_field(config: ml_collections.ConfigDict, key: str, where: str) -> Any:
  """The ConfigDict holding the flattened field `key`; a ConfigError (with the closest
  name) if the field does not exist."""
  node, parts = config, key.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      parent = ".".join(parts[:depth]) or "<root>"
      fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, fields, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"{where}: config.{key} does not exist: config.{parent} has no "
                        f"field {part!r}.{hint} Fields there: {', '.join(fields)}.")
    if depth < len(parts) - 1:
      node = node[part]
  return node


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str) -> None:
  """Flattened overrides, type-checked; a missing field or a bad type is a ConfigError."""
  for key, value in overrides.items():
    node, parts = check_field(config, key, where), key.split(".")
    try:
      config.update_from_flattened_dict({key: value})
    except (TypeError, ValueError) as e:
      current = node[parts[-1]]
      raise ConfigError(f"{where}: config.{key}={value!r} has the wrong type: the field "
                        f"holds {type(current).__name__} ({current!r}).") from e


def parse_arg(text: str, *, where: str, usage: str,
              positional: Sequence[tuple[str, Callable[[str], Any], str]],
              options: Mapping[str, tuple[Callable[[str], Any], str]] = {}) -> dict[str, Any]:
  """A config file's argument: `a,b,c,key=value,...` -> {name: typed value}.

  Positional items come first, in the order of `positional` ((name, parse, meaning);
  fewer may be given); `key=value` options follow, each key from `options` ({key: (parse,
  meaning)}) at most once. `parse` turns the text into the value and raises ValueError
  when it cannot. Only what is given is returned. `where` names the file and `usage` the
  expected form, for the errors.
  """
  parts = [p.strip() for p in text.strip().split(",")]
  if any(not p for p in parts):
    raise ConfigError(f"{where}:{text!r} has an empty item; {usage}.")
  given = [p for p in parts if "=" not in p]
  if parts[:len(given)] != given:
    raise ConfigError(f"{where}:{text!r}: {', '.join(p[0] for p in positional)} come first, "
                      f"then key=value options; {usage}.")
  if len(given) > len(positional):
    raise ConfigError(f"{where}:{text!r} has {len(given)} positional items (at most "
                      f"{len(positional)}: {', '.join(p[0] for p in positional)}); {usage}.")
  out: dict[str, Any] = {}
  items = [(name, kind, value, meaning)
           for (name, kind, meaning), value in zip(positional, given)]
  for item in parts[len(given):]:
    key, _, value = item.partition("=")
    key = key.strip().lower()
    if key not in options:
      raise ConfigError(f"{where}: unknown option {key!r} in {text!r}; allowed options: "
                        + ", ".join(f"{k}= ({meaning})" for k, (_, meaning) in options.items())
                        + ".")
    if key in out or any(i[0] == key for i in items):
      raise ConfigError(f"{where}: option {key!r} is given twice in {text!r}.")
    items.append((key, options[key][0], value.strip(), options[key][1]))
    out[key] = None
  for name, kind, value, meaning in items:
    try:
      out[name] = kind(value)
    except ValueError:
      raise ConfigError(f"{where}: {name}={value!r} is invalid: expected {meaning}; "
                        f"{usage}.") from None
  return out


# ---------------------------------------------------------------- validation
def _positive_int(c: ml_collections.ConfigDict, path: str) -> None:
  value = _get(c, path)
  require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, path,
          value, "it must be an integer >= 1")


def _get(c: ml_collections.ConfigDict, path: str) -> Any:
  node = c
  for part in path.split("."):
    if part not in node:
      fail(path, None, "the field is missing; start from configs/base.py, which defines it")
    node = node[part]
  return node


def validate_model(c: ml_collections.ConfigDict) -> None:
  """Checks `config.model` (and its `routing` sub-dict, with the router's own check)."""
  from routing_lm import routers   # routers import nothing from here

  for f in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
    _positive_int(c, f"model.{f}")
  m = c.model
  hd = m.get("head_dim")
  if hd is None:
    require(m.d_model % m.num_heads == 0, "model.num_heads", m.num_heads,
            f"d_model={m.d_model} must be divisible by num_heads; pick a divisor of "
            f"{m.d_model}, or set model.head_dim")
    hd = m.d_model // m.num_heads
  require(isinstance(hd, int) and hd >= 2 and hd % 2 == 0, "model.head_dim", hd,
          "the head size must be an even integer >= 2 (rotary positions rotate pairs)")
  require(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
  require(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"one of {DTYPES}")
  require(m.remat in REMAT, "model.remat", m.remat,
          f"one of {REMAT}: what the backward pass keeps of each block ('none': every "
          "activation; 'full': only the block's input; 'dots': matmul outputs)")

  r = m.routing
  require(r.router in routers.REGISTRY, "model.routing.router", r.router,
          f"one of {sorted(routers.REGISTRY)}")
  for f in ("num_experts", "top_k", "granularity", "num_groups"):
    _positive_int(c, f"model.routing.{f}")
  require(r.top_k <= r.num_experts, "model.routing.top_k", r.top_k,
          f"top_k must be <= num_experts={r.num_experts}")
  se = r.get("shared_experts", 0)
  require(isinstance(se, int) and not isinstance(se, bool) and se >= 0,
          "model.routing.shared_experts", se,
          "an integer >= 0: always-on experts of width d_ff/granularity in every routed layer "
          "(0 = none)")
  rf = r.routing_frequency
  require(isinstance(rf, (int, float)) and 0 < rf <= 1, "model.routing.routing_frequency", rf,
          "a fraction in (0, 1]: 0.5 routes every other block, 1.0 every block")
  for f in ("capacity_factor", "eval_capacity_factor"):
    cf = r[f]
    require(cf is None or cf > 0, f"model.routing.{f}", cf,
            "a number > 0 (2.0 is the paper's), or None for dropless routing")
  require(r.get("grouped_matmul", "auto") in GROUPED_MATMULS, "model.routing.grouped_matmul",
          r.get("grouped_matmul"), f"one of {GROUPED_MATMULS} (the dropless path's kernel)")
  require(isinstance(r.router_init_scale, (int, float)) and r.router_init_scale > 0,
          "model.routing.router_init_scale", r.router_init_scale,
          "a number > 0 (the variance scale of the router projection; 0.1 is Switch's)")
  try:
    expert_dims(r.num_experts, r.top_k, r.granularity, m.d_ff)
  except ValueError as e:
    fail("model.routing.granularity", r.granularity, str(e).rstrip("."))
  if r.num_experts > 1:
    routers.get(r.router).check_config(routers.RouterSpec.from_model_config(m))


ATTENTION = ("auto", "xla", "splash")
GROUPED_MATMULS = ("auto", "ragged_dot", "gmm")   # routing_lm/model/grouped.py
SPLASH_BLOCK = 128   # the splash kernel's smallest q/kv block (the TPU lane width)


def validate_memory(c: ml_collections.ConfigDict) -> None:
  """Checks the memory levers: `model.attention`, `train.loss_chunk_tokens`,
  `train.microbatches` (the device split of each microbatch is checked in
  `train.prepare_config`, which knows the mesh)."""
  a, seq = _get(c, "model.attention"), c.data.seq_len
  require(a in ATTENTION, "model.attention", a, f"one of {ATTENTION}")
  require(a != "splash" or seq % SPLASH_BLOCK == 0, "model.attention", a,
           f"splash attention tiles the sequence in blocks of {SPLASH_BLOCK}, and "
           f"data.seq_len={seq} is not a multiple of it; use 'auto' or 'xla', or a multiple "
           f"of {SPLASH_BLOCK}")
  _positive_int(c, "train.microbatches")
  m, batch = c.train.microbatches, c.data.batch_size
  require(batch % m == 0, "train.microbatches", m,
           f"it must divide data.batch_size={batch}")
  chunk = _get(c, "train.loss_chunk_tokens")
  require(isinstance(chunk, int) and not isinstance(chunk, bool)
           and (chunk == 0 or chunk >= batch), "train.loss_chunk_tokens", chunk,
           f"0 (the whole batch at once) or at least data.batch_size={batch} (a chunk holds "
           "whole-batch slices of loss_chunk_tokens // rows positions)")


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks the whole config tree. Raises ConfigError naming the first bad field."""
  validate_model(c)
  d, t = c.data, c.train
  require(d.task in KNOWN_TASKS, "data.task", d.task, f"one of {KNOWN_TASKS}")
  for f in ("seq_len", "batch_size"):
    _positive_int(c, f"data.{f}")
  for f in ("num_steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
            "log_every"):
    _positive_int(c, f"train.{f}")
  require(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "a number > 0")
  require(0 <= t.end_lr_ratio <= 1, "train.end_lr_ratio", t.end_lr_ratio, "a fraction in [0, 1]")
  require(isinstance(t.warmup_steps, int) and t.warmup_steps >= 0, "train.warmup_steps",
          t.warmup_steps, "an integer >= 0 (runs shorter than it warm up for all their steps)")
  require(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "a number > 0")
  require(isinstance(t.router_lr_scale, (int, float)) and t.router_lr_scale > 0,
          "train.router_lr_scale", t.router_lr_scale,
          "a number > 0 (1.0: the router projections learn at train.learning_rate)")
  tokens = d.batch_size * d.seq_len
  require(tokens % c.model.routing.num_groups == 0, "model.routing.num_groups",
          c.model.routing.num_groups,
          f"it must divide the tokens per batch ({d.batch_size} x {d.seq_len} = {tokens})")
  validate_memory(c)
