"""The paper's three findings, read off a seeded sweep with intervals (no jax).

  python -m routing_lm.findings --results=results/cpu_paper/results.csv \\
      --out=results/cpu_paper/findings

Input: a results.csv from `routing_lm.sweep` with a `seed` column (configs/sweeps/cpu_paper.py:
several seeds per (size, router, E) cell; the dense E = 1 run once per size and seed).
Sizes are told apart by `n_params`. Output, printed and written to <out>/findings.md (with
the numbers in <out>/findings.json and plots in <out>):

1. Validation loss per (size, router, E): the mean over seeds ± the half-width of its
   Student-t interval (`stats.mean_interval`; --confidence, default 95%).
2. The gain over dense per cell, routed - dense (negative: routing helps), with its interval.
   Paired by seed (`stats.difference_interval(paired=True)`) on the seeds that both the
   routed cell and the dense run of that size have, when there are >= 2 of them (cpu_paper's
   seed k gives the routed and dense runs the same batch order, so the pairs share that
   noise); otherwise Welch's unpaired interval on all the seeds of each.
3. The paper's findings (paper_spec.md; Clark et al. 2022), each "holds", "fails" or
   "cannot be told", with the reasons:
   1. Routing helps at every size, for every router: holds when every cell's gain interval
      lies below zero; fails when some cell's lies above zero (routing hurts there);
      otherwise cannot be told.
   2. The gain shrinks as N grows, per router, from two lines of evidence: c > 0 in the
      router's fit of the routed law (Eq. 1, `scaling.fit_routed`, bootstrap interval at the
      same confidence), and the relative gain ln(L_routed / L_dense) at the router's largest
      E at the largest size minus that at the smallest size (Welch's interval over the
      per-seed paired gains) > 0. Relative, like c: in nats a gain also shrinks when the
      loss itself falls with N, with c < 0 (the test's planted law does). It
      holds when some line shows shrinking and none growing, fails in the opposite case,
      and cannot be told otherwise; also cannot be told for a router with no cell whose gain
      is below zero (no gain to shrink).
   3. S-BASE is best: for each other router, the difference S-BASE - other pooled over the
      cells both have (per seed, the mean over cells; `stats.mean_interval` over the seeds
      common to all those cells), read by `stats.verdict`: an ordering only where the
      interval excludes zero, else "equivalent within <margin>" when it lies inside
      ±--margin (default 0.01 nats), else "not distinguishable". Holds when S-BASE is lower
      than every other router, fails when some router is lower than S-BASE. The per-cell
      verdicts are listed too.
   Findings 1-3 are read on the paper's routers (PAPER_ROUTERS). Any other router in the
   table (the routers after the paper: configs/sweeps/cpu_after_paper.py) gets the same
   three tests in a section of its own, "Routers after the paper".
4. The routed law fitted per router on the per-seed rows (dense rows in every router's fit,
   as in routing_lm.fit), not on the seed means: the bootstrap then resamples runs, so its
   intervals carry the seed noise; with the same number of seeds in every cell the point
   estimate equals the fit to the means of log10 loss. The fit's bootstrap refits on random
   80% subsets of the rows (`scaling.fit_routed`); --n_bootstrap, default 1000.

With one seed per cell there are no intervals: the table shows the means alone and every
finding that needs an interval is "cannot be told". A table without a `seed` column is an
error (`routing_lm.sweep --collect` rewrites results.csv with it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from routing_lm import scaling
from routing_lm.fit import json_default
from routing_lm.scaling import stats

HOLDS, FAILS, UNKNOWN = "holds", "fails", "cannot be told"
MARGIN = 0.01          # nats: the half-width within which two losses count as equivalent
CONFIDENCE = 0.95
BEST = "sbase"         # finding 3's router
PAPER_ROUTERS = ("sbase", "hash", "rlr")   # the routers the paper's findings are about
COLUMNS = ("router", "num_experts", "n_params", "seed")
E_START_BOUNDS, E_MAX_BOUNDS = (1.0, 16.0), (16.0, 1e5)   # fit_routed's search box


# ---------------------------------------------------------------------------------------
# Input.
# ---------------------------------------------------------------------------------------
def load_table(df: pd.DataFrame, loss_column: str = "val_loss",
               source: str | None = None) -> pd.DataFrame:
  """The results table checked and reduced to router, num_experts, n_params, seed, loss.

  Rows with num_experts == 1 become router 'dense'. Raises ValueError on a missing seed
  column or a (size, router, E, seed) that appears twice.
  """
  who = "routing_lm.findings"
  where = f" {source}" if source else " the table"
  if "seed" not in df.columns:
    raise ValueError(f"{who}:{where} has no 'seed' column, so seeds cannot be told apart. "
                     f"Rewrite results.csv from the runs' summaries with "
                     f"`python -m routing_lm.sweep --sweep=<sweep file> --workdir=<its "
                     f"workdir> --collect` (the sweep writes the seed since this column "
                     f"was added), or add the column by hand.")
  table = scaling.validate_table(df, [*COLUMNS, loss_column],
                                 positive=["n_params", loss_column],
                                 at_least_one=["num_experts"], who=who, source=source)
  table = table[[*COLUMNS, loss_column]].rename(columns={loss_column: "loss"})
  table["router"] = np.where(table["num_experts"] == 1, "dense",
                             table["router"].astype(str))
  table["num_experts"] = table["num_experts"].astype(int)
  if not (table["seed"] == table["seed"].round()).all():
    raise ValueError(f"{who}: column 'seed' must hold integers (train.seed), got "
                     f"{sorted(table['seed'].unique())[:5]}.")
  table["seed"] = table["seed"].astype(int)
  dup = table.duplicated(["n_params", "router", "num_experts", "seed"], keep=False)
  if dup.any():
    first = table[dup].iloc[0]
    raise ValueError(f"{who}:{where} has {int(dup.sum())} rows that repeat a (n_params, "
                     f"router, num_experts, seed), e.g. N={first.n_params:g} "
                     f"{first.router} E={first.num_experts} seed={first.seed}; give each "
                     f"rerun its own train.seed, or drop the duplicates.")
  if not (table["router"] == "dense").any():
    raise ValueError(f"{who}:{where} has no dense rows (num_experts == 1); the gains are "
                     f"measured against the dense run of each size: add them.")
  return table.reset_index(drop=True)


def _by_seed(table: pd.DataFrame, n_params: float, router: str, e: int) -> pd.Series:
  """Loss per seed [seeds] of one cell (empty if the cell has no runs)."""
  rows = table[(table["n_params"] == n_params) & (table["router"] == router)
               & (table["num_experts"] == e)]
  return rows.set_index("seed")["loss"].sort_index()


# ---------------------------------------------------------------------------------------
# Intervals.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Difference:
  """mean(a) - mean(b) with its interval (None: too few seeds), as stats.verdict reads it."""
  estimate: float
  interval: stats.Interval | None
  paired: bool
  n_a: int
  n_b: int
  verdict: str

  def to_json(self) -> dict:
    lo, hi = (None, None) if self.interval is None else self.interval[1:]
    return {"estimate": self.estimate, "low": lo, "high": hi, "paired": self.paired,
            "n_a": self.n_a, "n_b": self.n_b, "verdict": self.verdict}


def difference(a: pd.Series, b: pd.Series, names: Sequence[str], margin: float = MARGIN,
               confidence: float = CONFIDENCE) -> Difference:
  """a - b for two cells' per-seed values [seeds]: paired on >= 2 common seeds, else Welch."""
  common = a.index.intersection(b.index)
  estimate = float(a.mean() - b.mean())
  if len(common) >= 2:
    iv = stats.difference_interval(a[common].to_numpy(), b[common].to_numpy(), confidence,
                                   paired=True)
    paired = True
  elif len(a) >= 2 and len(b) >= 2:
    iv = stats.difference_interval(a.to_numpy(), b.to_numpy(), confidence)
    paired = False
  else:
    return Difference(estimate, None, False, len(a), len(b),
                      f"{UNKNOWN} (fewer than 2 seeds)")
  return Difference(iv.estimate, iv, paired, len(a), len(b), verdict_text(iv, margin, names))


