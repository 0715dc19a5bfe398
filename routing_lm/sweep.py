"""Config-driven sweeps: grid points -> runs -> results.csv.

    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_mini.py --workdir=results/cpu_mini
    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_mini.py --workdir=results/cpu_mini \\
        --only=sbase                      # run only the points whose name contains 'sbase'
    python -m routing_lm.sweep --sweep=configs/sweeps/paper.py --workdir=gs://b/sweeps/paper \\
        --print-commands                  # one `python -m routing_lm.main ...` line per point
    python -m routing_lm.sweep --sweep=... --workdir=... --collect   # only write results.csv

A sweep file defines `get_sweep()` returning a dict:

    {"name": "cpu_mini",                       # optional, for logs
     "config": "configs/tiny.py",              # base config file, optionally ":<arg>"
     "overrides": {"data.seq_len": 64},        # flattened overrides for every point
     "tokens": 256_000,                        # token budget: train.num_steps per point
     "points": [{"name": "s_sbase_e8",         # the run's folder: <workdir>/<name>
                 "overrides": {"model.routing.num_experts": 8},
                 "tokens": 512_000,            # optional: this point's own budget
                 "config": "configs/paper.py:15m,sbase,8"},   # optional: its own base
                ...]}

A point's train.num_steps is round(tokens / (batch_size * seq_len)) from its budget (the
point's, else the sweep's); an explicit "train.num_steps" override wins over the sweep's
budget. Every point's config is built and validated (`routing_lm.config.validate`, then
the mesh checks of `routing_lm.parallel.validate_mesh` for the local devices, or for
`--num_devices`) before anything runs; all bad points are reported at once.

Running locally, the points train one after another in this process (`train.train`),
each in <workdir>/<name>: a point whose summary.json exists is skipped, an unfinished one
resumes from its latest checkpoint, so rerunning the same command after an interruption
finishes the sweep. A failing point is reported and the sweep goes on; the exit status is
1 if any failed. At the end every point's summary.json is collected into
<workdir>/results.csv (one row per finished point; columns RESULT_COLUMNS, then
EXTRA_COLUMNS; `router` is 'dense' when num_experts == 1).

With --print-commands, stdout holds only the commands, one per line, and the workdir is
not touched (launch/sweep.sh runs them on TPU VMs; `--collect` later builds results.csv
from the fetched summaries). Progress and errors go to stderr.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import pathlib
import shlex
import sys
import time
import traceback
from typing import Any, Sequence

import ml_collections

from routing_lm import config as config_lib, metrics, paths
from routing_lm.config import ConfigError

# The contract with routing_lm/scaling (and finegrained_spec.md section 5).
RESULT_COLUMNS = (
    "router", "num_experts", "top_k", "routing_frequency", "granularity",
    "n_params", "total_params", "flops_per_token", "total_params_nonemb",
    "active_params_nonemb", "train_flops", "steps", "tokens", "val_loss", "train_loss",
    "train_loss_smoothed", "wall_seconds")
# Useful context after the contract's columns.
EXTRA_COLUMNS = (
    "router_params", "shared_params", "embedding_params", "train_flops_per_token",
    "num_routed_layers",
    "d_model", "num_layers", "num_heads", "d_ff", "vocab_size", "seq_len", "batch_size",
    "learning_rate", "capacity_factor", "output_norm", "seed", "workdir")
COLUMNS = ("name",) + RESULT_COLUMNS + EXTRA_COLUMNS
SUMMARY = metrics.SUMMARY   # each run's summary.json (routing_lm.metrics)
RESULTS = "results.csv"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class SweepError(ValueError):
  """A sweep file or its points are malformed; the message says which and how to fix."""


@dataclasses.dataclass
class Point:
  """One grid point: its name, base config spec, all overrides, and the built config."""
  index: int
  name: str
  config_spec: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict | None = None
  error: str | None = None   # why the config could not be built (unknown field, bad type)

  @property
  def num_steps(self) -> int:
    return int(self.config.train.num_steps)

  @property
  def tokens(self) -> int:
    c = self.config
    return int(c.train.num_steps) * int(c.data.batch_size) * int(c.data.seq_len)


@dataclasses.dataclass
class Sweep:
  name: str
  points: list[Point]


def log(message: str) -> None:
  print(f"[sweep] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- sweep files
def _check_overrides(value: Any, where: str) -> dict[str, Any]:
  if value is None:
    return {}
  if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
    raise SweepError(f"{where}: 'overrides' must be a dict of flattened field names "
                     f"(e.g. {{'model.routing.num_experts': 8}}), got {value!r}.")
  return dict(value)


def _check_tokens(value: Any, where: str) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    raise SweepError(f"{where}: 'tokens' must be a positive number of training tokens, "
                     f"got {value!r}.")
  return int(value)


def load_sweep(path: str) -> Sweep:
  """Reads a sweep file and builds every point's config; `check_points` validates them
  (a point whose config could not be built carries the reason in `error`)."""
  module = config_lib.load_module(path)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"sweep file {path!r} defines no get_sweep().")
  spec = module.get_sweep()
  if not isinstance(spec, dict):
    raise SweepError(f"{path}: get_sweep() must return a dict, got {type(spec).__name__}.")
  allowed = {"name", "config", "overrides", "tokens", "points"}
  unknown = sorted(set(spec) - allowed)
  if unknown:
    raise SweepError(f"{path}: get_sweep() has unknown keys {unknown}; allowed: "
                     f"{sorted(allowed)}.")
  if not isinstance(spec.get("config"), str):
    raise SweepError(f"{path}: get_sweep()['config'] must name the base config file, e.g. "
                     "'configs/tiny.py' or 'configs/paper.py:130m,sbase,64'.")
  common = _check_overrides(spec.get("overrides"), path)
  budget = _check_tokens(spec.get("tokens"), path)
  if budget is not None and "train.num_steps" in common:
    raise SweepError(f"{path}: give either 'tokens' or a 'train.num_steps' override for "
                     "every point, not both.")
  raw_points = spec.get("points")
  if not isinstance(raw_points, (list, tuple)) or not raw_points:
    raise SweepError(f"{path}: get_sweep()['points'] must be a non-empty list of "
                     "{'name': ..., 'overrides': {...}} dicts.")
  points, seen = [], set()
  for i, p in enumerate(raw_points):
    where = f"{path}: point {i}"
    if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
      raise SweepError(f"{where}: each point is a dict with a 'name' (its run folder), got "
                       f"{p!r}.")
    name = p["name"]
    where = f"{path}: point {i} ({name!r})"
    bad = sorted(set(p) - {"name", "overrides", "tokens", "config"})
    if bad:
      raise SweepError(f"{where}: unknown keys {bad}; allowed: config, name, overrides, "
                       "tokens.")
    if not set(name) <= _NAME_CHARS or name in (".", ".."):
      raise SweepError(f"{where}: the name must use only letters, digits, '_', '.', '-' "
                       "(it names the run's folder).")
    if name in seen:
      raise SweepError(f"{where}: the name {name!r} is used twice; names must be unique.")
    seen.add(name)
    own = _check_overrides(p.get("overrides"), where)
    tokens = _check_tokens(p.get("tokens"), where)
    if tokens is not None and "train.num_steps" in own:
      raise SweepError(f"{where}: give either 'tokens' or a 'train.num_steps' override, not "
                       "both.")
    if tokens is None and "train.num_steps" not in own:
      tokens = budget
    point = Point(i, name, p.get("config", spec["config"]), {**common, **own})
    try:
      point.config = _build_config(point, tokens)
    except ConfigError as e:   # reported with every other bad point by check_points
      point.error = str(e)
    points.append(point)
  return Sweep(str(spec.get("name") or pathlib.Path(path).stem), points)


def _build_config(point: Point, tokens: int | None) -> ml_collections.ConfigDict:
  config = config_lib.load(point.config_spec, point.overrides)
  if tokens is not None:
    per_step = int(config.data.batch_size) * int(config.data.seq_len)
    steps = max(1, round(tokens / per_step))
    point.overrides["train.num_steps"] = steps
    config.train.num_steps = steps
  return config


# ---------------------------------------------------------------- validation
def _abstract_mesh(mesh_cfg: ml_collections.ConfigDict, num_devices: int):
  """The (data, expert, model) mesh `parallel.make_mesh` would build on num_devices."""
  import jax
  from routing_lm import parallel
  return jax.sharding.AbstractMesh(parallel.mesh_shape(mesh_cfg, num_devices),
                                   parallel.MESH_AXES)


def check_points(points: Sequence[Point], num_devices: int | None = None) -> None:
  """Validates every point's config and its mesh; raises one ConfigError listing all."""
  from routing_lm import parallel, train
  errors = []
  for p in points:
    if p.error is not None:
      errors.append(f"  point {p.index} ({p.name}): {p.error}")
      continue
    try:
      if num_devices is None:
        mesh = parallel.make_mesh(p.config.mesh)
      else:
        mesh = _abstract_mesh(p.config.mesh, num_devices)
      train.prepare_config(p.config, mesh)   # validate, token groups, validate_mesh
    except ConfigError as e:
      errors.append(f"  point {p.index} ({p.name}): {e}")
  if errors:
    raise ConfigError(f"{len(errors)} of {len(points)} sweep points are invalid; nothing ran:\n"
                      + "\n".join(errors))


