"""Fit the scaling laws of laws.py to a results table (the `results.csv` columns).

- fit_dense:    log10 L = a log10 N + d            (paper_spec.md section 2.1)
- fit_routed:   Clark et al.'s Eq. 1 with Ê         (paper_spec.md section 2.2)
- fit_granular: Krajewski et al.'s Eq. 9             (finegrained_spec.md section 2)

Each returns its law's coefficient set (usable wherever the law takes `coeffs`) with the
fit statistics of `FitStats` attached: RMSE and residuals of the log-loss, bootstrap
percentile intervals (N_BOOTSTRAP = 1000 refits by default), the prediction error of refits
that left out the largest size (and, for the routed law, each E > 1), the AIC of the routed
law against simpler forms, and, in held-out mode, the error on the larger models.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize

from routing_lm.scaling import laws, stats


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Prediction error on rows that a refit did not see.

  rmse is in the law's own log-loss (log10 for Clark's laws, ln for Krajewski's);
  mean_abs_rel is mean |L_predicted / L - 1|; residuals [n_points] are observed - predicted.
  """
  left_out: str
  n_points: int
  rmse: float
  mean_abs_rel: float
  residuals: np.ndarray = dataclasses.field(repr=False)

  def to_json(self) -> dict:
    return {"left_out": self.left_out, "n_points": int(self.n_points),
            "rmse": float(self.rmse), "mean_abs_rel": float(self.mean_abs_rel)}


@dataclasses.dataclass(frozen=True)
class FormFit:
  """One candidate form of the AIC comparison (stats.gaussian_aic on its RSS).

  n_coefficients excludes the noise variance (gaussian_aic adds it).
  """
  name: str
  description: str
  n_coefficients: int
  n_points: int
  rss: float
  aic: float
  aicc: float

  def to_json(self) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v)
            for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class FitStats:
  """Statistics attached to a fitted coefficient set.

  rmse and residuals (observed - predicted) are in the law's own log-loss: log10 for
  Clark's laws, natural log for Krajewski's. intervals maps each coefficient to its
  (low, high) bootstrap percentiles over n_bootstrap refits. With `holdout_above`, the
  heldout_* fields describe the rows above that size, which the fit did not see.

  Out-of-sample checks, each a refit (full multi-start, not warm-started from the full fit)
  on the rows that remain, predicting the rows left out:
  - largest_out: the rows of the largest size (n_params; total_params_nonemb for Eq. 9);
  - e_out: routed law only, one per E > 1: the rows of that E;
  None (or absent from e_out) where the rows that remain cannot identify the law.
  forms (routed law only): the AIC comparison of the law against simpler forms; the
  preferred form has the lowest AICc.
  """
  rmse: float
  residuals: np.ndarray = dataclasses.field(repr=False)
  n_points: int
  intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict,
                                                               repr=False)
  heldout_rmse: float | None = None
  heldout_residuals: np.ndarray | None = dataclasses.field(default=None, repr=False)
  n_bootstrap: int = 0
  largest_out: HeldOut | None = dataclasses.field(default=None, repr=False)
  e_out: dict[float, HeldOut] = dataclasses.field(default_factory=dict, repr=False)
  forms: dict[str, FormFit] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def e_out_rms(self) -> float | None:
    """RMS over E of the leave-one-E-out RMSEs (each E weighs the same)."""
    if not self.e_out:
      return None
    return float(np.sqrt(np.mean([h.rmse**2 for h in self.e_out.values()])))

  @property
  def preferred_form(self) -> str | None:
    """The form of lowest AICc (None without a comparison)."""
    if not self.forms:
      return None
    return min(self.forms.values(), key=lambda f: f.aicc).name

  def to_json(self) -> dict:
    """A JSON-serialisable summary: coefficients, statistics and intervals."""
    out = {"coefficients": laws.coefficients(self), "rmse": float(self.rmse),
           "n_points": int(self.n_points), "n_bootstrap": int(self.n_bootstrap),
           "intervals": {k: [float(lo), float(hi)] for k, (lo, hi) in self.intervals.items()}}
    if self.heldout_rmse is not None:
      out["heldout_rmse"] = float(self.heldout_rmse)
      out["heldout_points"] = int(len(self.heldout_residuals))
    out["largest_out"] = None if self.largest_out is None else self.largest_out.to_json()
    if self.e_out:
      out["e_out"] = {f"{e:g}": h.to_json() for e, h in self.e_out.items()}
      out["e_out_rms"] = self.e_out_rms
    if self.forms:
      out["aic"] = {name: f.to_json() for name, f in self.forms.items()}
      out["preferred_form"] = self.preferred_form
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class DenseFit(laws.DenseCoeffs, FitStats):
  """Fitted dense law (a, d; alpha_n and n_c in Kaplan form) with its FitStats."""