def verdict_text(iv: stats.Interval, margin: float, names: Sequence[str]) -> str:
  """stats.verdict with the margin written out: "equivalent within 0.01"."""
  text = stats.verdict(iv.low, iv.high, margin, names)
  return f"equivalent within {margin:g}" if text == "equivalent within margin" else text


def cell_table(table: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
  """Per (n_params, router, num_experts): n_seeds, mean, low, high (NaN with one seed)."""
  rows = []
  for (n, router, e), g in table.groupby(["n_params", "router", "num_experts"]):
    x = g["loss"].to_numpy()
    lo = hi = np.nan
    if len(x) >= 2:
      _, lo, hi = stats.mean_interval(x, confidence)
    rows.append({"n_params": n, "router": router, "num_experts": e, "n_seeds": len(x),
                 "mean": float(x.mean()), "low": lo, "high": hi})
  return pd.DataFrame(rows)


def gains(table: pd.DataFrame, margin: float = MARGIN,
          confidence: float = CONFIDENCE) -> dict[tuple[float, str, int], Difference]:
  """(n_params, router, E) -> routed - dense of that size, for every routed cell."""
  out = {}
  routed = table[table["router"] != "dense"]
  for (n, router, e), _ in routed.groupby(["n_params", "router", "num_experts"]):
    dense = _by_seed(table, n, "dense", 1)
    if dense.empty:
      continue
    out[(n, router, e)] = difference(_by_seed(table, n, router, e), dense,
                                     (router, "dense"), margin, confidence)
  return out


# ---------------------------------------------------------------------------------------
# Findings.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Finding:
  number: int
  claim: str
  verdict: str            # HOLDS, FAILS or UNKNOWN
  reasons: tuple[str, ...]
  per_router: dict[str, str] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self) | {"reasons": list(self.reasons)}