# ---------------------------------------------------------------- commands
def _flag_value(value: Any) -> str:
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return repr(value)
  return str(value)


def command(point: Point, workdir: str) -> str:
  """The `python -m routing_lm.main ...` line that trains this point (same config)."""
  args = ["python", "-m", "routing_lm.main", f"--config={point.config_spec}"]
  args += [f"--config.{k}={_flag_value(v)}" for k, v in point.overrides.items()]
  args.append(f"--workdir={point_dir(workdir, point)}")
  return " ".join(shlex.quote(a) for a in args)


def point_dir(workdir: str, point: Point) -> str:
  """`<workdir>/<point name>`, a local path or a URL (gs://...), `~` left as written."""
  return paths.join(workdir, point.name)


# ---------------------------------------------------------------- results
def read_summary(path: str) -> dict[str, Any] | None:
  """A run's summary.json (local or URL), or None when the run has not finished."""
  text = paths.read_text(path)
  return None if text is None else json.loads(text)


def result_row(name: str, summary: dict[str, Any], workdir: str = "") -> dict[str, Any]:
  """One results.csv row from a run's summary.json."""
  c = summary["config"]
  m, r, d, t = c["model"], c["model"]["routing"], c["data"], c["train"]
  experts = int(r["num_experts"])
  row = {"name": name, "router": "dense" if experts == 1 else r["router"],
         "num_experts": experts, "top_k": r["top_k"],
         "routing_frequency": r["routing_frequency"], "granularity": r.get("granularity", 1)}
  for key in RESULT_COLUMNS + EXTRA_COLUMNS:
    if key not in row and key in summary:
      row[key] = summary[key]
  row.update(d_model=m["d_model"], num_layers=m["num_layers"], num_heads=m["num_heads"],
             d_ff=m["d_ff"], vocab_size=m["vocab_size"], seq_len=d["seq_len"],
             batch_size=d["batch_size"], learning_rate=t["learning_rate"],
             capacity_factor=r.get("capacity_factor"), output_norm=r.get("output_norm"),
             seed=t.get("seed", 0), workdir=workdir)
  return {k: row.get(k) for k in COLUMNS}


