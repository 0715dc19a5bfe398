"""Intervals over seeds, verdicts and AIC (routing_lm/scaling/stats.py)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from routing_lm.scaling import stats

# Student-t quantiles t_{0.975, df} from a printed table (e.g. NIST/SEMATECH e-Handbook).
T975 = {1: 12.706, 2: 4.303, 4: 2.776}


def test_mean_interval_textbook_case():
  """x = 1..5: mean 3, s = sqrt(2.5), s / sqrt(5) = sqrt(0.5), t_{0.975,4} = 2.776."""
  mean, low, high = stats.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  half = T975[4] * np.sqrt(0.5)
  assert mean == 3.0
  assert low == pytest.approx(3.0 - half, abs=1e-3) and high == pytest.approx(3.0 + half,
                                                                            abs=1e-3)
  assert (low, high) == pytest.approx((1.0367568385, 4.9632431615), abs=1e-9)
  # A wider confidence gives a wider interval; 0.90 uses t_{0.95,4} = 2.132.
  _, low90, high90 = stats.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.90)
  assert high90 - 3.0 == pytest.approx(2.132 * np.sqrt(0.5), abs=1e-3)


def test_mean_interval_two_seeds_and_constant():
  # n = 2: s = sqrt(2), se = 1, df = 1: mean ± 12.706.
  mean, low, high = stats.mean_interval([0.0, 2.0])
  assert mean == 1.0 and high - mean == pytest.approx(T975[1], abs=1e-3)
  assert mean - low == pytest.approx(high - mean)
  # No spread: the interval is the point, not NaN.
  assert tuple(stats.mean_interval([2.5, 2.5, 2.5])) == (2.5, 2.5, 2.5)


def test_mean_interval_covers_the_mean():
  """Over 4000 samples of 3 normal values the 95% interval holds the true mean ~95%."""
  rng = np.random.default_rng(0)
  samples = rng.normal(1.0, 0.3, size=(4000, 3))
  covered = np.mean([lo <= 1.0 <= hi for _, lo, hi in map(stats.mean_interval, samples)])
  assert 0.94 < covered < 0.96  # binomial sd 0.0034
  # A z interval (1.96 instead of t_{0.975,2} = 4.303) covers far less: the test can tell.
  se = samples.std(axis=1, ddof=1) / np.sqrt(3)
  z_covered = np.mean(np.abs(samples.mean(axis=1) - 1.0) <= 1.96 * se)
  assert z_covered < 0.85


@pytest.mark.parametrize("values, pattern", [
    ([], r"values has 0 value\(s\); an interval over seeds needs at least 2"),
    ([1.0], r"values has 1 value\(s\)"),
    ([1.0, np.nan, 2.0], r"values has 1 NaN/inf value\(s\) of 3 \(first at index 1\)"),
    ([[1.0, 2.0], [3.0, 4.0]], r"values must be a 1-D sequence"),
    (["a", "b"], r"values must be numbers"),
])
def test_mean_interval_bad_input(values, pattern):
  with pytest.raises(ValueError, match=pattern):
    stats.mean_interval(values)


def test_bad_confidence():
  with pytest.raises(ValueError, match=r"confidence=95 must be in \(0, 1\)"):
    stats.mean_interval([1.0, 2.0], confidence=95)


def test_difference_interval_welch():
  """a = 1..5, b = (2, 4, 6): s_a^2/n_a = 0.5, s_b^2/n_b = 4/3, Welch df = 3.5328."""
  a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0]
  diff, low, high = stats.difference_interval(a, b)
  se = np.sqrt(0.5 + 4 / 3)
  df = (0.5 + 4 / 3)**2 / (0.5**2 / 4 + (4 / 3)**2 / 2)
  assert df == pytest.approx(3.5328467, abs=1e-6)
  assert diff == -1.0
  assert high - diff == pytest.approx(scipy_stats.t.ppf(0.975, df) * se, rel=1e-12)
  reference = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
  assert (low, high) == pytest.approx((reference.low, reference.high), rel=1e-12)
  # Swapping a and b flips the interval.
  assert tuple(stats.difference_interval(b, a)) == pytest.approx((1.0, -high, -low))
  # Between t_{0.975,3} = 3.182 and t_{0.975,4} = 2.776 times se.
  assert 2.776 * se < high - diff < 3.182 * se


def test_difference_interval_paired():
  a, b = [1.0, 2.0, 3.0], [0.5, 1.0, 2.5]  # differences 0.5, 1.0, 0.5
  paired = stats.difference_interval(a, b, paired=True)
  assert tuple(paired) == pytest.approx(tuple(stats.mean_interval([0.5, 1.0, 0.5])))
  s = np.std([0.5, 1.0, 0.5], ddof=1)
  assert paired.high - paired.estimate == pytest.approx(T975[2] * s / np.sqrt(3), abs=1e-3)
  reference = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
  assert (paired.low, paired.high) == pytest.approx((reference.low, reference.high))
  # Pairing removes the shared seed-to-seed spread: narrower than Welch here.
  welch = stats.difference_interval(a, b)
  assert welch.estimate == pytest.approx(paired.estimate)
  assert welch.high - welch.low > 2 * (paired.high - paired.low)
  with pytest.raises(ValueError, match=r"same length .* got 3 and 2; pass paired=False"):
    stats.difference_interval(a, b[:2], paired=True)


def test_difference_interval_edges():
  assert tuple(stats.difference_interval([1.0, 1.0], [0.5, 0.5])) == (0.5, 0.5, 0.5)
  # One constant sample: Welch's df reduces to n_b - 1 = 1.
  diff, low, high = stats.difference_interval([1.0, 1.0, 1.0], [0.0, 2.0])
  assert diff == 0.0 and high == pytest.approx(T975[1] * 1.0, abs=1e-3)
  with pytest.raises(ValueError, match=r"^b has 1 NaN/inf"):
    stats.difference_interval([1.0, 2.0], [1.0, np.nan])
  with pytest.raises(ValueError, match=r"^a has 0 value"):
    stats.difference_interval([], [1.0, 2.0])


@pytest.mark.parametrize("low, high, margin, expected", [
    (-0.03, -0.01, 0.0, "sbase < hash"),
    (0.01, 0.02, 0.05, "sbase > hash"),         # an ordering wins over equivalence
    (-0.004, 0.003, 0.005, "equivalent within margin"),
    (-0.004, 0.006, 0.005, "not distinguishable"),
    (-0.01, 0.01, 0.0, "not distinguishable"),
    (0.0, 0.0, 0.0, "equivalent within margin"),
])
def test_verdict(low, high, margin, expected):
  assert stats.verdict(low, high, margin, names=("sbase", "hash")) == expected


def test_verdict_bad_input():
  with pytest.raises(ValueError, match=r"low <= high, got \[0.2, 0.1\]"):
    stats.verdict(0.2, 0.1)
  with pytest.raises(ValueError, match=r"margin=-1 must be >= 0"):
    stats.verdict(-0.1, 0.1, margin=-1)
  with pytest.raises(ValueError, match="finite interval"):
    stats.verdict(np.nan, 0.1)


def test_gaussian_aic():
  # RSS 2 over 10 points, 2 coefficients (+ the noise variance: K = 3).
  aic, aicc = stats.gaussian_aic(2.0, 10, 2)
  assert aic == pytest.approx(10 * np.log(0.2) + 6)
  assert aicc == pytest.approx(aic + 2 * 3 * 4 / (10 - 3 - 1))
  assert stats.gaussian_aic(2.0, 4, 2)[1] == np.inf  # n <= K + 1
  # An exact fit is floored, so two exact fits differ by the parameter penalty only.
  assert stats.gaussian_aic(0.0, 30, 6)[0] - stats.gaussian_aic(1e-40, 30, 4)[0] == (
      pytest.approx(4.0))
  with pytest.raises(ValueError, match=r"rss=nan must be a finite number >= 0"):
    stats.gaussian_aic(np.nan, 10, 2)