@dataclasses.dataclass(frozen=True, eq=False)
class RoutedFit(laws.RoutedCoeffs, FitStats):
  """Fitted routed law (a, b, c, d, e_start, e_max) with its FitStats."""


@dataclasses.dataclass(frozen=True, eq=False)
class GranularFit(laws.GranularCoeffs, FitStats):
  """Fitted granular law (a, alpha, b, beta, g, gamma, c) with its FitStats."""


# ---------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------
def validate_table(df: pd.DataFrame, columns: Sequence[str], *, positive: Sequence[str] = (),
                   at_least_one: Sequence[str] = (), min_rows: int = 1,
                   text: Sequence[str] = ("router",), who: str = "fit",
                   source: str | None = None) -> pd.DataFrame:
  """Check a results table; return a copy with `columns` (except `text` ones) as floats.

  Raises ValueError naming the column, the bad value and its row, and the fix. `source`,
  the CSV file the table was read from (header on line 1), adds the file and line.
  """
  if not isinstance(df, pd.DataFrame):
    raise TypeError(f"{who} expects a pandas DataFrame with the results.csv columns, "
                    f"got {type(df).__name__}.")
  where = "" if source is None else f" of {source}"

  def row(i: int) -> str:
    return f"row {i}" if source is None else f"row {i} (line {i + 2} of {source})"

  missing = [c for c in columns if c not in df.columns]
  if missing:
    raise ValueError(f"{who}: the table{where} is missing column(s) {missing} (it has "
                     f"{list(df.columns)}); add them (results.csv contract) or rename yours.")
  if len(df) == 0 and source is not None:
    raise ValueError(f"{who}: {source} has no rows (only a header): no run has finished "
                     f"yet. Run the sweep (python -m routing_lm.sweep) first.")
  out = df.reset_index(drop=True).copy()
  for col in (c for c in columns if c not in text):
    values = pd.to_numeric(out[col], errors="coerce")
    bad = values.isna() & out[col].notna()
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(f"{who}: column '{col}' must be numeric; {row(i)} has "
                       f"{out[col][i]!r}.")
    if not np.isfinite(values).all():
      nonfinite = np.flatnonzero(~np.isfinite(values))
      i = int(nonfinite[0])
      raise ValueError(f"{who}: column '{col}' is empty or infinite ({values[i]}) in {row(i)}"
                       f" ({len(nonfinite)} of {len(values)} rows); a failed or diverged run "
                       f"leaves it empty: rerun it, or drop or fill that row before fitting.")
    out[col] = values.astype(float)
  rules = ([(c, "> 0", lambda v: v <= 0) for c in positive]
           + [(c, ">= 1", lambda v: v < 1) for c in at_least_one])
  for col, rule, is_bad in rules:
    bad = is_bad(out[col].to_numpy())
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      hint = {"num_experts": " (E = 1 is the dense model)",
              "granularity": " (G = 1 is a standard MoE)"}.get(col, "")
      raise ValueError(f"{who}: column '{col}' must be {rule}{hint}; {row(i)} has "
                       f"{out[col][i]:g}. Fix or drop that row.")
  if len(out) < min_rows:
    raise ValueError(f"{who}: {len(out)} rows is fewer than the {min_rows} coefficients to "
                     f"fit; add runs (more sizes N or expert counts E).")
  return out


def _split(df: pd.DataFrame, size_column: str,
           holdout_above: float | None) -> tuple[pd.DataFrame, pd.DataFrame]:
  if holdout_above is None:
    return df, df.iloc[:0]
  keep = df[size_column] <= holdout_above
  return df[keep].reset_index(drop=True), df[~keep].reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# Shared driver: fit, residuals, bootstrap, held-out error.