def collect(points: Sequence[Point], workdir: str) -> list[dict[str, Any]]:
  """Reads every finished point's summary.json; writes <workdir>/results.csv."""
  rows, missing = [], []
  for p in points:
    pdir = point_dir(workdir, p)
    summary = read_summary(paths.join(pdir, SUMMARY))
    if summary is None:
      missing.append(p.name)
    else:
      rows.append(result_row(p.name, summary, pdir))
  out = paths.join(workdir, RESULTS)
  paths.write_atomic(out, _csv_text(rows))   # creates the workdir if needed
  log(f"wrote {out}: {len(rows)} of {len(points)} points"
      + (f" (not finished: {', '.join(missing)})" if missing else ""))
  return rows


def _csv_text(rows: list[dict[str, Any]]) -> str:
  import io
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


# ---------------------------------------------------------------- running
def _describe(p: Point) -> str:
  r = p.config.model.routing
  kind = "dense" if r.num_experts == 1 else (
      f"{r.router} E={r.num_experts} K={r.top_k} R={r.routing_frequency} G={r.granularity}")
  return f"{kind}, {p.num_steps} steps, {p.tokens:,} tokens"


def _result(summary: dict[str, Any]) -> str:
  return (f"val_loss {summary['val_loss']:.4f}, train_loss_smoothed "
          f"{summary['train_loss_smoothed']:.4f}, N {summary['n_params']:,}, "
          f"P {summary['total_params']:,}, {summary['wall_seconds']:.1f} s")