def _combine(verdicts: Sequence[str]) -> str:
  """Every part holds -> holds; any part fails -> fails; else cannot be told."""
  if verdicts and all(v == HOLDS for v in verdicts):
    return HOLDS
  return FAILS if FAILS in verdicts else UNKNOWN


def _size(n: float) -> str:
  return f"N={int(n):,}"


def finding_1(gain: dict[tuple[float, str, int], Difference]) -> Finding:
  """Routing helps at every size, for every router: every gain interval below zero."""
  per_router, reasons = {}, []
  for router in sorted({k[1] for k in gain}):
    cells = {k: d for k, d in gain.items() if k[1] == router}
    below = [k for k, d in cells.items() if d.interval is not None and d.interval.high < 0]
    above = [k for k, d in cells.items() if d.interval is not None and d.interval.low > 0]
    unknown = [k for k in cells if k not in below and k not in above]
    v = HOLDS if len(below) == len(cells) else FAILS if above else UNKNOWN
    per_router[router] = v
    text = f"{router}: gain below zero in {len(below)} of {len(cells)} cells"
    if above:
      text += "; above zero (routing hurts) at " + ", ".join(
          f"{_size(n)} E={e}" for n, _, e in above)
    if unknown:
      text += "; interval spans zero at " + ", ".join(
          f"{_size(n)} E={e} ({cells[(n, r, e)].verdict})" for n, r, e in unknown)
    reasons.append(text)
  if not gain:
    reasons.append("no routed cell has a dense run of the same size")
  return Finding(1, "routing helps at every size, for every router",
                 _combine(list(per_router.values())), tuple(reasons), per_router)


@dataclasses.dataclass(frozen=True)
class RouterFit:
  """A router's routed-law fit (None with the reason when it could not be made)."""
  router: str
  fit: scaling.RoutedFit | None
  reason: str = ""