# ---------------------------------------------------------------------------------------
# solve(frame, init) -> (theta, coefficient set); init None means the full multi-start.
Solver = Callable[[pd.DataFrame, "np.ndarray | None"], tuple[np.ndarray, object]]
Residuals = Callable[[object, pd.DataFrame], np.ndarray]
# forms(frame, residuals of the full law) -> {name: FormFit}.
Forms = Callable[[pd.DataFrame, np.ndarray], dict]

# The default bootstrap resample count (functions and the routing_lm.fit CLI).
N_BOOTSTRAP = 1000


@dataclasses.dataclass(frozen=True)
class _Law:
  """What the driver needs to know about a law besides its solver.

  size_column: the size whose largest value is left out; distinct: columns that need
  >= 2 distinct values for the law to be identified; log_base: of the law's log-loss;
  group_column: leave each value > 1 of it out in turn (the routed law's num_experts).
  """
  min_rows: int
  size_column: str
  distinct: tuple[str, ...]
  log_base: float
  group_column: str | None = None


def _fit_and_report(fit_cls: type, solve: Solver, residuals: Residuals, train: pd.DataFrame,
                    test: pd.DataFrame, law: _Law, *, n_bootstrap: int,
                    percentiles: tuple[float, float], seed: int,
                    bootstrap_fraction: float = 0.8, leave_out: bool = True,
                    forms: Forms | None = None):
  """Fit on `train`; attach residuals, bootstrap intervals, held-out errors and AIC.

  The bootstrap refits on `n_bootstrap` random subsets of `bootstrap_fraction` of the rows
  (as Krajewski et al. do, finegrained_spec.md section 2), each started from the full fit.
  The leave-out refits (largest size; each E > 1 with law.group_column) start from scratch:
  a warm start from the full fit would carry information from the rows left out.
  leave_out=False skips them (each is a full fit).
  """
  if n_bootstrap < 0:
    raise ValueError(f"n_bootstrap={n_bootstrap} must be >= 0 (0 skips the bootstrap).")
  theta, coeffs = solve(train, None)
  res = residuals(coeffs, train)
  intervals = {}
  if n_bootstrap > 0:
    rng = np.random.default_rng(seed)
    size = max(law.min_rows, int(round(bootstrap_fraction * len(train))))
    samples = []
    for _ in range(n_bootstrap):
      rows = np.sort(rng.choice(len(train), size=size, replace=False))
      samples.append(laws.coefficients(solve(train.iloc[rows], theta)[1]))
    for name in laws.coefficient_names(coeffs):
      lo, hi = np.percentile([s[name] for s in samples], percentiles)
      intervals[name] = (float(lo), float(hi))
  sizes = train[law.size_column]
  largest = None
  if leave_out:
    largest = _leave_out(solve, residuals, train, sizes == sizes.max(), law,
                         f"{law.size_column}={sizes.max():.3g}")
  e_out = {}
  if leave_out and law.group_column is not None:
    for value in sorted(v for v in train[law.group_column].unique() if v > 1):
      held = _leave_out(solve, residuals, train, train[law.group_column] == value, law,
                        f"{law.group_column}={value:g}")
      if held is not None:
        e_out[float(value)] = held
  held = residuals(coeffs, test) if len(test) else None
  return fit_cls(
      **laws.coefficients(coeffs), rmse=_rms(res), residuals=res,
      n_points=len(train), intervals=intervals,
      heldout_rmse=None if held is None else _rms(held),
      heldout_residuals=held, n_bootstrap=n_bootstrap, largest_out=largest, e_out=e_out,
      forms={} if forms is None else forms(train, res))


def _rms(x: np.ndarray) -> float:
  return float(np.sqrt(np.mean(np.square(x))))


def _leave_out(solve: Solver, residuals: Residuals, frame: pd.DataFrame, out: pd.Series,
               law: _Law, label: str) -> HeldOut | None:
  """Refit without the rows `out` [rows] and predict them; None if the rest is too thin."""
  keep = frame[~out.to_numpy()].reset_index(drop=True)
  left = frame[out.to_numpy()].reset_index(drop=True)
  if (len(keep) < law.min_rows or not len(left)
      or any(keep[c].nunique() < 2 for c in law.distinct)):
    return None
  r = residuals(solve(keep, None)[1], left)
  return HeldOut(left_out=label, n_points=len(left), rmse=_rms(r),
                 mean_abs_rel=float(np.mean(np.abs(law.log_base**(-r) - 1.0))), residuals=r)


