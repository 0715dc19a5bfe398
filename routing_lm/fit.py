"""Fit the scaling laws to a results table: coefficient tables, fits.json and plots.

  python -m routing_lm.fit --results=results.csv --out=fits/
  python -m routing_lm.fit --results=results.csv --out=fits/ --router=sbase,hash
  python -m routing_lm.fit --results=results.csv --out=fits/ --law=granular

--law=routed (default) fits Clark et al.'s law per router, like the paper's Table 3
(paper_spec.md 2.3): the dense rows (num_experts == 1) join every router's fit.
--law=granular fits Krajewski et al.'s Eq. 9 per (router, num_experts) on the routed rows
and, with enough dense rows, the dense law sharing c (finegrained_spec.md section 2).

Besides the coefficients it prints, for each fit: bootstrap intervals (--n_bootstrap
refits, default 1000), the prediction error of refits that did not see the largest size
(and, for the routed law, each E > 1 in turn), and for the routed law the AIC of Eq. 1
against simpler forms (no saturation; dense power laws). All of it is in fits.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import numpy as np
import pandas as pd

from routing_lm import scaling
from routing_lm.scaling import plots


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m routing_lm.fit", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", required=True, help="results.csv from routing_lm.sweep")
  p.add_argument("--out", required=True, help="directory for fits.json and the plots")
  p.add_argument("--law", choices=("routed", "granular"), default="routed")
  p.add_argument("--router", default="", help="comma-separated routers (default: all)")
  p.add_argument("--loss_column", default="val_loss")
  p.add_argument("--n_bootstrap", type=int, default=scaling.N_BOOTSTRAP,
                 help="bootstrap refits on 80%% subsets for the 10-90%% intervals "
                      "(0: none; 10-20 ms per routed refit of 40 runs on 2 cores)")
  p.add_argument("--huber_delta", type=float, default=None,
                 help="routed: Huber delta in log10 loss (default: plain least squares); "
                      "granular: default 0.1 (the paper's)")
  p.add_argument("--holdout_above", type=float, default=None,
                 help="fit on sizes <= this (n_params, or total_params_nonemb for granular) "
                      "and report the error on the larger runs")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_plots", action="store_true")
  return p.parse_args(argv)


def _intervals(name: str, fit: scaling.FitStats) -> list[str]:
  return [name] + [f"[{lo:.4g}, {hi:.4g}]" for lo, hi in fit.intervals.values()]


def _heldout(fit: scaling.FitStats) -> str:
  return "-" if fit.heldout_rmse is None else f"{fit.heldout_rmse:.4f}"


def _bootstrap_title(n_bootstrap: int) -> str:
  if n_bootstrap <= 0:
    return "\nBootstrap: off (--n_bootstrap=0), no intervals."
  return f"\nBootstrap {n_bootstrap} x 80% of the runs, 10-90% intervals:"


def leave_out_table(fits: dict[str, scaling.FitStats], first: str, log: str) -> str:
  """The prediction errors of refits on rows they did not see: largest size, each E out."""
  experts = sorted({e for f in fits.values() for e in f.e_out})
  header = [first, "largest size out", "rows", "RMSE", "|rel err|",
            *[f"E={e:g} out" for e in experts]] + (["RMS over E"] if experts else [])
  rows = []
  for name, f in fits.items():
    h = f.largest_out
    row = [name, "-", "-", "-", "-"] if h is None else [
        name, h.left_out.split("=")[1], h.n_points, f"{h.rmse:.4f}", f"{h.mean_abs_rel:.2%}"]
    row += [f"{f.e_out[e].rmse:.4f}" if e in f.e_out else "-" for e in experts]
    if experts:
      row.append("-" if f.e_out_rms is None else f"{f.e_out_rms:.4f}")
    rows.append(row)
  return (f"\nPrediction error of refits on the runs they did not see (RMSE in {log} loss; "
          f"|rel err| = mean |L_pred / L - 1|; '-': too few runs left to refit):\n"
          + plots.format_table(header, rows))


def aic_table(fits: dict[str, scaling.FitStats]) -> str:
  """Per router: each form's K, RSS, AIC, AICc and ΔAICc; the lowest AICc is preferred."""
  header = ["router", "form", "coeffs", "n", "RSS", "AIC", "AICc", "dAICc", "preferred"]
  rows = []
  for name, f in fits.items():
    if not f.forms:
      rows.append([name, "-", "-", f.n_points, "-", "-", "-", "-", "too few runs"])
      continue
    best = f.forms[f.preferred_form].aicc
    for form in f.forms.values():
      rows.append([name, form.name, form.n_coefficients, form.n_points, f"{form.rss:.3e}",
                   f"{form.aic:.2f}", f"{form.aicc:.2f}", f"{form.aicc - best:.2f}",
                   "<-" if form.name == f.preferred_form
                   else "tie" if form.aicc - best < 2 else ""])
  return ("\nForms: saturating = Eq. 1; no_saturation = Eq. 1 with Ê = E; dense = a log N + d, "
          "E ignored; dense_per_e = a_E log N + d_E for each E.\n"
          "AIC of Eq. 1 against simpler forms (Gaussian: AIC = n ln(RSS/n) + 2K, K = coeffs "
          "+ 1 for the noise; AICc = AIC + 2K(K+1)/(n-K-1); lowest AICc preferred, dAICc < 2 "
          "is a tie):\n" + plots.format_table(header, rows))