def fit_routers(table: pd.DataFrame, n_bootstrap: int = scaling.N_BOOTSTRAP,
                confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, RouterFit]:
  """Each router's Eq. 1 fit on its per-seed rows plus the dense rows (paper_spec.md 2.2).

  Bootstrap percentile interval at `confidence` (e.g. 2.5-97.5%). A router needs >= 2 sizes
  and >= 2 expert counts besides the dense runs; otherwise the reason is returned.
  """
  pct = (100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2)
  dense = table[table["router"] == "dense"]
  out = {}
  for router in sorted(set(table["router"]) - {"dense"}):
    rows = pd.concat([dense, table[table["router"] == router]])
    rows = rows.rename(columns={"loss": "val_loss"})
    n_sizes = rows["n_params"].nunique()
    n_e = rows.loc[rows["num_experts"] > 1, "num_experts"].nunique()
    if n_sizes < 2 or n_e < 2 or len(rows) < 7:
      out[router] = RouterFit(router, None, f"{n_sizes} size(s) and {n_e} E > 1 in "
                              f"{len(rows)} rows; Eq. 1 needs >= 2 sizes and >= 2 E > 1")
      continue
    try:
      fit = scaling.fit_routed(rows, n_bootstrap=n_bootstrap, percentiles=pct, seed=seed,
                               leave_out=False, e_start_bounds=E_START_BOUNDS,
                               e_max_bounds=E_MAX_BOUNDS)
    except ValueError as e:
      out[router] = RouterFit(router, None, str(e))
      continue
    out[router] = RouterFit(router, fit)
  return out


def _log_gain_by_seed(table: pd.DataFrame, n: float, router: str, e: int) -> pd.Series:
  """Per-seed paired relative gain ln(routed / dense) [common seeds]."""
  routed, dense = _by_seed(table, n, router, e), _by_seed(table, n, "dense", 1)
  common = routed.index.intersection(dense.index)
  return np.log(routed[common]) - np.log(dense[common])


def finding_2(table: pd.DataFrame, gain: dict[tuple[float, str, int], Difference],
              fits: dict[str, RouterFit],
              confidence: float = CONFIDENCE) -> tuple[Finding, dict[str, Difference]]:
  """The gain shrinks as N grows: c > 0, and/or the largest-E gain rising towards zero.

  Returns the finding and, per router, the difference of the relative gain
  ln(L_routed / L_dense) at the largest N minus at the smallest N, at the router's largest E
  (Welch's interval over the per-seed paired gains). Relative, like the law's c (a log-loss
  slope): in nats a gain can shrink only because the loss itself falls with N.
  """
  per_router, reasons, trend = {}, [], {}
  for router in sorted({k[1] for k in gain}):
    cells = {k: d for k, d in gain.items() if k[1] == router}
    lines = []
    f = fits.get(router)
    if f is None or f.fit is None:
      c_text = f"no fit ({f.reason if f else 'no rows'})"
    elif not f.fit.intervals:
      c_text = f"fit c = {f.fit.c:.4f}, no bootstrap interval (--n_bootstrap=0)"
    else:
      lo, hi = f.fit.intervals["c"]
      lines.append("shrinks" if lo > 0 else "grows" if hi < 0 else "unclear")
      c_text = f"fit c = {f.fit.c:.4f} [{lo:.4f}, {hi:.4f}] ({lines[-1]})"
    sizes = sorted({k[0] for k in cells})
    e_max = max(k[2] for k in cells)
    d_text = "one size only"
    if len(sizes) >= 2 and (sizes[0], router, e_max) in cells \
        and (sizes[-1], router, e_max) in cells:
      small = _log_gain_by_seed(table, sizes[0], router, e_max)
      large = _log_gain_by_seed(table, sizes[-1], router, e_max)
      if len(small) >= 2 and len(large) >= 2:
        # Unpaired (Welch): the two sizes are different models, whatever their seeds.
        iv = stats.difference_interval(large.to_numpy(), small.to_numpy(), confidence)
        lines.append("shrinks" if iv.low > 0 else "grows" if iv.high < 0 else "unclear")
        trend[router] = Difference(iv.estimate, iv, False, len(large), len(small),
                                   lines[-1])
        d_text = (f"E={e_max} relative gain ln(routed/dense) at {_size(sizes[-1])} - at "
                  f"{_size(sizes[0])} = "
                  f"{iv.estimate:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] ({lines[-1]})")
      else:
        d_text = "fewer than 2 paired seeds at the smallest or largest size"
    helps = any(d.interval is not None and d.interval.high < 0 for d in cells.values())
    if not helps:
      v = UNKNOWN
      why = "no cell's gain is below zero, so there is no gain to shrink"
    elif "shrinks" in lines and "grows" not in lines:
      v, why = HOLDS, ""
    elif "grows" in lines and "shrinks" not in lines:
      v, why = FAILS, ""
    else:
      v = UNKNOWN
      why = "the evidence conflicts" if lines.count("shrinks") and lines.count("grows") \
          else "no interval excludes zero"
    per_router[router] = v
    reasons.append(f"{router}: {v}: {c_text}; {d_text}" + (f"; {why}" if why else ""))
  return (Finding(2, "the gain from routing shrinks as N grows (c > 0)",
                  _combine(list(per_router.values())), tuple(reasons), per_router), trend)