def _least_squares(residual_fn, x0, huber_delta: float | None, **kw):
  loss = "linear" if huber_delta is None else "huber"
  return optimize.least_squares(residual_fn, x0, loss=loss, f_scale=huber_delta or 1.0,
                                x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12, **kw)


# ---------------------------------------------------------------------------------------
# Clark et al.: dense and routed laws (log10).
# ---------------------------------------------------------------------------------------
def fit_dense(df: pd.DataFrame, *, loss_column: str = "val_loss",
              huber_delta: float | None = None, holdout_above: float | None = None,
              n_bootstrap: int = N_BOOTSTRAP, percentiles: tuple[float, float] = (10.0, 90.0),
              seed: int = 0, leave_out: bool = True) -> DenseFit:
  """Fit log10 L = a log10 N + d (paper_spec.md section 2.1) on the dense rows.

  Uses `n_params` and the loss column; when the table has `num_experts`, only the rows
  with num_experts == 1 are used. huber_delta (in log10 loss) switches to a Huber loss.
  """
  who = "fit_dense"
  if "num_experts" in df.columns:
    df = validate_table(df, ["num_experts"], at_least_one=["num_experts"], who=who)
    df = df[df["num_experts"] == 1]
  table = validate_table(df, ["n_params", loss_column], positive=["n_params", loss_column],
                         min_rows=2, who=who)
  train, test = _split(table, "n_params", holdout_above)
  _need_rows(train, 2, who, holdout_above)

  def residuals(coeffs, frame):
    return np.log10(frame[loss_column].to_numpy()) - laws.dense_log_loss(
        frame["n_params"].to_numpy(), coeffs)

  def solve(frame, init):
    lx, ly = np.log10(frame["n_params"].to_numpy()), np.log10(frame[loss_column].to_numpy())
    theta = np.polyfit(lx, ly, 1) if init is None else init
    if huber_delta is not None:
      theta = _least_squares(lambda t: t[0] * lx + t[1] - ly, theta, huber_delta).x
    return theta, laws.DenseCoeffs(a=float(theta[0]), d=float(theta[1]))

  return _fit_and_report(DenseFit, solve, residuals, train, test,
                         _Law(min_rows=2, size_column="n_params", distinct=("n_params",),
                              log_base=10.0),
                         n_bootstrap=n_bootstrap, percentiles=percentiles, seed=seed,
                         leave_out=leave_out)


