"""Intervals over seeds and model comparison for the sweep analysis (numpy/scipy only).

- mean_interval:       Student-t interval of a mean over seeds.
- difference_interval: interval of mean(a) - mean(b): Welch's t (unpaired) or paired t.
- verdict:             "a < b", "a > b", "equivalent within margin" or "not distinguishable".
- gaussian_aic:        AIC and AICc of a least-squares fit from its residual sum of squares.

Textbook forms (e.g. Welch 1947; Burnham & Anderson 2002, section 2.4 for AICc).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as _stats


class Interval(NamedTuple):
  """An estimate with its two-sided interval: unpacks as (estimate, low, high)."""
  estimate: float
  low: float
  high: float


def _sample(values: ArrayLike, name: str, min_size: int = 2) -> np.ndarray:
  """`values` as a 1-D float array of >= min_size finite numbers, else ValueError."""
  try:
    x = np.asarray(values, dtype=float)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be numbers (one per seed), got {values!r}.") from None
  if x.ndim != 1:
    raise ValueError(f"{name} must be a 1-D sequence (one value per seed), got shape "
                     f"{x.shape}; pass one cell's values at a time.")
  bad = ~np.isfinite(x)
  if bad.any():
    raise ValueError(f"{name} has {int(bad.sum())} NaN/inf value(s) of {x.size} (first at "
                     f"index {int(np.flatnonzero(bad)[0])}); drop the failed seeds or rerun "
                     f"them.")
  if x.size < min_size:
    raise ValueError(f"{name} has {x.size} value(s); an interval over seeds needs at least "
                     f"{min_size}. Run more seeds.")
  return x


def _check_confidence(confidence: float) -> None:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95.")


def _t_interval(estimate: float, se: float, df: float, confidence: float) -> Interval:
  if se == 0.0:  # no spread: the interval is the point (scipy would give nan for 0 * inf)
    return Interval(float(estimate), float(estimate), float(estimate))
  half = float(_stats.t.ppf(0.5 + confidence / 2.0, df)) * se
  return Interval(float(estimate), float(estimate - half), float(estimate + half))


def mean_interval(values: ArrayLike, confidence: float = 0.95) -> Interval:
  """Student-t interval of the mean of `values` [n_seeds]: mean ± t_{n-1} s / sqrt(n).

  s is the sample standard deviation (ddof = 1). Needs n >= 2 finite values.
  """
  _check_confidence(confidence)
  x = _sample(values, "values")
  return _t_interval(x.mean(), x.std(ddof=1) / np.sqrt(x.size), x.size - 1, confidence)


def difference_interval(a: ArrayLike, b: ArrayLike, confidence: float = 0.95,
                        paired: bool = False) -> Interval:
  """Interval of mean(a) - mean(b), a [n_a], b [n_b] (one value per seed).

  paired=False: Welch's t, se = sqrt(s_a^2/n_a + s_b^2/n_b) with the Welch-Satterthwaite
  degrees of freedom se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)).
  paired=True: the t interval of the mean of a - b (a[i] and b[i] share seed i; n_a = n_b).
  """
  _check_confidence(confidence)
  x, y = _sample(a, "a"), _sample(b, "b")
  if paired:
    if x.size != y.size:
      raise ValueError(f"paired=True needs a and b of the same length (one pair per seed), "
                       f"got {x.size} and {y.size}; pass paired=False for Welch's t.")
    return mean_interval(x - y, confidence)
  va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
  se = np.sqrt(va + vb)
  if se == 0.0:
    return _t_interval(x.mean() - y.mean(), 0.0, 1.0, confidence)
  df = (va + vb)**2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
  return _t_interval(x.mean() - y.mean(), se, df, confidence)


def verdict(low: float, high: float, margin: float = 0.0,
            names: Sequence[str] = ("a", "b")) -> str:
  """Read an interval [low, high] of mean(a) - mean(b) (e.g. losses; lower is better).

  An ordering is claimed only when the interval excludes zero: "a < b" (high < 0) or
  "a > b" (low > 0). Otherwise "equivalent within margin" when it lies inside
  [-margin, margin], else "not distinguishable". `names` replaces "a" and "b".
  """
  if not (np.isfinite(low) and np.isfinite(high)) or low > high:
    raise ValueError(f"verdict needs a finite interval with low <= high, got [{low}, {high}].")
  if margin < 0:
    raise ValueError(f"margin={margin} must be >= 0 (a half-width in the loss's units).")
  a, b = names
  if high < 0:
    return f"{a} < {b}"
  if low > 0:
    return f"{a} > {b}"
  if -margin <= low and high <= margin:
    return "equivalent within margin"
  return "not distinguishable"


# Below this mean squared residual a fit is exact up to rounding; flooring RSS / n there
# keeps ln(RSS / n) finite, so exact fits tie and the parameter penalty decides.
RSS_FLOOR = 1e-24


def gaussian_aic(rss: float, n_points: int, n_params: int) -> tuple[float, float]:
  """(AIC, AICc) of a least-squares fit with Gaussian errors of unknown variance.

  AIC = n ln(RSS / n) + 2K and AICc = AIC + 2K(K + 1) / (n - K - 1), where K counts the
  fitted coefficients plus one for the noise variance (differences between forms are the
  same either way). AICc is inf when n <= K + 1 (too few points to judge the form).
  """
  if n_points < 1 or n_params < 1:
    raise ValueError(f"gaussian_aic needs n_points >= 1 and n_params >= 1, got "
                     f"{n_points} and {n_params}.")
  if not np.isfinite(rss) or rss < 0:
    raise ValueError(f"gaussian_aic: rss={rss} must be a finite number >= 0.")
  k = n_params + 1
  aic = n_points * np.log(max(rss / n_points, RSS_FLOOR)) + 2.0 * k
  aicc = aic + 2.0 * k * (k + 1) / (n_points - k - 1) if n_points > k + 1 else np.inf
  return float(aic), float(aicc)
