"""Learning curves of a seeded sweep: the gain over dense and the router agreement against
the step, with intervals over seeds (no jax).

  python -m routing_lm.curves --workdir=results/cpu_paper --out=results/cpu_paper/curves \\
      [--window=25] [--every=100] [--routers=sbase,rlr] [--confidence=0.95]

Input: the sweep's workdir, one folder per point with the run's `metrics.jsonl`
(`routing_lm.metrics`: one JSON object per logged step). Point names are
`seed<k>_<size>_<router>_e<E>` and `seed<k>_<size>_dense` (configs/sweeps/cpu_paper.py);
other folders are ignored. Per step the last line that has a key gives that key's value: a
resumed run logs a step again (the later line wins), and the evaluation writes its own line
at the same step as the training line (val_loss beside, not instead of, loss).

Per (size, router, E), per seed k with a dense run of that size and seed:
- the gain at each logged step both runs have: routed loss - dense loss (negative: routing
  helps). `loss` is the training loss of that step's batch; the sweep's batches are not
  seen twice, so it is a held-out estimate; seed k gives both runs the same batches.
- smoothed by a trailing moving average over the last --window logged steps (fewer at the
  start of the run): at the i-th common step, the mean of the gains at steps i-W+1 .. i.
- the agreement (`router/block<i>/agreement`, the mean over routed blocks; routers that log
  it: sbase, rlr), smoothed the same way.
Then at checkpoint steps (every --every steps and the last step) the mean over seeds ± the
half-width of the Student-t interval (`stats.mean_interval`). A seed's value at step s is
its smoothed value at its last logged step <= s, if its run has reached s (a run still in
progress counts only up to its last step). Cells show "mean ± half-width (seeds)".

Output: markdown tables printed and written to <out>/curves.md, and plots
<out>/gain_vs_step.png (one panel per router, one line per (size, E), the interval shaded,
a dashed zero line) and <out>/agreement_vs_step.png. A size without a dense run, or a
routed seed without its dense seed, is skipped with a note in the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from routing_lm import metrics
from routing_lm.findings import CONFIDENCE, markdown_table
from routing_lm.scaling import stats

WINDOW = 25       # logged steps in the trailing moving average
EVERY = 100       # steps between checkpoints of the tables
DENSE = "dense"
ROUTED_NAME = re.compile(r"^seed(\d+)_([^_]+)_(.+)_e(\d+)$")
DENSE_NAME = re.compile(r"^seed(\d+)_([^_]+)_dense$")
AGREEMENT = re.compile(r"^router/block\d+/agreement$")
SIZE_ORDER = ("xxs", "xs", "s", "m", "l", "xl", "xxl")   # configs/sweeps/cpu_mini.py's names


class Cell(NamedTuple):
  """One routed configuration; its runs differ only in the seed."""
  size: str
  router: str
  experts: int


class Point(NamedTuple):
  seed: int
  size: str
  router: str     # "dense" for the dense runs
  experts: int    # 1 for the dense runs


def parse_name(name: str) -> Point | None:
  """`seed<k>_<size>_<router>_e<E>` or `seed<k>_<size>_dense` as a Point; None otherwise."""
  m = DENSE_NAME.match(name)
  if m:
    return Point(int(m[1]), m[2], DENSE, 1)
  m = ROUTED_NAME.match(name)
  if m:
    return Point(int(m[1]), m[2], m[3], int(m[4]))
  return None


def read_run(path: str | pathlib.Path) -> pd.DataFrame:
  """One run's metrics.jsonl as a table [logged steps] x (loss, agreement), by step.

  Per step and key the last line that has the key wins (resumed runs log a step twice;
  evaluation lines share the step of a training line). agreement is the mean over blocks
  of `router/block<i>/agreement` (NaN where not logged). Empty for a missing file.
  """
  merged: dict[int, dict] = {}
  for row in metrics.read_jsonl(path, missing_ok=True):
    if "step" in row:
      merged.setdefault(int(row["step"]), {}).update(row)
  out = []
  for step in sorted(merged):
    row = merged[step]
    agree = [float(v) for k, v in row.items() if AGREEMENT.match(k) and v is not None]
    loss = row.get("loss")
    out.append({"step": step, "loss": np.nan if loss is None else float(loss),
                "agreement": float(np.mean(agree)) if agree else np.nan})
  return pd.DataFrame(out, columns=["step", "loss", "agreement"]).set_index("step")


def trailing_mean(values: pd.Series, window: int) -> pd.Series:
  """Mean of the last `window` values at each position (fewer at the start) [steps]."""
  if window < 1:
    raise ValueError(f"--window={window} must be >= 1 (logged steps; 1: no smoothing).")
  return values.rolling(window, min_periods=1).mean()


def gain_curve(routed: pd.DataFrame, dense: pd.DataFrame, window: int) -> pd.Series:
  """Smoothed routed - dense loss [common logged steps] of one seed."""
  both = pd.concat([routed["loss"], dense["loss"]], axis=1, keys=["r", "d"]).dropna()
  return trailing_mean(both["r"] - both["d"], window)


def checkpoint_steps(last: int, every: int) -> list[int]:
  """every, 2 every, ... up to `last`, and `last` itself."""
  if every < 1:
    raise ValueError(f"--every={every} must be >= 1 (steps between table columns).")
  steps = list(range(every, last + 1, every))
  return steps + [last] if not steps or steps[-1] != last else steps


def value_at(curve: pd.Series, step: int) -> float:
  """The curve's value at its last step <= `step`; NaN before its start or past its end."""
  if curve.empty or step < curve.index[0] or step > curve.index[-1]:
    return float("nan")
  return float(curve.loc[:step].iloc[-1])