def fit_routed(df: pd.DataFrame, *, loss_column: str = "val_loss",
               huber_delta: float | None = None, holdout_above: float | None = None,
               e_start_bounds: tuple[float, float] = (1.0, 16.0),
               e_max_bounds: tuple[float, float] = (16.0, 1e5),
               n_bootstrap: int = N_BOOTSTRAP, percentiles: tuple[float, float] = (10.0, 90.0),
               seed: int = 0, leave_out: bool = True) -> RoutedFit:
  """Fit Clark et al.'s Eq. 1 (paper_spec.md section 2.2) to one router's rows.

  Columns: `n_params` (N), `num_experts` (E; rows with E = 1 are the dense models) and the
  loss column. Least squares on log10 L (Huber with huber_delta, in log10 units, if set),
  started from a grid of (E_start, E_max) with a, b, c, d solved linearly for each, within
  the given bounds (E_start < E_max is kept by the bounds not overlapping). The Jacobian
  is analytic (_log_e_hat_and_grad): it halves the cost of the bootstrap refits.
  Attached beyond FitStats' basics: largest_out, e_out (leave each E > 1 out) and forms
  (AIC against no saturation and dense power laws, _routed_forms).
  """
  who = "fit_routed"
  table = validate_table(df, ["n_params", "num_experts", loss_column],
                         positive=["n_params", loss_column], at_least_one=["num_experts"],
                         min_rows=6, who=who)
  if "router" in df.columns:
    routed = table["num_experts"].to_numpy() > 1
    routers = sorted(set(df["router"].astype(str).to_numpy()[routed]))
    if len(routers) > 1:
      raise ValueError(f"{who}: fits one router at a time; the table's routed rows have "
                       f"router in {routers}. Filter, e.g. df[df.router == '{routers[0]}'] "
                       f"plus the dense rows (num_experts == 1).")
  if e_start_bounds[1] > e_max_bounds[0]:
    raise ValueError(f"{who}: e_start_bounds={e_start_bounds} overlaps "
                     f"e_max_bounds={e_max_bounds}; Ê needs E_start < E_max.")
  train, test = _split(table, "n_params", holdout_above)
  _need_rows(train, 6, who, holdout_above)
  for col in ("n_params", "num_experts"):
    if train[col].nunique() < 2:
      raise ValueError(f"{who}: needs at least 2 distinct values of '{col}', got "
                       f"{[f'{v:g}' for v in sorted(train[col].unique())]}; the law is "
                       f"bilinear in log N and log Ê.")
  lower = np.r_[[-np.inf] * 4, np.log10([e_start_bounds[0], e_max_bounds[0]])]
  upper = np.r_[[np.inf] * 4, np.log10([e_start_bounds[1], e_max_bounds[1]])]

  def to_coeffs(theta):
    a, b, c, d, log_es, log_em = map(float, theta)
    return laws.RoutedCoeffs(a=a, b=b, c=c, d=d, e_start=10**log_es, e_max=10**log_em)

  def residuals(coeffs, frame):
    return np.log10(frame[loss_column].to_numpy()) - laws.routed_log_loss(
        frame["n_params"].to_numpy(), frame["num_experts"].to_numpy(), coeffs)

  def solve(frame, init):
    lx, e = np.log10(frame["n_params"].to_numpy()), frame["num_experts"].to_numpy()
    ly = np.log10(frame[loss_column].to_numpy())

    def resid(theta):
      log_e = np.log10(laws.e_hat(e, 10**theta[4], 10**theta[5]))
      return laws.bilinear_log_loss(lx, log_e, *theta[:4]) - ly

    def jac(theta):
      log_e, d_log_e = _log_e_hat_and_grad(e, theta[4], theta[5])
      slope = theta[1] + theta[2] * lx  # d residual / d log10 Ê
      return np.column_stack([lx, log_e, lx * log_e, np.ones_like(lx),
                              slope * d_log_e[0], slope * d_log_e[1]])

    starts = [init] if init is not None else [
        np.r_[_linear_abcd(lx, e, ly, es, em), np.log10([es, em])]
        for es, em in itertools.product(
            np.geomspace(*e_start_bounds, 4)[:-1] * 1.2, np.geomspace(*e_max_bounds, 5)[1:-1])]
    best = min((_least_squares(resid, np.clip(s, lower, upper), huber_delta, jac=jac,
                               bounds=(lower, upper)) for s in starts), key=lambda r: r.cost)
    return best.x, to_coeffs(best.x)

  def forms(frame, full_residuals):
    return _routed_forms(frame, loss_column, full_residuals, huber_delta)

  return _fit_and_report(RoutedFit, solve, residuals, train, test,
                         _Law(min_rows=6, size_column="n_params",
                              distinct=("n_params", "num_experts"), log_base=10.0,
                              group_column="num_experts"),
                         n_bootstrap=n_bootstrap, percentiles=percentiles, seed=seed,
                         leave_out=leave_out, forms=forms)


def _log_e_hat_and_grad(e: np.ndarray, log_es: float,
                        log_em: float) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
  """log10 Ê [rows] and its derivatives by log10 E_start and log10 E_max [rows] each.

  With s = (1/E_start - 1/E_max)^-1, u = E - 1 + s and q = 1/u + 1/E_max, Ê = 1/q
  (paper_spec.md section 2.2), so d log10 Ê / d log10 E_start = s^2 / (E_start u^2 q) and
  d log10 Ê / d log10 E_max = (1 - s^2 / u^2) / (E_max q).
  """
  es, em = 10.0**log_es, 10.0**log_em
  s = 1.0 / (1.0 / es - 1.0 / em)
  u = e - 1.0 + s
  q = 1.0 / u + 1.0 / em
  ratio = (s / u)**2
  return -np.log10(q), (ratio / (es * q), (1.0 - ratio) / (em * q))


