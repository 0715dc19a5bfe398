"""Variants of one config against a baseline, paired by seed (no jax).

  python -m routing_lm.ablation --results=results/cpu_router_knobs/results.csv \\
      --baseline=default [--loss_column=val_loss --loss_column=train_loss_smoothed] \\
      [--margin=0.01] [--confidence=0.95] [--out=DIR]

Input: a results.csv from `routing_lm.sweep` whose point names are `seed<k>_<variant>`
(configs/sweeps/cpu_router_knobs.py): the variant is the name without its leading
`seed<k>_`, and seed k gives every variant the same initialisation and batch order, so the
variants' runs pair with the baseline's by seed.

Per loss column (default: val_loss and train_loss_smoothed), per variant:
- the mean over its seeds ± the half-width of the Student-t interval
  (`stats.mean_interval`; --confidence, default 95%);
- variant - baseline, paired by seed on the seeds both have (`stats.difference_interval(
  paired=True)`), read by `stats.verdict`: "<variant> < <baseline>" or ">" only where the
  interval excludes zero, else "equivalent within <margin>" when it lies inside ±--margin
  (default 0.01 nats), else "not distinguishable". With fewer than 2 common seeds the row
  says "cannot be told". Rows whose loss is missing (a failed run) are left out of that
  column.

Printed as markdown tables; with --out also written to <out>/ablation.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys
from typing import Sequence

import numpy as np
import pandas as pd

from routing_lm.findings import (CONFIDENCE, MARGIN, UNKNOWN, markdown_table, plus_minus,
                              verdict_text)
from routing_lm.scaling import stats

LOSS_COLUMNS = ("val_loss", "train_loss_smoothed")
NAME = re.compile(r"^seed(\d+)_(.+)$")


def variant_table(df: pd.DataFrame, loss_columns: Sequence[str] = LOSS_COLUMNS,
                  source: str | None = None) -> pd.DataFrame:
  """The results reduced to variant, seed and the loss columns [runs, 2 + n_columns].

  Raises ValueError on a missing column, a name that is not `seed<k>_<variant>`, or a
  (variant, seed) that appears twice.
  """
  where = f" {source}" if source else " the table"
  missing = [c for c in ("name", *loss_columns) if c not in df.columns]
  if missing:
    raise ValueError(f"routing_lm.ablation:{where} has no column(s) {missing}; it has "
                     f"{list(df.columns)}. Pass --loss_column=<one of those> (repeatable), "
                     f"or point --results at a results.csv from routing_lm.sweep.")
  names = df["name"].astype(str)
  parsed = names.str.extract(NAME)
  bad = names[parsed[0].isna()]
  if len(bad):
    raise ValueError(f"routing_lm.ablation:{where} has {len(bad)} point name(s) not of the "
                     f"form seed<k>_<variant>, e.g. {list(bad[:3])}; name the sweep's points "
                     f"seed<k>_<variant> as configs/sweeps/cpu_router_knobs.py does.")
  table = pd.DataFrame({"variant": parsed[1], "seed": parsed[0].astype(int)})
  for c in loss_columns:
    table[c] = pd.to_numeric(df[c], errors="coerce").to_numpy()
  dup = table.duplicated(["variant", "seed"], keep=False)
  if dup.any():
    first = table[dup].iloc[0]
    raise ValueError(f"routing_lm.ablation:{where} has {int(dup.sum())} rows that repeat a "
                     f"(variant, seed), e.g. {first.variant!r} seed {first.seed}; drop the "
                     f"duplicates (each point name once).")
  return table.reset_index(drop=True)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One variant on one loss column: its mean over seeds and variant - baseline (paired)."""
  variant: str
  n_seeds: int
  mean: float
  mean_interval: stats.Interval | None   # None: one seed
  n_common: int                          # seeds shared with the baseline
  difference: float                      # paired mean of variant - baseline (NaN: none)
  interval: stats.Interval | None        # None: fewer than 2 common seeds
  verdict: str


def _losses(table: pd.DataFrame, variant: str, column: str) -> pd.Series:
  """Loss per seed [seeds] of one variant, failed (NaN) runs left out."""
  rows = table[table["variant"] == variant]
  return rows.set_index("seed")[column].dropna().sort_index()