def router_comparisons(table: pd.DataFrame, margin: float = MARGIN,
                       confidence: float = CONFIDENCE, best: str = BEST
                       ) -> tuple[dict[str, Difference], dict[tuple[str, float, int], Difference]]:
  """best - other per router: pooled over the common cells, and per (other, N, E) cell.

  Pooled: per seed common to every cell of both routers, the mean over cells of
  best - other; `stats.mean_interval` over those seeds.
  """
  pooled, per_cell = {}, {}
  if best not in set(table["router"]):
    return pooled, per_cell
  for other in sorted(set(table["router"]) - {"dense", best}):
    cells = sorted(set(map(tuple, table.loc[table["router"] == best,
                                            ["n_params", "num_experts"]].to_numpy()))
                   & set(map(tuple, table.loc[table["router"] == other,
                                              ["n_params", "num_experts"]].to_numpy())))
    diffs = []
    for n, e in cells:
      a, b = _by_seed(table, n, best, int(e)), _by_seed(table, n, other, int(e))
      per_cell[(other, n, int(e))] = difference(a, b, (best, other), margin, confidence)
      diffs.append(a - b)   # NaN where a seed is missing from either
    if not diffs:
      continue
    per_seed = pd.concat(diffs, axis=1).dropna().mean(axis=1)
    estimate = float(np.mean([d.mean() for d in diffs]))
    if len(per_seed) < 2:
      pooled[other] = Difference(estimate, None, True, len(per_seed), len(per_seed),
                                 f"{UNKNOWN} (fewer than 2 seeds common to every cell)")
      continue
    iv = stats.mean_interval(per_seed.to_numpy(), confidence)
    pooled[other] = Difference(iv.estimate, iv, True, len(per_seed), len(per_seed),
                               verdict_text(iv, margin, (best, other)))
  return pooled, per_cell


def finding_3(pooled: dict[str, Difference], per_cell: dict[tuple[str, float, int], Difference],
              best: str = BEST) -> Finding:
  """S-BASE is best: lower loss than every other router, pooled over cells."""
  if not pooled:
    return Finding(3, f"{best} is the best router", UNKNOWN,
                   (f"needs {best} and another router in the same cells",))
  per_router, reasons = {}, []
  for other, d in pooled.items():
    if d.interval is None:
      v = UNKNOWN
    elif d.interval.high < 0:
      v = HOLDS
    elif d.interval.low > 0:
      v = FAILS
    else:
      v = UNKNOWN
    per_router[other] = v
    cells = [c for k, c in per_cell.items() if k[0] == other]
    counts = pd.Series([c.verdict for c in cells]).value_counts().to_dict()
    iv = "" if d.interval is None else f" [{d.interval.low:+.4f}, {d.interval.high:+.4f}]"
    reasons.append(f"{best} - {other} pooled over {len(cells)} cells: {d.estimate:+.4f}{iv} "
                   f"over {d.n_a} seeds: {d.verdict}; per cell: "
                   + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())))
  return Finding(3, f"{best} is the best router (lower loss than each other router)",
                 _combine(list(per_router.values())), tuple(reasons), per_router)