def fit_routed_table(df: pd.DataFrame, args: argparse.Namespace, out: pathlib.Path) -> dict:
  """Fit the dense law and each router's routed law; print, plot, return fits.json."""
  scaling.validate_table(df, ["router", "n_params", "num_experts", args.loss_column],
                         positive=["n_params", args.loss_column],
                         at_least_one=["num_experts"], who="routing_lm.fit",
                         source=args.results)
  dense = df[df["num_experts"] == 1]
  routed = df[df["num_experts"] > 1]
  routers = _select_routers(routed, args.router)
  kw = dict(loss_column=args.loss_column, huber_delta=args.huber_delta,
            holdout_above=args.holdout_above, n_bootstrap=args.n_bootstrap, seed=args.seed)
  fits = {r: scaling.fit_routed(pd.concat([dense, routed[routed["router"] == r]]), **kw)
          for r in routers}
  dense_fit = scaling.fit_dense(dense, **kw) if len(dense) >= 2 else None

  header = ["router", "a", "b", "c", "d", "E_start", "E_max", "N_cutoff", "RMSE",
            "heldout", "n"]
  rows = []
  if dense_fit is not None:
    rows.append(["dense", f"{dense_fit.a:.4f}", "", "", f"{dense_fit.d:.4f}", "", "", "",
                 f"{dense_fit.rmse:.4f}", _heldout(dense_fit), dense_fit.n_points])
  for r, f in fits.items():
    rows.append([r, f"{f.a:.4f}", f"{f.b:.4f}", f"{f.c:.4f}", f"{f.d:.4f}",
                 f"{f.e_start:.3f}", f"{f.e_max:.3f}", f"{scaling.cutoff_size(f):.3g}",
                 f"{f.rmse:.4f}", _heldout(f), f.n_points])
  print("Routed law: log10 L = a log10 N + b log10 Ê + c log10 N log10 Ê + d "
        "(paper_spec.md 2.2; RMSE in log10 loss)")
  print(plots.format_table(header, rows))
  if dense_fit is not None:
    print(f"Kaplan form of the dense fit: alpha_N = {dense_fit.alpha_n:.4f}, "
          f"N_c = {dense_fit.n_c:.4g}")
  held = ({"dense": dense_fit} if dense_fit is not None else {}) | fits
  print(leave_out_table(held, "router", "log10"))
  print(aic_table(fits))
  print(_bootstrap_title(args.n_bootstrap))
  if args.n_bootstrap > 0:
    print(plots.format_table(["router", "a", "b", "c", "d", "E_start", "E_max"],
                             [_intervals(r, f) for r, f in fits.items()]))

  if not args.no_plots:
    for r, f in fits.items():
      rows_r = pd.concat([dense, routed[routed["router"] == r]])
      plots.plot_loss_vs_experts(rows_r, f, out / f"{r}_loss_vs_experts.png", args.loss_column)
      plots.plot_loss_vs_params(rows_r, f, out / f"{r}_loss_vs_params.png", args.loss_column)
      plots.plot_iso_loss(f, out / f"{r}_iso_loss.png", df=rows_r)
      plots.plot_effective_params(rows_r, f, out / f"{r}_effective_params.png",
                                  args.loss_column)
  return {"law": "routed", "loss_column": args.loss_column, "n_bootstrap": args.n_bootstrap,
          "dense": None if dense_fit is None else {
              **dense_fit.to_json(), "alpha_n": dense_fit.alpha_n, "n_c": dense_fit.n_c},
          "fits": {r: {**f.to_json(), "router": r,
                       "cutoff_size": scaling.cutoff_size(f)} for r, f in fits.items()}}