def _routed_forms(frame: pd.DataFrame, loss_column: str, full_residuals: np.ndarray,
                  huber_delta: float | None) -> dict[str, FormFit]:
  """The routed law against simpler forms, by stats.gaussian_aic on each form's RSS.

  - saturating:    Eq. 1 with Ê (a, b, c, d, E_start, E_max: 6 coefficients);
  - no_saturation: log10 L = a log10 N + b log10 E + c log10 N log10 E + d (4), i.e. Eq. 1
                   with Ê = E (E_start = 1, E_max -> infinity): nested in the full law;
  - dense:         log10 L = a log10 N + d on every row, E ignored (2): routing does nothing;
  - dense_per_e:   a separate power law a_E log10 N + d_E per E (2 per E), no law across E;
                   present only when every E has >= 2 distinct N.
  Each form is fitted with the same loss as the full law (least squares, or Huber with
  huber_delta; the Gaussian likelihood behind AIC is exact only for least squares). A form
  enters only with n > K + 1 points (K = coefficients + 1), where its AICc is defined; with
  fewer than 9 rows there is no comparison ({}).
  """
  lx = np.log10(frame["n_params"].to_numpy())
  e = frame["num_experts"].to_numpy()
  ly = np.log10(frame[loss_column].to_numpy())
  le = np.log10(e)
  ones = np.ones_like(lx)
  designs = {"no_saturation": ("Ê = E: a log N + b log E + c log N log E + d",
                               np.column_stack([lx, le, lx * le, ones])),
             "dense": ("one power law a log N + d, E ignored", np.column_stack([lx, ones]))}
  groups = np.unique(e)
  if all(len(np.unique(lx[e == g])) >= 2 for g in groups):
    blocks = [np.column_stack([lx * (e == g), (e == g).astype(float)]) for g in groups]
    designs["dense_per_e"] = ("a power law a_E log N + d_E per E", np.hstack(blocks))
  n = len(frame)
  if n <= 6 + 2:  # AICc needs n > K + 1 with K = 6 coefficients + the noise variance
    return {}
  rss = {"saturating": ("Eq. 1 with saturating Ê", 6, float(np.sum(full_residuals**2)))}
  for name, (text, design) in designs.items():
    if n <= design.shape[1] + 2:  # no residual degrees of freedom left for AICc
      continue
    coef = np.linalg.lstsq(design, ly, rcond=None)[0]
    if huber_delta is not None:
      coef = _least_squares(lambda t: design @ t - ly, coef, huber_delta).x
    rss[name] = (text, design.shape[1], float(np.sum((design @ coef - ly)**2)))
  return {name: FormFit(name, text, k, n, r, *stats.gaussian_aic(r, n, k))
          for name, (text, k, r) in rss.items()}


def _linear_abcd(lx, e, ly, e_start, e_max) -> np.ndarray:
  """a, b, c, d by linear least squares for fixed (E_start, E_max): a start point."""
  le = np.log10(laws.e_hat(e, e_start, e_max))
  design = np.stack([lx, le, lx * le, np.ones_like(lx)], axis=1)
  return np.linalg.lstsq(design, ly, rcond=None)[0]


def _need_rows(train: pd.DataFrame, n: int, who: str, holdout_above: float | None) -> None:
  if len(train) < n:
    raise ValueError(f"{who}: {len(train)} rows at or below holdout_above={holdout_above} "
                     f"is fewer than the {n} coefficients; raise holdout_above.")


# ---------------------------------------------------------------------------------------
# Krajewski et al.: the granular law (natural log).
# ---------------------------------------------------------------------------------------
# theta = (ln a, alpha, ln b, beta, ln g, gamma, ln c): the log-sum-exp form keeps a, b, g
# and c >= 0 (c is an entropy floor, finegrained_spec.md section 2) without bounds.
_GRANULAR_NAMES = ("a", "alpha", "b", "beta", "g", "gamma", "c")
_LOG_PARAMS = (0, 2, 4, 6)


def _theta_to_coeffs(theta: np.ndarray) -> laws.GranularCoeffs:
  values = [float(np.exp(v)) if i in _LOG_PARAMS else float(v) for i, v in enumerate(theta)]
  return laws.GranularCoeffs(**dict(zip(_GRANULAR_NAMES, values)))


def _granular_terms(theta, ln_n, ln_d, ln_g) -> np.ndarray:
  ln_a, alpha, ln_b, beta, ln_gc, gamma, ln_c = theta
  return np.stack([ln_a - alpha * ln_n, ln_gc - gamma * ln_g - alpha * ln_n,
                   ln_b - beta * ln_d, np.full_like(ln_n, ln_c)])