# ---------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------
def _findings_md(items: Sequence[Finding]) -> list[str]:
  lines = []
  for f in items:
    lines.append(f"{f.number}. **{f.claim}: {f.verdict}.**")
    lines += [f"   - {r}" for r in f.reasons]
  return lines


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A markdown table (also used by routing_lm.ablation and routing_lm.curves)."""
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  return "\n".join(lines)


def plus_minus(mean: float, low: float, high: float, digits: int = 3) -> str:
  """'mean ± half-width' of an interval, or the mean alone when there is none (NaN)."""
  if not np.isfinite(low):
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {(high - low) / 2:.{digits}f}"


def _loss_table(cells: pd.DataFrame) -> str:
  experts = sorted(cells["num_experts"].unique())
  rows = []
  for n in sorted(cells["n_params"].unique()):
    at_n = cells[cells["n_params"] == n]
    dense = at_n[at_n["router"] == "dense"]
    for router in sorted(set(at_n["router"]) - {"dense"}):
      row = [_size(n), router]
      for e in experts:
        c = dense if e == 1 else at_n[(at_n["router"] == router) & (at_n["num_experts"] == e)]
        row.append("-" if c.empty else plus_minus(*c.iloc[0][["mean", "low", "high"]])
                   + f" ({int(c.iloc[0]['n_seeds'])})")
      rows.append(row)
  return markdown_table(["size", "router", *[f"E={e}" for e in experts]], rows)


def _gain_table(gain: dict[tuple[float, str, int], Difference]) -> str:
  rows = []
  for (n, router, e), d in sorted(gain.items()):
    iv = "-" if d.interval is None else f"[{d.interval.low:+.4f}, {d.interval.high:+.4f}]"
    rows.append([_size(n), router, e, f"{d.estimate:+.4f}", iv,
                 "paired" if d.paired else "Welch" if d.interval is not None else "-",
                 f"{d.n_a}/{d.n_b}", d.verdict])
  return markdown_table(["size", "router", "E", "gain", "interval", "test", "seeds", "verdict"], rows)


def _fit_table(fits: dict[str, RouterFit]) -> str:
  names = ["a", "b", "c", "d", "e_start", "e_max"]
  rows = []
  for router, f in fits.items():
    if f.fit is None:
      rows.append([router, *["-"] * len(names), "-", "-", f.reason])
      continue
    cells = []
    for k in names:
      v = getattr(f.fit, k)
      lo_hi = f.fit.intervals.get(k)
      cells.append(f"{v:.4g}" + ("" if lo_hi is None else f" [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]"))
    rows.append([router, *cells, f"{f.fit.rmse:.4f}", f.fit.n_points, _bound_note(f.fit)])
  return markdown_table(["router", *names, "RMSE", "n", "note"], rows)


def _bound_note(fit: scaling.RoutedFit) -> str:
  """Names E_start / E_max when the fit stopped on the edge of its search box."""
  on = [name for name, v, box in (("E_start", fit.e_start, E_START_BOUNDS),
                                  ("E_max", fit.e_max, E_MAX_BOUNDS))
        if any(np.isclose(v, edge, rtol=1e-6) for edge in box)]
  return f"{' and '.join(on)} on a bound: not identified" if on else ""


def _cell_comparisons(per_cell: dict[tuple[str, float, int], Difference], best: str) -> str:
  rows = []
  for (other, n, e), d in sorted(per_cell.items()):
    iv = "-" if d.interval is None else f"[{d.interval.low:+.4f}, {d.interval.high:+.4f}]"
    rows.append([_size(n), e, f"{best} - {other}", f"{d.estimate:+.4f}", iv, d.verdict])
  return markdown_table(["size", "E", "difference", "estimate", "interval", "verdict"], rows)


@dataclasses.dataclass
class Report:
  cells: pd.DataFrame
  gain: dict
  fits: dict
  trend: dict
  pooled: dict
  per_cell: dict
  findings: list[Finding]
  later_findings: list[Finding]
  confidence: float
  margin: float
  n_bootstrap: int

  def markdown(self, source: str = "", loss_column: str = "val_loss") -> str:
    pct = f"{self.confidence:.0%}"
    parts = [f"# Findings{f' from {source}' if source else ''}", "",
             "## The paper's findings", ""]
    parts += _findings_md(self.findings)
    if self.later_findings:
      parts += ["", "## Routers after the paper (the same tests, against dense and "
                f"{BEST})", ""] + _findings_md(self.later_findings)
    parts += ["", f"## {loss_column}: mean ± {pct} interval over seeds (number of seeds)",
              "", "E=1 is the dense run of that size.", "", _loss_table(self.cells), "",
              f"## Gain over dense (routed - dense; negative: routing helps), {pct} interval",
              "", "paired: by seed, on the seeds both runs have; Welch: unpaired.", "",
              _gain_table(self.gain), "",
              f"## Routed law per router (Eq. 1, log10 loss), bootstrap {pct} intervals "
              f"({self.n_bootstrap} refits on 80% of the per-seed rows)", "",
              _fit_table(self.fits), "",
              f"## {BEST} against each router, per cell (margin {self.margin:g} nats)", "",
              _cell_comparisons(self.per_cell, BEST), ""]
    return "\n".join(parts)

  def to_json(self) -> dict:
    return {
        "confidence": self.confidence, "margin": self.margin, "n_bootstrap": self.n_bootstrap,
        "findings": [f.to_json() for f in self.findings],
        "later_findings": [f.to_json() for f in self.later_findings],
        "cells": self.cells.replace({np.nan: None}).to_dict(orient="records"),
        "gains": [{"n_params": n, "router": r, "num_experts": e, **d.to_json()}
                  for (n, r, e), d in sorted(self.gain.items())],
        "gain_trend": {r: d.to_json() for r, d in self.trend.items()},
        "fits": {r: (f.fit.to_json() if f.fit is not None else {"reason": f.reason})
                 for r, f in self.fits.items()},
        "pooled": {r: d.to_json() for r, d in self.pooled.items()},
        "per_cell": [{"other": o, "n_params": n, "num_experts": e, **d.to_json()}
                     for (o, n, e), d in sorted(self.per_cell.items())]}


def analyse(table: pd.DataFrame, *, margin: float = MARGIN, confidence: float = CONFIDENCE,
            n_bootstrap: int = scaling.N_BOOTSTRAP, seed: int = 0) -> Report:
  """All of it from a `load_table` table."""
  if margin < 0:
    raise ValueError(f"--margin={margin} must be >= 0 (nats).")
  cells = cell_table(table, confidence)
  gain = gains(table, margin, confidence)
  fits = fit_routers(table, n_bootstrap, confidence, seed)
  pooled, per_cell = router_comparisons(table, margin, confidence)

  def tests(paper: bool) -> list[Finding]:
    """Findings 1-3 on the paper's routers, or on the others."""
    keep = lambda router: (router in PAPER_ROUTERS) == paper
    g = {k: d for k, d in gain.items() if keep(k[1])}
    if not g:
      return []
    f2, _ = finding_2(table, g, fits, confidence)
    return [finding_1(g), f2,
            finding_3({r: d for r, d in pooled.items() if keep(r)},
                      {k: d for k, d in per_cell.items() if keep(k[0])})]

  _, trend = finding_2(table, gain, fits, confidence)
  return Report(cells, gain, fits, trend, pooled, per_cell, tests(True), tests(False),
                confidence, margin, n_bootstrap)