def fit_granular_table(df: pd.DataFrame, args: argparse.Namespace, out: pathlib.Path) -> dict:
  """Fit Eq. 9 per (router, num_experts) and the dense law; print, plot, return fits.json."""
  columns = ["router", "num_experts", "total_params_nonemb", "tokens", "granularity",
             args.loss_column]
  scaling.validate_table(df, columns, positive=["total_params_nonemb", "tokens",
                                                args.loss_column],
                         at_least_one=["num_experts", "granularity"], who="routing_lm.fit",
                         source=args.results)
  routed = df[df["num_experts"] > 1]
  routers = _select_routers(routed, args.router)
  kw = dict(loss_column=args.loss_column, holdout_above=args.holdout_above,
            n_bootstrap=args.n_bootstrap, seed=args.seed,
            huber_delta=0.1 if args.huber_delta is None else args.huber_delta)
  fits, meta = {}, {}
  for (router, experts), rows in routed[routed["router"].isin(routers)].groupby(
      ["router", "num_experts"]):
    name = f"{router}_e{int(experts)}"
    if len(rows) < 7:
      print(f"{name}: skipped, {len(rows)} rows < 7 coefficients")
      continue
    fits[name] = scaling.fit_granular(rows, **kw)
    meta[name] = {"router": router, "num_experts": int(experts)}
  if not fits:
    raise ValueError("routing_lm.fit --law=granular: no (router, num_experts) group has the "
                     "7 rows Eq. 9 needs; add runs over N, D and G.")
  dense = df[df["num_experts"] == 1]
  shared_c = next(iter(fits.values())).c if len(fits) == 1 else None
  dense_fit = None
  if len(dense) >= (4 if shared_c else 5):
    dense_fit = scaling.fit_granular(dense, dense=True, c=shared_c, **kw)

  header = ["fit", "E", "a", "alpha", "b", "beta", "g", "gamma", "c", "RMSE", "heldout", "n"]
  rows = [_granular_row(name, meta[name]["num_experts"], f) for name, f in fits.items()]
  if dense_fit is not None:
    rows.append(_granular_row("dense", 1, dense_fit))
  print(f"Granular law: L = c + (g / G^gamma + a) N^-alpha + b D^-beta "
        f"(finegrained_spec.md Eq. 9; {args.loss_column}; RMSE in ln loss)")
  print(plots.format_table(header, rows))
  print(leave_out_table(fits | ({"dense": dense_fit} if dense_fit is not None else {}),
                        "fit", "ln"))
  print(_bootstrap_title(args.n_bootstrap))
  if args.n_bootstrap > 0:
    print(plots.format_table(["fit", "a", "alpha", "b", "beta", "g", "gamma", "c"],
                             [_intervals(n, f) for n, f in fits.items()]))
  if not args.no_plots:
    for name, f in fits.items():
      rows_f = routed[(routed["router"] == meta[name]["router"])
                      & (routed["num_experts"] == meta[name]["num_experts"])]
      plots.plot_granular_loss_vs_g(rows_f, f, out / f"{name}_loss_vs_granularity.png",
                                    args.loss_column)
  return {"law": "granular", "loss_column": args.loss_column, "n_bootstrap": args.n_bootstrap,
          "dense": None if dense_fit is None else dense_fit.to_json(),
          "fits": {n: {**f.to_json(), **meta[n]} for n, f in fits.items()}}


def _granular_row(name: str, num_experts: int, fit: scaling.GranularFit) -> list:
  values = [f"{v:.4g}" for v in scaling.coefficients(fit).values()]
  return [name, num_experts, *values, f"{fit.rmse:.4f}", _heldout(fit), fit.n_points]


def _select_routers(routed: pd.DataFrame, wanted: str) -> list[str]:
  present = sorted(routed["router"].astype(str).unique())
  if not wanted:
    if not present:
      raise ValueError("routing_lm.fit: the table has no routed rows (num_experts > 1).")
    return present
  routers = [r.strip() for r in wanted.split(",") if r.strip()]
  missing = [r for r in routers if r not in present]
  if missing:
    raise ValueError(f"routing_lm.fit: --router {missing} has no routed rows; the table "
                     f"has {present}.")
  return routers


def read_results(path: str) -> pd.DataFrame:
  """results.csv as a DataFrame; ValueError naming the file if it is empty or not a table."""
  try:
    return pd.read_csv(path)
  except pd.errors.EmptyDataError:
    raise ValueError(f"--results={path} is empty (no header, no rows); point it at the "
                     f"results.csv that python -m routing_lm.sweep writes, after a run "
                     f"has finished.") from None
  except (pd.errors.ParserError, UnicodeDecodeError) as e:
    raise ValueError(f"--results={path} is not a CSV table ({e}); point it at the "
                     f"results.csv that python -m routing_lm.sweep writes.") from None


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  out = pathlib.Path(args.out)
  try:
    df = read_results(args.results)
    run = fit_routed_table if args.law == "routed" else fit_granular_table
    result = run(df, args, out)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out.mkdir(parents=True, exist_ok=True)
  result["results"] = str(args.results)
  (out / "fits.json").write_text(json.dumps(result, indent=1, default=json_default))
  print(f"\nwrote {out / 'fits.json'}")
  return 0


def json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
  sys.exit(main())
