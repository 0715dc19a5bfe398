"""Config validation: every error names the field, the value and what is allowed.

`validate(config)` runs when a run starts (train, eval, sweep points, benchmarks), before
any array is allocated. It checks types, ranges and the model's internal divisibility;
`validate_mesh` (in `parallel.py`) checks the config against the devices.
"""
from __future__ import annotations

from typing import Any

import ml_collections

KNOWN_TASKS = ("stdlib_text", "text_files", "c4")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config field has a value that cannot run. The message says which and how to fix it."""


def fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}.")


def _require(cond: bool, field: str, value: Any, allowed: str) -> None:
  if not cond:
    fail(field, value, allowed)


def _positive_int(c: ml_collections.ConfigDict, path: str) -> None:
  value = _get(c, path)
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, path,
           value, "it must be an integer >= 1")


def _get(c: ml_collections.ConfigDict, path: str) -> Any:
  node = c
  for part in path.split("."):
    if part not in node:
      fail(path, None, "the field is missing; start from configs/base.py, which defines it")
    node = node[part]
  return node


def validate_model(c: ml_collections.ConfigDict) -> None:
  """Checks `config.model` (and its `routing` sub-dict)."""
  from routing_lm import routers  # local import: routers import nothing from config

  for f in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
    _positive_int(c, f"model.{f}")
  m = c.model
  hd = m.get("head_dim")
  if hd is None:
    _require(m.d_model % m.num_heads == 0, "model.num_heads", m.num_heads,
             f"d_model={m.d_model} must be divisible by num_heads; pick a divisor of "
             f"{m.d_model}, or set model.head_dim")
    hd = m.d_model // m.num_heads
  _require(isinstance(hd, int) and hd >= 2 and hd % 2 == 0, "model.head_dim", hd,
           "the head size must be an even integer >= 2 (rotary positions rotate pairs)")
  _require(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
  _require(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"one of {DTYPES}")

  r = m.routing
  _require(r.router in routers.REGISTRY, "model.routing.router", r.router,
           f"one of {sorted(routers.REGISTRY)}")
  for f in ("num_experts", "top_k", "granularity", "num_groups"):
    _positive_int(c, f"model.routing.{f}")
  _require(r.top_k <= r.num_experts, "model.routing.top_k", r.top_k,
           f"top_k must be <= num_experts={r.num_experts}")
  rf = r.routing_frequency
  _require(isinstance(rf, (int, float)) and 0 < rf <= 1, "model.routing.routing_frequency", rf,
           "a fraction in (0, 1]: 0.5 routes every other block, 1.0 every block")
  for f in ("capacity_factor", "eval_capacity_factor"):
    cf = r[f]
    _require(cf is None or cf > 0, f"model.routing.{f}", cf,
             "a number > 0 (2.0 is the paper's), or None for dropless routing")
  _require(m.d_ff % r.granularity == 0, "model.routing.granularity", r.granularity,
           f"d_ff={m.d_ff} must be divisible by granularity; pick a divisor of {m.d_ff}")
  if r.num_experts > 1:
    router_cls = routers.REGISTRY[r.router]
    k = r.top_k * r.granularity
    _require(k <= router_cls.max_top_k, "model.routing.top_k", r.top_k,
             f"router '{r.router}' routes at most {router_cls.max_top_k} expert(s) per token "
             f"(top_k * granularity = {k}); use sbase, hash or topk for more")
    _require(r.sbase.scope in ("group", "global"), "model.routing.sbase.scope", r.sbase.scope,
             "'group' (Sinkhorn over each token group) or 'global' (over all tokens)")
    _require(r.hash.method in ("random", "balanced"), "model.routing.hash.method",
             r.hash.method, "'random' or 'balanced'")


ATTENTION = ("auto", "xla", "splash")
SPLASH_BLOCK = 128   # the splash kernel's smallest q/kv block (the TPU lane width)


def validate_memory(c: ml_collections.ConfigDict) -> None:
  """Checks the memory levers: `model.attention`, `train.loss_chunk_tokens`,
  `train.microbatches` (the device split of each microbatch is checked in
  `train.prepare_config`, which knows the mesh)."""
  a, seq = _get(c, "model.attention"), c.data.seq_len
  _require(a in ATTENTION, "model.attention", a, f"one of {ATTENTION}")
  _require(a != "splash" or seq % SPLASH_BLOCK == 0, "model.attention", a,
           f"splash attention tiles the sequence in blocks of {SPLASH_BLOCK}, and "
           f"data.seq_len={seq} is not a multiple of it; use 'auto' or 'xla', or a multiple "
           f"of {SPLASH_BLOCK}")
  _positive_int(c, "train.microbatches")
  m, batch = c.train.microbatches, c.data.batch_size
  _require(batch % m == 0, "train.microbatches", m,
           f"it must divide data.batch_size={batch}")
  chunk = _get(c, "train.loss_chunk_tokens")
  _require(isinstance(chunk, int) and not isinstance(chunk, bool)
           and (chunk == 0 or chunk >= batch), "train.loss_chunk_tokens", chunk,
           f"0 (the whole batch at once) or at least data.batch_size={batch} (a chunk holds "
           "whole-batch slices of loss_chunk_tokens // rows positions)")


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks the whole config tree. Raises ConfigError naming the first bad field."""
  validate_model(c)
  d, t = c.data, c.train
  _require(d.task in KNOWN_TASKS, "data.task", d.task, f"one of {KNOWN_TASKS}")
  for f in ("seq_len", "batch_size"):
    _positive_int(c, f"data.{f}")
  for f in ("num_steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
            "log_every"):
    _positive_int(c, f"train.{f}")
  _require(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "a number > 0")
  _require(0 <= t.end_lr_ratio <= 1, "train.end_lr_ratio", t.end_lr_ratio, "a fraction in [0, 1]")
  _require(isinstance(t.warmup_steps, int) and t.warmup_steps >= 0, "train.warmup_steps",
           t.warmup_steps, "an integer >= 0 (runs shorter than it warm up for all their steps)")
  _require(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "a number > 0")
  tokens = d.batch_size * d.seq_len
  _require(tokens % c.model.routing.num_groups == 0, "model.routing.num_groups",
           c.model.routing.num_groups,
           f"it must divide the tokens per batch ({d.batch_size} x {d.seq_len} = {tokens})")
  validate_memory(c)