# ---------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------
def _errorbar(ax, x, mean, low, high, **kw) -> None:
  mean, low, high = (np.asarray(v, float) for v in (mean, low, high))
  err = np.where(np.isfinite(low), [mean - low, high - mean], 0.0)
  ax.errorbar(x, mean, yerr=err, capsize=3, marker="o", **kw)


def plot_loss_vs_experts(cells: pd.DataFrame, router: str, path: pathlib.Path) -> None:
  """Loss against E, one line per size (dense at E = 1), interval bars."""
  fig = Figure(figsize=(5.0, 3.6))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for i, n in enumerate(sorted(cells["n_params"].unique())):
    rows = cells[(cells["n_params"] == n) & cells["router"].isin(["dense", router])]
    rows = rows.sort_values("num_experts")
    _errorbar(ax, rows["num_experts"], rows["mean"], rows["low"], rows["high"],
              color=f"C{i}", label=_size(n))
  ax.set(xscale="log", xlabel="experts E (E = 1: dense)", ylabel="validation loss",
         title=f"{router}: loss vs E (mean, interval over seeds)")
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_gain_vs_params(gain: dict[tuple[float, str, int], Difference],
                        path: pathlib.Path) -> None:
  """Gain over dense against N, one panel per router, one line per E, interval bars."""
  routers = sorted({k[1] for k in gain})
  fig = Figure(figsize=(4.0 * len(routers), 3.4))
  FigureCanvasAgg(fig)
  for j, router in enumerate(routers):
    ax = fig.add_subplot(1, len(routers), j + 1)
    for i, e in enumerate(sorted({k[2] for k in gain if k[1] == router})):
      keys = sorted(k for k in gain if k[1] == router and k[2] == e)
      ds = [gain[k] for k in keys]
      _errorbar(ax, [k[0] for k in keys], [d.estimate for d in ds],
                [np.nan if d.interval is None else d.interval.low for d in ds],
                [np.nan if d.interval is None else d.interval.high for d in ds],
                color=f"C{i}", label=f"E={e}")
    ax.axhline(0.0, color="gray", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="dense size N", title=router)
    if j == 0:
      ax.set_ylabel("routed - dense loss")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m routing_lm.findings", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", required=True, help="results.csv from routing_lm.sweep")
  p.add_argument("--out", required=True, help="folder for findings.md, .json and plots")
  p.add_argument("--loss_column", default="val_loss")
  p.add_argument("--margin", type=float, default=MARGIN,
                 help="nats: an interval inside ±margin reads 'equivalent'")
  p.add_argument("--confidence", type=float, default=CONFIDENCE)
  p.add_argument("--n_bootstrap", type=int, default=scaling.N_BOOTSTRAP,
                 help="bootstrap refits per router fit (0: no interval for c)")
  p.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
  p.add_argument("--no_plots", action="store_true")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  from routing_lm.fit import read_results
  try:
    table = load_table(read_results(args.results), args.loss_column, args.results)
    report = analyse(table, margin=args.margin, confidence=args.confidence,
                     n_bootstrap=args.n_bootstrap, seed=args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  text = report.markdown(args.results, args.loss_column)
  print(text)
  (out / "findings.md").write_text(text + "\n")
  (out / "findings.json").write_text(json.dumps(report.to_json(), indent=1,
                                                default=json_default))
  if not args.no_plots:
    for router in sorted(set(table["router"]) - {"dense"}):
      plot_loss_vs_experts(report.cells, router, out / f"{router}_loss_vs_experts.png")
    if report.gain:
      plot_gain_vs_params(report.gain, out / "gain_vs_params.png")
  print(f"\nwrote {out / 'findings.md'}, {out / 'findings.json'}"
        + ("" if args.no_plots else " and plots"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