def summarise(per_seed: dict[int, pd.Series], steps: Sequence[int],
              confidence: float = CONFIDENCE) -> pd.DataFrame:
  """Per step: n_seeds, mean, low, high over the seeds' curves (low/high NaN: < 2 seeds)."""
  rows = []
  for step in steps:
    x = np.array([value_at(c, step) for c in per_seed.values()])
    x = x[np.isfinite(x)]
    mean = lo = hi = np.nan
    if len(x):
      mean = float(x.mean())
    if len(x) >= 2:
      _, lo, hi = stats.mean_interval(x, confidence)
    rows.append({"step": step, "n_seeds": len(x), "mean": mean, "low": lo, "high": hi})
  return pd.DataFrame(rows, columns=["step", "n_seeds", "mean", "low", "high"])


def _size_key(size: str) -> tuple:
  return (SIZE_ORDER.index(size), "") if size in SIZE_ORDER else (len(SIZE_ORDER), size)


@dataclasses.dataclass
class Curves:
  """Per cell: the per-seed smoothed curves and their summaries at the checkpoint steps."""
  steps: list[int]                                   # checkpoint steps (table columns)
  gain: dict[Cell, dict[int, pd.Series]]             # cell -> seed -> smoothed gain
  agreement: dict[Cell, dict[int, pd.Series]]        # cell -> seed -> smoothed agreement
  gain_table: dict[Cell, pd.DataFrame]               # cell -> summarise() at `steps`
  agreement_table: dict[Cell, pd.DataFrame]
  notes: list[str]
  window: int
  confidence: float


def load_runs(workdir: str | pathlib.Path, routers: Sequence[str] | None = None
              ) -> tuple[dict[Point, pd.DataFrame], list[str]]:
  """Point -> read_run table for every point folder with logged steps; notes on the rest."""
  root = pathlib.Path(workdir)
  if not root.is_dir():
    raise ValueError(f"--workdir={workdir} is not a folder; point it at the sweep's "
                     f"--workdir (one folder per point, each with a metrics.jsonl).")
  runs, notes = {}, []
  for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    point = parse_name(folder.name)
    if point is None:
      continue
    if routers and point.router != DENSE and point.router not in routers:
      continue
    table = read_run(folder / metrics.METRICS)
    if table["loss"].notna().any():
      runs[point] = table
    else:
      notes.append(f"{folder.name}: no logged training loss yet (no {metrics.METRICS} "
                   f"or no 'loss' in it); left out")
  if not any(p.router != DENSE for p in runs):
    raise ValueError(f"--workdir={workdir} has no routed point with a logged loss (folders "
                     f"named seed<k>_<size>_<router>_e<E> holding {metrics.METRICS}"
                     + (f", router in {list(routers)}" if routers else "")
                     + "); run the sweep first, or check --workdir and --routers.")
  return runs, notes


def compute(workdir: str | pathlib.Path, window: int = WINDOW, every: int = EVERY,
            routers: Sequence[str] | None = None,
            confidence: float = CONFIDENCE) -> Curves:
  """The gain and agreement curves of every routed cell in `workdir`."""
  runs, notes = load_runs(workdir, routers)
  dense = {(p.size, p.seed): t for p, t in runs.items() if p.router == DENSE}
  gain: dict[Cell, dict[int, pd.Series]] = {}
  agreement: dict[Cell, dict[int, pd.Series]] = {}
  no_dense: dict[str, set[str]] = {}
  for point, table in sorted(runs.items()):
    if point.router == DENSE:
      continue
    cell = Cell(point.size, point.router, point.experts)
    agree = table["agreement"].dropna()
    if not agree.empty:
      agreement.setdefault(cell, {})[point.seed] = trailing_mean(agree, window)
    if not any(size == point.size for size, _ in dense):
      no_dense.setdefault(point.size, set()).add(f"{point.router}_e{point.experts}")
      continue
    base = dense.get((point.size, point.seed))
    name = f"seed{point.seed}_{point.size}_{point.router}_e{point.experts}"
    if base is None:
      notes.append(f"{name}: no dense run seed{point.seed}_{point.size}_dense; this seed is "
                   f"left out of the gain")
    else:
      curve = gain_curve(table, base, window)
      if curve.empty:
        notes.append(f"{name}: no logged step in common with its dense run; left out")
      else:
        gain.setdefault(cell, {})[point.seed] = curve
  for size, cells in sorted(no_dense.items()):
    notes.append(f"size {size}: no dense run (seed<k>_{size}_dense) in {workdir}, so no "
                 f"gain for its {len(cells)} routed cell(s) ({', '.join(sorted(cells))}); "
                 f"skipped. Run the dense points of that size to include them.")
  last = max([int(c.index[-1]) for seeds in (*gain.values(), *agreement.values())
              for c in seeds.values()], default=0)
  steps = checkpoint_steps(last, every) if last else []
  return Curves(steps, gain, agreement,
                {c: summarise(s, steps, confidence) for c, s in gain.items()},
                {c: summarise(s, steps, confidence) for c, s in agreement.items()},
                notes, window, confidence)


# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------
def _cell_text(row: pd.Series, digits: int, signed: bool) -> str:
  """"mean ± half-width (seeds)"; the mean alone with one seed; "-" with none."""
  n = int(row["n_seeds"])
  if n == 0:
    return "-"
  text = f"{row['mean']:{'+' if signed else ''}.{digits}f}"
  if n >= 2:
    text += f" ± {(row['high'] - row['low']) / 2:.{digits}f}"
  return f"{text} ({n})"


def _curve_table(tables: dict[Cell, pd.DataFrame], cells: Sequence[Cell],
                 steps: Sequence[int], digits: int, signed: bool) -> str:
  rows = [[c.size, c.router, c.experts, *[_cell_text(r, digits, signed)
                                          for _, r in tables[c].iterrows()]]
          for c in cells if c in tables]
  return markdown_table(["size", "router", "E", *[f"step {s}" for s in steps]], rows)


def markdown(curves: Curves, source: str = "") -> str:
  """The gain and agreement tables (rows: size/router/E; columns: checkpoint steps)."""
  pct = f"{curves.confidence:.0%}"
  order = sorted({*curves.gain, *curves.agreement},
                 key=lambda c: (_size_key(c.size), c.router, c.experts))
  parts = [f"# Learning curves{f' of {source}' if source else ''}", "",
           f"Trailing mean over the last {curves.window} logged steps, then the mean over "
           f"seeds ± the half-width of its {pct} Student-t interval (seeds).", "",
           "## Gain over dense: routed - dense training loss (negative: routing helps)", "",
           "Per seed, paired with the dense run of the same size and seed (same batches).",
           "", _curve_table(curves.gain_table, order, curves.steps, 4, True), "",
           "## Router agreement (mean over routed blocks)", "",
           _curve_table(curves.agreement_table, order, curves.steps, 3, False)
           if curves.agreement_table else "No run logs router/block<i>/agreement.", ""]
  if curves.notes:
    parts += ["## Notes", "", *[f"- {n}" for n in curves.notes], ""]
  return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------
def _all_steps(per_seed: dict[int, pd.Series]) -> list[int]:
  return sorted(set().union(*(c.index for c in per_seed.values())))


def plot_curves(curves: dict[Cell, dict[int, pd.Series]], path: pathlib.Path, ylabel: str,
                confidence: float = CONFIDENCE, zero_line: bool = False) -> None:
  """One panel per router, one line per (size, E): the mean over seeds at every logged
  step, the interval shaded."""
  routers = sorted({c.router for c in curves})
  fig = Figure(figsize=(4.2 * len(routers), 3.4))
  FigureCanvasAgg(fig)
  for j, router in enumerate(routers):
    ax = fig.add_subplot(1, len(routers), j + 1)
    cells = sorted((c for c in curves if c.router == router),
                   key=lambda c: (_size_key(c.size), c.experts))
    for i, cell in enumerate(cells):
      s = summarise(curves[cell], _all_steps(curves[cell]), confidence)
      ax.plot(s["step"], s["mean"], color=f"C{i}", lw=1.2,
              label=f"{cell.size} E={cell.experts} ({len(curves[cell])} seeds)")
      ax.fill_between(s["step"], s["low"], s["high"], color=f"C{i}", alpha=0.2, lw=0)
    if zero_line:
      ax.axhline(0.0, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="step", title=router)
    if j == 0:
      ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m routing_lm.curves", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the sweep's --workdir")
  p.add_argument("--out", required=True, help="folder for curves.md and the plots")
  p.add_argument("--window", type=int, default=WINDOW,
                 help="logged steps in the trailing moving average (1: none)")
  p.add_argument("--every", type=int, default=EVERY, help="steps between table columns")
  p.add_argument("--routers", default="", help="comma-separated; default: every router")
  p.add_argument("--confidence", type=float, default=CONFIDENCE)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  routers = [r for r in args.routers.split(",") if r] or None
  try:
    curves = compute(args.workdir, args.window, args.every, routers, args.confidence)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  text = markdown(curves, args.workdir)
  print(text)
  (out / "curves.md").write_text(text + "\n")
  if curves.gain:
    plot_curves(curves.gain, out / "gain_vs_step.png", "routed - dense loss",
                args.confidence, zero_line=True)
  if curves.agreement:
    plot_curves(curves.agreement, out / "agreement_vs_step.png", "router agreement",
                args.confidence)
  print(f"\nwrote {out / 'curves.md'} and plots")
  return 0


if __name__ == "__main__":
  sys.exit(main())