def run_points(points: Sequence[Point], workdir: str, selected: Sequence[Point]) -> list[str]:
  """Trains the selected points one after another; returns the names that failed."""
  from routing_lm import train
  failed = []
  n, start = len(points), time.time()
  for p in selected:
    tag = f"{p.index + 1}/{n} {p.name}"
    pdir = point_dir(workdir, p)
    summary = read_summary(paths.join(pdir, SUMMARY))
    if summary is not None:
      log(f"{tag}: skipped, finished earlier: {_result(summary)}")
      continue
    resume = paths.as_path(paths.join(pdir, "checkpoints")).is_dir()
    log(f"{tag}: {'resuming' if resume else 'running'} ({_describe(p)}) in {pdir}")
    t0 = time.time()
    try:
      summary = train.train(p.config, pdir)
    except Exception as e:   # report, go on with the next point; SystemExit stops the sweep
      failed.append(p.name)
      log(f"{tag}: FAILED after {time.time() - t0:.1f} s: {type(e).__name__}: {e}")
      traceback.print_exc(file=sys.stderr)
      continue
    log(f"{tag}: done: {_result(summary)} (sweep {time.time() - start:.0f} s so far)")
  return failed


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m routing_lm.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sweep", required=True, help="a sweep file, e.g. configs/sweeps/cpu_mini.py")
  p.add_argument("--workdir", required=True, help="one folder per point, and results.csv")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--print-commands", "--print_commands", dest="print_commands",
                    action="store_true", help="print one command per point and exit")
  mode.add_argument("--collect", action="store_true",
                    help="only collect the summaries into results.csv")
  p.add_argument("--only", default="", help="run only the points whose name contains this")
  p.add_argument("--num_devices", "--num-devices", type=int, default=None,
                 help="validate the meshes for this many devices instead of the local ones "
                      "(e.g. when printing commands for a TPU slice)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  try:
    sweep = load_sweep(args.sweep)
    points = sweep.points
    selected = [p for p in points if args.only in p.name]
    if not selected:
      raise SweepError(f"--only={args.only!r} matches none of the {len(points)} points: "
                       f"{', '.join(p.name for p in points)}.")
    if args.collect:
      collect(points, args.workdir)
      return 0
    check_points(points, args.num_devices)
  except (SweepError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_commands:
    for p in selected:
      print(command(p, args.workdir), flush=True)
    log(f"{sweep.name}: printed {len(selected)} of {len(points)} commands")
    return 0
  log(f"{sweep.name}: {len(points)} points, {len(selected)} selected, workdir {args.workdir}")
  start = time.time()
  failed = run_points(points, args.workdir, selected)
  collect(points, args.workdir)
  log(f"{sweep.name}: finished in {time.time() - start:.0f} s"
      + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
