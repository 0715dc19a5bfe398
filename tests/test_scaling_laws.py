"""Formulas of routing_lm/scaling/laws.py against paper_spec.md and finegrained_spec.md."""
import dataclasses
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from routing_lm import scaling
from routing_lm.scaling import laws

# paper_spec.md section 2.3.1, computed from the rounded Table 3 (log10).
GOLDEN = {
    "sbase": dict(e_hat=(1.847, 53.77, 91.40, 194.94),
                  loss=(3.1915, 2.7570, 2.6874, 2.3885, 2.2374, 2.0498),
                  n_bar=(51.8e6, 572e6), cutoff_log10=12.00),
    "rlr": dict(e_hat=(1.880, 57.02, 101.15, 245.25),
                loss=(3.1948, 2.7883, 2.6896, 2.4393, 2.2386, 2.1151),
                n_bar=(48.9e6, 443e6), cutoff_log10=10.50),
    "hash": dict(e_hat=(4.175, 58.92, 102.94, 247.88),
                 loss=(3.1748, 2.7821, 2.6737, 2.4138, 2.2262, 2.0746),
                 n_bar=(47.0e6, 470e6), cutoff_log10=11.33),
}
RTOL = 1e-3  # paper_spec.md 2.3.1
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("router", sorted(GOLDEN))
def test_golden_values(router):
  c, gold = scaling.PUBLISHED[router], GOLDEN[router]
  np.testing.assert_allclose(scaling.e_hat([1, 64, 128, 512], c.e_start, c.e_max),
                             gold["e_hat"], rtol=RTOL)
  n = [15e6, 15e6, 130e6, 130e6, 1.3e9, 1.3e9]
  e = [1, 64, 1, 64, 1, 64]
  np.testing.assert_allclose(scaling.routed_loss(n, e, c), gold["loss"], rtol=RTOL)
  np.testing.assert_allclose(scaling.effective_params([5e6, 130e6], [128, 64], c),
                             gold["n_bar"], rtol=RTOL)
  np.testing.assert_allclose(np.log10(scaling.cutoff_size(c)), gold["cutoff_log10"],
                             rtol=RTOL)


def test_published_constants():
  assert scaling.SBASE == laws.RoutedCoeffs(-0.082, -0.108, 0.009, 1.104, 1.847, 314.478)
  assert set(scaling.PUBLISHED) == {"sbase", "rlr", "hash"}
  assert scaling.CLARK_DENSE.alpha_n == pytest.approx(0.078)
  assert scaling.CLARK_DENSE.n_c == pytest.approx(3.568e13, rel=1e-9)
  assert scaling.KRAJEWSKI_E64 == laws.GranularCoeffs(18.1, 0.115, 30.8, 0.147, 2.1, 0.58, 0.47)
  assert scaling.KRAJEWSKI_E16.gamma == 0.986 and scaling.KRAJEWSKI_E64_HELDOUT.c == 0.472
  assert scaling.KRAJEWSKI_DENSE.g == 0.0
  with pytest.raises(dataclasses.FrozenInstanceError):
    scaling.SBASE.a = 0.0


def test_e_hat_limits():
  c = scaling.SBASE
  assert scaling.e_hat(1, c.e_start, c.e_max) == pytest.approx(c.e_start)
  assert scaling.e_hat(1e12, c.e_start, c.e_max) == pytest.approx(c.e_max, rel=1e-6)
  # Near-linear in the middle range: Ê(E) - E stays small relative to E.
  assert scaling.e_hat(16, c.e_start, c.e_max) == pytest.approx(16, rel=0.1)


@pytest.mark.parametrize("router", sorted(scaling.PUBLISHED))
def test_effective_params(router):
  c = scaling.PUBLISHED[router]
  n = np.geomspace(1e6, 1e10, 9)
  np.testing.assert_allclose(scaling.effective_params(n, 1, c), n, rtol=1e-12)
  experts = np.array([1, 2, 4, 8, 16, 64, 256, 1024, 4096, 1e5, 1e7])
  n_bar = scaling.effective_params(1e8, experts, c)
  assert np.all(np.diff(n_bar) > 0), "N̄ increases with E below the cut-off"
  # Saturation: the limit E -> inf is N̄ with Ê = E_max, and the gains shrink.
  log_e1 = np.log10(c.e_start)
  limit = 10**((scaling.routed_log_loss(1e8, np.inf, c) - c.b * log_e1 - c.d)
               / (c.a + c.c * log_e1))
  assert n_bar[-1] == pytest.approx(limit, rel=1e-3)
  assert np.all(n_bar < limit)
  gains = np.diff(np.log(n_bar[4:]))
  assert gains[-1] < 0.01 * gains[0]
  # Definition: the dense law at N̄ gives the routed loss.
  np.testing.assert_allclose(scaling.routed_loss(n_bar, 1, c),
                             scaling.routed_loss(1e8, experts, c), rtol=1e-12)


