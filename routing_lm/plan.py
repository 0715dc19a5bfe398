"""Plan models for a budget under a published or fitted scaling law.

  python -m routing_lm.plan --law=krajewski_e64 --flops=1e19,1e21,1e23
  python -m routing_lm.plan --law=sbase --flops_per_token=2.6e8 --total_params=1e9,1e10
  python -m routing_lm.plan --fits=fits/fits.json --flops=1e20        # granular fits
  python -m routing_lm.plan --fits=fits/fits.json --fit=sbase --flops_per_token=2.6e8

Granular laws (Krajewski et al.; finegrained_spec.md section 3) take training FLOPs and
print a table like the spec's Table 2, plus the training FLOPs a compute-optimal dense
model needs to reach the same loss. Routed laws (Clark et al.; paper_spec.md section 2)
take inference FLOPs per token and/or total parameters and print the best (N, E) with
the dense size N̄ that matches it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Sequence

from routing_lm import scaling
from routing_lm.scaling.plots import format_count, format_table

_LAWS = sorted([k for k in scaling.KRAJEWSKI if k != "krajewski_dense"]
               + list(scaling.PUBLISHED))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m routing_lm.plan", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--law", choices=_LAWS, default=None,
                 help="a published law (default krajewski_e64 unless --fits is given)")
  p.add_argument("--fits", default=None, help="fits.json written by routing_lm.fit")
  p.add_argument("--fit", default=None, help="which fit in --fits (default: the first)")
  p.add_argument("--flops", default="", help="granular: comma-separated training FLOPs")
  p.add_argument("--num_experts", type=int, default=None,
                 help="granular: expansion rate E (default: the law's)")
  p.add_argument("--flops_per_token", default="",
                 help="routed: comma-separated inference FLOPs per token")
  p.add_argument("--total_params", default="", help="routed: comma-separated budgets of P")
  return p.parse_args(argv)


def _floats(text: str, flag: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--{flag}={text!r}: expected comma-separated numbers like 1e19,1e21.")
  if any(v <= 0 for v in values):
    raise ValueError(f"--{flag}={text!r}: budgets must be > 0.")
  return values


def load_law(args: argparse.Namespace) -> tuple[str, str, object, object, int]:
  """(kind, name, coeffs, dense coeffs or None, num_experts) from --law or --fits."""
  if args.fits:
    fits = read_fits(args.fits)
    name = args.fit or next(iter(fits["fits"]))
    if name not in fits["fits"]:
      raise ValueError(f"--fit={name}: not in {args.fits}; it has {list(fits['fits'])}.")
    entry = fits["fits"][name]
    if fits["law"] == "routed":
      coeffs = _coefficients(scaling.RoutedCoeffs, entry, f"fit '{name}'", args.fits)
      return "routed", name, coeffs, None, 0
    dense = fits.get("dense")
    dense = (_coefficients(scaling.GranularCoeffs, dense, "the dense fit", args.fits)
             if dense else None)
    return ("granular", name,
            _coefficients(scaling.GranularCoeffs, entry, f"fit '{name}'", args.fits), dense,
            int(entry["num_experts"]))
  law = args.law or "krajewski_e64"
  if law in scaling.PUBLISHED:
    return "routed", law, scaling.PUBLISHED[law], None, 0
  return ("granular", law, scaling.KRAJEWSKI[law], scaling.KRAJEWSKI_DENSE,
          scaling.KRAJEWSKI_NUM_EXPERTS[law])


_FIT_HINT = ("pass the fits.json that `python -m routing_lm.fit --results=results.csv "
             "--out=DIR` writes (DIR/fits.json)")


def read_fits(path: str) -> dict:
  """fits.json written by routing_lm.fit; ValueError naming the file and the fix otherwise."""
  with open(path) as f:
    text = f.read()
  if not text.strip():
    raise ValueError(f"--fits={path} is empty; {_FIT_HINT}.")
  try:
    fits = json.loads(text)
  except json.JSONDecodeError as e:
    first = text.splitlines()[0]
    looks_csv = "," in first and ("val_loss" in first or path.endswith(".csv"))
    kind = "a results table (CSV), not fits" if looks_csv else f"not JSON ({e})"
    raise ValueError(f"--fits={path} is {kind}; {_FIT_HINT}.") from None
  if not isinstance(fits, dict) or fits.get("law") not in ("routed", "granular"):
    raise ValueError(f"--fits={path} has no 'law' of 'routed' or 'granular'; {_FIT_HINT}.")
  if not isinstance(fits.get("fits"), dict) or not fits["fits"]:
    raise ValueError(f"--fits={path}: no fits in the file; refit with routing_lm.fit on a "
                     f"results.csv with routed runs (num_experts > 1).")
  return fits


def _coefficients(cls: type, entry: dict, what: str, path: str):
  """cls(**entry['coefficients']) after checking that every coefficient is a finite number."""
  names = [f.name for f in dataclasses.fields(cls)]
  values = entry.get("coefficients") if isinstance(entry, dict) else None
  if not isinstance(values, dict) or set(values) != set(names):
    raise ValueError(f"--fits={path}: {what} needs coefficients {names}, got "
                     f"{None if values is None else sorted(values)}; {_FIT_HINT}.")
  for k in names:
    v = values[k]
    if not isinstance(v, (int, float)) or not math.isfinite(v):
      raise ValueError(f"--fits={path}: {what} has coefficient {k} = {v}; the fit failed "
                       f"(NaN/inf in results.csv, or too few runs). Rerun routing_lm.fit on "
                       f"a complete results.csv, or choose another --fit.")
  return cls(**{k: float(values[k]) for k in names})


def granular_report(name: str, coeffs, dense, num_experts: int, budgets: list[float]) -> str:
  """Table 2 of finegrained_spec.md for `budgets`, with the matching dense compute."""
  rows = []
  for flops in budgets:
    p = scaling.optimal_granular(flops, coeffs, num_experts=num_experts)
    if dense is None:
      dense_flops = ratio = "-"
    else:
      f = scaling.dense_flops_for_loss(p.loss, dense)
      dense_flops, ratio = f"{f:.3g}", f"{f / flops:.2f}x"
    rows.append([f"{flops:.3g}", f"{num_experts} x {format_count(p.active_params)}",
                 format_count(p.total_params), format_count(p.tokens), p.granularity,
                 f"{p.d_model:.0f}", f"{p.n_blocks:.1f}", f"{p.loss:.3f}", dense_flops, ratio])
  header = ["FLOPs", "E x N_act", "N_total", "D", "G", "d_model", "n_blocks", "loss",
            "dense FLOPs, same loss", "dense/MoE"]
  return (f"Compute-optimal fine-grained MoE, law {name} (Eq. 9; FLOPs by Eq. 10; "
          f"n_blocks = d_model / 64; G over powers of two)\n" + format_table(header, rows))


def routed_report(name: str, coeffs, flops_per_token: list[float],
                  total_params: list[float]) -> str:
  """Best (N, E) per budget under Clark's law, with the dense size N̄ that matches it."""
  budgets = ([("F/token", f, dict(flops_per_token=f)) for f in flops_per_token]
             + [("P", p, dict(total_params=p)) for p in total_params])
  rows = []
  for kind, value, kw in budgets:
    p = scaling.optimal_routed(coeffs, **kw)
    rows.append([f"{kind} = {value:.3g}", format_count(p.n_params), p.num_experts,
                 format_count(p.total_params), f"{p.flops_per_token:.3g}", f"{p.loss:.4f}",
                 format_count(p.dense_params), f"{p.dense_flops_per_token:.3g}",
                 f"{p.dense_loss:.4f}"])
  header = ["budget", "N", "E", "P", "F/token", "loss", "dense N̄ (same loss)",
            "its F/token", "dense loss (same budget)"]
  return (f"Best routed model, law {name} (paper_spec.md 2.2; E in 1..512, R = 0.5, "
          f"F = 2N per token)\n" + format_table(header, rows))


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  try:
    kind, name, coeffs, dense, num_experts = load_law(args)
    if kind == "granular":
      budgets = _floats(args.flops, "flops")
      if not budgets:
        raise ValueError(f"law {name} is a granular law: give --flops=<training FLOPs,...>.")
      print(granular_report(name, coeffs, dense, args.num_experts or num_experts, budgets))
    else:
      f_budgets = _floats(args.flops_per_token, "flops_per_token")
      p_budgets = _floats(args.total_params, "total_params")
      if not f_budgets and not p_budgets:
        raise ValueError(f"law {name} is a routed law: give --flops_per_token and/or "
                         f"--total_params.")
      print(routed_report(name, coeffs, f_budgets, p_budgets))
  except (ValueError, OSError, KeyError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