def fit_granular(df: pd.DataFrame, loss_column: str = "val_loss", *,
                 huber_delta: float = 0.1, dense: bool = False, c: float | None = None,
                 holdout_above: float | None = None, n_starts: int = 4,
                 n_bootstrap: int = N_BOOTSTRAP,
                 percentiles: tuple[float, float] = (10.0, 90.0), seed: int = 0,
                 leave_out: bool = True) -> GranularFit:
  """Fit Eq. 9 (finegrained_spec.md section 2) to one expansion rate's runs.

  Columns: `total_params_nonemb` (N), `tokens` (D), `granularity` (G) and the loss column;
  an optional `d_ff` column is checked for divisibility by G. As in the paper: Huber loss
  (delta 0.1) on ln L against ln L_hat, BFGS, several initialisations (a grid over the
  exponents with a, g, b, c solved by non-negative least squares; BFGS from the
  `n_starts` best). dense=True fits c + a/N^alpha + b/D^beta (g = gamma = 0, no
  granularity column needed); `c` fixes the floor (the paper shares c with the MoE fit).
  holdout_above is a total_params_nonemb threshold.
  """
  who = "fit_granular"
  if c is not None and c <= 0:
    raise ValueError(f"{who}: c={c} must be > 0 (the loss floor).")
  free = np.array([True, True, True, True, not dense, not dense, c is None])
  fixed = np.array([0.0, 0.0, 0.0, 0.0, -np.inf if dense else 0.0, 0.0,
                    -np.inf if c is None else np.log(c)])
  n_free = int(free.sum())
  columns = ["total_params_nonemb", "tokens", loss_column] + ([] if dense else ["granularity"])
  table = validate_table(df, columns, positive=["total_params_nonemb", "tokens", loss_column],
                         at_least_one=[] if dense else ["granularity"], min_rows=n_free,
                         who=who)
  if dense:
    table["granularity"] = 1.0
  if not dense and "d_ff" in df.columns:
    for d_ff, g in zip(df["d_ff"], table["granularity"]):
      laws.check_granularity(int(d_ff), int(g) if float(g).is_integer() else g)
  if "num_experts" in df.columns and df["num_experts"].nunique() > 1:
    values = sorted(df["num_experts"].unique().tolist())
    raise ValueError(f"{who}: Eq. 9 is fitted at one expansion rate E; the table has "
                     f"num_experts in {values}. Filter, e.g. df[df.num_experts == {values[-1]}].")
  train, test = _split(table, "total_params_nonemb", holdout_above)
  _need_rows(train, n_free, who, holdout_above)

  def residuals(coeffs, frame):
    predicted = laws.granular_loss(frame["total_params_nonemb"].to_numpy(),
                                   frame["tokens"].to_numpy(),
                                   frame["granularity"].to_numpy(), coeffs)
    return np.log(frame[loss_column].to_numpy()) - np.log(predicted)

  def solve(frame, init):
    ln_n, ln_d, ln_g = (np.log(frame[k].to_numpy())
                        for k in ("total_params_nonemb", "tokens", "granularity"))
    ln_l = np.log(frame[loss_column].to_numpy())

    def full(x):
      theta = fixed.copy()
      theta[free] = x
      return theta

    def objective(x):
      terms = _granular_terms(full(x), ln_n, ln_d, ln_g)
      log_norm = np.logaddexp.reduce(terms, axis=0)
      r = log_norm - ln_l
      w = np.exp(terms - log_norm)  # d ln L_hat / d (log-term)
      jac = np.stack([w[0], -ln_n * (w[0] + w[1]), w[2], -ln_d * w[2], w[1], -ln_g * w[1],
                      w[3]], axis=1)[:, free]
      huber = np.where(np.abs(r) <= huber_delta, 0.5 * r**2,
                       huber_delta * (np.abs(r) - 0.5 * huber_delta))
      return huber.sum(), jac.T @ np.clip(r, -huber_delta, huber_delta)

    starts = [init] if init is not None else _granular_starts(frame, loss_column, free,
                                                                fixed, objective, n_starts)
    best = min((optimize.minimize(objective, s, jac=True, method="BFGS",
                                  options={"gtol": 1e-12, "maxiter": 5000})
                for s in starts), key=lambda r: r.fun)
    return best.x, _theta_to_coeffs(full(best.x))

  distinct = ("total_params_nonemb", "tokens") + (() if dense else ("granularity",))
  return _fit_and_report(GranularFit, solve, residuals, train, test,
                         _Law(min_rows=n_free, size_column="total_params_nonemb",
                              distinct=distinct, log_base=np.e),
                         n_bootstrap=n_bootstrap, percentiles=percentiles, seed=seed,
                         leave_out=leave_out)