@pytest.mark.parametrize("router", sorted(scaling.PUBLISHED))
def test_cutoff_closed_form(router):
  c = scaling.PUBLISHED[router]
  n_c = scaling.cutoff_size(c)
  assert n_c == pytest.approx(10**(-c.b / c.c))
  # At N_c the E-slope of Eq. 8 vanishes: every E gives the same loss, N̄ = N_c.
  experts = [1, 8, 64, 512]
  assert scaling.slopes(n_c, 64, c)[1] == pytest.approx(0.0, abs=1e-12)
  np.testing.assert_allclose(scaling.routed_loss(n_c, experts, c),
                             scaling.routed_loss(n_c, 1, c), rtol=1e-9)
  # Below it routing helps, above it routing hurts.
  assert scaling.routed_loss(n_c / 10, 64, c) < scaling.routed_loss(n_c / 10, 1, c)
  assert scaling.routed_loss(n_c * 10, 64, c) > scaling.routed_loss(n_c * 10, 1, c)


def test_generic_bilinear_law_serves_n_p_f():
  c = scaling.HASH
  log_e = np.log10(scaling.e_hat(32, c.e_start, c.e_max))
  for x in (1e8, 5e9, 3e8):  # N, P or F: same function, the coefficients decide
    assert scaling.routed_log_loss(x, 32, c) == pytest.approx(
        scaling.bilinear_log_loss(np.log10(x), log_e, c.a, c.b, c.c, c.d))
  d = scaling.CLARK_DENSE
  assert scaling.dense_log_loss(1e9, d) == pytest.approx(d.a * 9 + d.d)
  # Eq. 8 slopes by finite differences.
  h = 1e-6
  ds_n = -(scaling.routed_log_loss(1e8 * 10**h, 32, c) - scaling.routed_log_loss(1e8, 32, c)) / h
  assert scaling.slopes(1e8, 32, c)[0] == pytest.approx(ds_n, rel=1e-4)


def test_routed_total_params():
  # paper_spec.md 3: 1.3B with E = 512 at R = 0.5 has about 207B parameters; its shape
  # counts a relative-position projection, so the FFW is 8 of 13 d^2 per block.
  assert scaling.routed_total_params(1.3086e9, 512, ffw_fraction=8 / 13) == pytest.approx(
      207e9, rel=0.01)
  # This codebase's rotary blocks: FFW is 8 of 12 d^2 (the default).
  assert scaling.routed_total_params(1.2e9, 512) == pytest.approx(1.2e9 * (1 + 511 / 3))
  assert scaling.routed_total_params(1e8, 1) == 1e8


def test_granular_loss_by_hand():
  k = scaling.KRAJEWSKI_E64
  n, d, g = 4.3e9, 1e11, 8
  hand = 0.47 + (2.1 / 8**0.58 + 18.1) * n**-0.115 + 30.8 * d**-0.147
  assert scaling.granular_loss(n, d, g, k) == pytest.approx(hand, rel=1e-12)
  assert np.all(np.diff(scaling.granular_loss(n, d, [1, 2, 4, 8, 16], k)) < 0)
  dense = scaling.granular_loss(n, d, [1, 64], scaling.KRAJEWSKI_DENSE)
  assert dense[0] == dense[1] == pytest.approx(0.47 + 16.3 * n**-0.126 + 26.7 * d**-0.127)


def test_sizes_and_flops():
  # finegrained_spec.md 1: `64 x 100M` has a total near 4.3B, not 6.4B.
  d = (100e6 * 64 / 12)**(1 / 3)
  assert scaling.active_params(d, d / 64) == pytest.approx(100e6)
  assert scaling.total_params(d, d / 64, 64) == pytest.approx(4.3e9, rel=0.01)
  assert scaling.total_params(512, 8, 1) == scaling.active_params(512, 8) == 12 * 512**2 * 8
  # Eq. 10 by hand: d_model 512, 8 blocks, E 64, G 8, 1e9 tokens.
  hand = (12 * 512**2 * 6 + 512 * 64 * 8 * 14) * 1e9 * 8
  assert scaling.train_flops(512, 8, 64, 8, 1e9) == pytest.approx(hand, rel=1e-12)
  # Dense: no router term, F = 6 N D.
  assert scaling.train_flops(512, 8, 1, 1, 1e9) == pytest.approx(6 * 12 * 512**2 * 8 * 1e9)
  # The router term grows with G at fixed active parameters.
  per_token = scaling.train_flops_per_token(512, 8, 64, [1, 2, 4, 8])
  np.testing.assert_allclose(np.diff(per_token), 14 * 512 * 64 * 8 * np.array([1, 2, 4]))


def test_check_granularity():
  laws.check_granularity(2048, 8)
  with pytest.raises(ValueError, match=r"d_ff=2048 is not divisible by granularity=3"):
    laws.check_granularity(2048, 3)
  with pytest.raises(ValueError, match=r"granularity must be an integer >= 1.*0"):
    laws.check_granularity(2048, 0)


def test_scaling_imports_no_jax():
  code = ("import sys, routing_lm.scaling, routing_lm.scaling.plots; "
          "bad = [m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