def compare(table: pd.DataFrame, baseline: str, column: str, margin: float = MARGIN,
            confidence: float = CONFIDENCE) -> list[Comparison]:
  """Every variant (the baseline first) against `baseline` on `column`, paired by seed."""
  variants = sorted(set(table["variant"]))
  if baseline not in variants:
    raise ValueError(f"--baseline={baseline!r} is not among the variants in the results: "
                     f"{variants}; pass --baseline=<one of those> (the variant is the point "
                     f"name without its seed<k>_ prefix).")
  if margin < 0:
    raise ValueError(f"--margin={margin} must be >= 0 (in the loss's units, nats).")
  base = _losses(table, baseline, column)
  out = []
  for variant in [baseline] + [v for v in variants if v != baseline]:
    x = _losses(table, variant, column)
    mean = float(x.mean()) if len(x) else float("nan")
    mean_iv = stats.mean_interval(x.to_numpy(), confidence) if len(x) >= 2 else None
    if variant == baseline:
      out.append(Comparison(variant, len(x), mean, mean_iv, len(x), 0.0, None, "(baseline)"))
      continue
    common = x.index.intersection(base.index)
    diff = float((x[common] - base[common]).mean()) if len(common) else float("nan")
    if len(common) < 2:
      out.append(Comparison(variant, len(x), mean, mean_iv, len(common), diff, None,
                            f"{UNKNOWN} ({len(common)} seed(s) shared with {baseline})"))
      continue
    iv = stats.difference_interval(x[common].to_numpy(), base[common].to_numpy(),
                                   confidence, paired=True)
    out.append(Comparison(variant, len(x), mean, mean_iv, len(common), iv.estimate, iv,
                          verdict_text(iv, margin, (variant, baseline))))
  return out


def ablation(df: pd.DataFrame, baseline: str, loss_columns: Sequence[str] = LOSS_COLUMNS,
             margin: float = MARGIN, confidence: float = CONFIDENCE,
             source: str | None = None) -> dict[str, list[Comparison]]:
  """loss column -> `compare` rows, from a results.csv DataFrame."""
  table = variant_table(df, loss_columns, source)
  return {c: compare(table, baseline, c, margin, confidence) for c in loss_columns}


def markdown(results: dict[str, list[Comparison]], baseline: str,
             confidence: float = CONFIDENCE, margin: float = MARGIN,
             source: str = "") -> str:
  """One table per loss column: variant, seeds, mean ± half-width, difference, verdict."""
  pct = f"{confidence:.0%}"
  parts = [f"# Ablation against {baseline}{f' from {source}' if source else ''}", "",
           f"Mean ± half-width of the {pct} interval over seeds; difference = variant - "
           f"{baseline}, paired by seed on the seeds both have, {pct} interval (negative: "
           f"the variant's loss is lower); margin {margin:g}.", ""]
  for column, rows in results.items():
    table = []
    for r in rows:
      if r.mean_interval is not None:
        mean = plus_minus(*r.mean_interval, digits=4)
      else:
        mean = f"{r.mean:.4f}" if r.n_seeds else "-"
      diff = "-" if r.variant == baseline or not np.isfinite(r.difference) \
          else f"{r.difference:+.4f}"
      iv = "-" if r.interval is None else f"[{r.interval.low:+.4f}, {r.interval.high:+.4f}]"
      table.append([r.variant, r.n_seeds, mean, diff, iv,
                    "-" if r.variant == baseline else r.n_common, r.verdict])
    parts += [f"## {column}", "",
              markdown_table(["variant", "seeds", "mean ± half-width", "difference", "interval",
                   "paired seeds", "verdict"], table), ""]
  return "\n".join(parts)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m routing_lm.ablation", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", required=True, help="results.csv from routing_lm.sweep")
  p.add_argument("--baseline", required=True, help="the variant the others are compared to")
  p.add_argument("--loss_column", action="append", default=None,
                 help=f"repeatable; default: {', '.join(LOSS_COLUMNS)}")
  p.add_argument("--margin", type=float, default=MARGIN,
                 help="nats: an interval inside ±margin reads 'equivalent'")
  p.add_argument("--confidence", type=float, default=CONFIDENCE)
  p.add_argument("--out", default=None, help="folder for ablation.md (optional)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  from routing_lm.fit import read_results
  columns = args.loss_column or list(LOSS_COLUMNS)
  try:
    results = ablation(read_results(args.results), args.baseline, columns, args.margin,
                       args.confidence, args.results)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  text = markdown(results, args.baseline, args.confidence, args.margin, args.results)
  print(text)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text + "\n")
    print(f"\nwrote {out / 'ablation.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