def _granular_starts(frame, loss_column, free, fixed, objective, n_starts) -> list[np.ndarray]:
  """The n_starts best points of an exponent grid, linear coefficients by NNLS."""
  n, d, g = (frame[k].to_numpy() for k in ("total_params_nonemb", "tokens", "granularity"))
  loss = frame[loss_column].to_numpy()
  grid = (0.05, 0.1, 0.2, 0.4)
  scored = []
  for alpha, beta, gamma in itertools.product(grid, grid, (0.25, 0.5, 1.0)):
    basis = np.stack([n**-alpha, d**-beta, g**-gamma * n**-alpha, np.ones_like(n)], axis=1)
    # Columns of fixed terms move to the target side.
    use = np.array([True, True, free[4], free[6]])
    target = loss - (np.exp(fixed[6]) if not free[6] else 0.0)
    coef = np.zeros(4)
    coef[use] = optimize.nnls(basis[:, use], target)[0]
    ln = np.log(np.maximum(coef, 1e-6))
    theta = np.array([ln[0], alpha, ln[1], beta, ln[2], gamma, ln[3]])[free]
    scored.append((objective(theta)[0], theta))
  scored.sort(key=lambda t: t[0])
  return [t for _, t in scored[:n_starts]]


# ---------------------------------------------------------------------------------------
# Synthetic tables from a known law: check that a grid identifies it before running it.
# ---------------------------------------------------------------------------------------
def synthetic_routed_table(coeffs: laws.RoutedCoeffs, *,
                           n_params: Sequence[float] = laws.PAPER_N_PARAMS,
                           experts: Sequence[int] = laws.PAPER_EXPERTS, noise: float = 0.0,
                           seed: int = 0, router: str = "sbase") -> pd.DataFrame:
  """results.csv rows with val_loss from Clark's law times (1 + noise * N(0, 1))."""
  n, e = (x.ravel() for x in np.meshgrid(np.asarray(n_params, float), np.asarray(experts)))
  loss = laws.routed_loss(n, e, coeffs)
  loss = loss * (1.0 + noise * np.random.default_rng(seed).standard_normal(loss.shape))
  return pd.DataFrame({
      "router": np.where(e == 1, "dense", router), "num_experts": e, "top_k": 1,
      "routing_frequency": 0.5, "granularity": 1, "n_params": n,
      "total_params": laws.routed_total_params(n, e), "flops_per_token": 2.0 * n,
      "val_loss": loss})


def synthetic_granular_table(coeffs: laws.GranularCoeffs, *, num_experts: int = 64,
                             d_models: Sequence[float] = laws.KRAJEWSKI_D_MODELS,
                             granularities: Sequence[int] = laws.KRAJEWSKI_GRANULARITIES,
                             tokens: Sequence[float] = laws.KRAJEWSKI_TOKENS,
                             noise: float = 0.0, seed: int = 0,
                             router: str = "topk") -> pd.DataFrame:
  """results.csv rows on a (d_model, G, D) grid with loss from Eq. 9 times (1 + noise N(0,1)).

  Shapes follow finegrained_spec.md section 1: n_blocks = d_model / 64, d_ff = 4 d_model.
  """
  d, g, t = (x.ravel() for x in np.meshgrid(np.asarray(d_models, float),
                                            np.asarray(granularities), np.asarray(tokens, float)))
  n_blocks = d / 64.0
  total = laws.total_params(d, n_blocks, num_experts)
  loss = laws.granular_loss(total, t, g, coeffs)
  loss = loss * (1.0 + noise * np.random.default_rng(seed).standard_normal(loss.shape))
  return pd.DataFrame({
      "router": router, "num_experts": num_experts, "top_k": 1, "routing_frequency": 1.0,
      "granularity": g, "d_model": d, "n_blocks": n_blocks, "d_ff": 4 * d,
      "total_params_nonemb": total, "active_params_nonemb": laws.active_params(d, n_blocks),
      "train_flops": laws.train_flops(d, n_blocks, num_experts, g, t), "tokens": t,
      "val_loss": loss, "train_loss_smoothed": loss})
