"""Planners: the lowest-loss model for a budget under a law.

- optimal_routed: Clark et al.'s law (paper_spec.md section 2.2); budget = inference
  FLOPs per token and/or total parameters; choose N and E.
- optimal_granular / optimal_dense: Krajewski et al.'s law (finegrained_spec.md section 3);
  budget = training FLOPs (Eq. 10); choose G, d_model (n_blocks = d_model / 64) and D.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import optimize

from routing_lm.scaling import laws

POWERS_OF_TWO = tuple(2**i for i in range(11))  # G in 1..1024


# ---------------------------------------------------------------------------------------
# Clark et al.: choose (N, E) for a budget.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RoutedPlan:
  """The best (N, E) for a budget, and what a dense model would need to match it.

  dense_params: N̄(N, E), the dense size reaching the same loss (Eq. 11);
  dense_flops_per_token: its forward FLOPs per token; dense_loss: the loss of the dense
  model that fits the same budget.
  """
  n_params: float
  num_experts: int
  total_params: float
  flops_per_token: float
  loss: float
  dense_params: float
  dense_flops_per_token: float
  dense_loss: float


def optimal_routed(coeffs: laws.RoutedCoeffs, *, flops_per_token: float | None = None,
                   total_params: float | None = None,
                   experts: Sequence[int] = laws.PAPER_EXPERTS, routing_frequency: float = 0.5,
                   ffw_fraction: float = 2.0 / 3.0,
                   flops_per_param: float = 2.0) -> RoutedPlan:
  """The (N, E), E in `experts`, with the lowest loss under Clark's law (paper_spec.md 2.2).

  flops_per_token caps N at F / flops_per_param (a forward pass costs about 2 FLOPs per
  active parameter; routing leaves F unchanged up to the router, section 1);
  total_params caps P(N, E) (laws.routed_total_params). Give either budget or both.
  """
  if flops_per_token is None and total_params is None:
    raise ValueError("optimal_routed: give flops_per_token and/or total_params.")
  for name, value in (("flops_per_token", flops_per_token), ("total_params", total_params)):
    if value is not None and value <= 0:
      raise ValueError(f"optimal_routed: {name}={value} must be > 0.")
  experts = np.asarray(experts, dtype=float)
  if (experts < 1).any():
    raise ValueError(f"optimal_routed: experts must be >= 1, got {experts.tolist()}.")
  cap_n = np.inf if flops_per_token is None else flops_per_token / flops_per_param
  cap_p = np.inf if total_params is None else total_params
  n = np.minimum(cap_n, cap_p / laws.routed_total_params(1.0, experts, routing_frequency,
                                                     ffw_fraction))
  loss = laws.routed_loss(n, experts, coeffs)
  i = int(np.argmin(loss))
  n_bar = float(laws.effective_params(n[i], experts[i], coeffs))
  dense_n = min(cap_n, cap_p)
  return RoutedPlan(
      n_params=float(n[i]), num_experts=int(experts[i]),
      total_params=float(laws.routed_total_params(n[i], experts[i], routing_frequency,
                                             ffw_fraction)),
      flops_per_token=float(flops_per_param * n[i]), loss=float(loss[i]),
      dense_params=n_bar, dense_flops_per_token=flops_per_param * n_bar,
      dense_loss=float(laws.routed_loss(dense_n, 1, coeffs)))


# ---------------------------------------------------------------------------------------
# Krajewski et al.: compute-optimal granularity, shape and tokens.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GranularPlan:
  """A compute-optimal model (finegrained_spec.md section 3); n_blocks is continuous."""
  num_experts: int
  granularity: int
  d_model: float
  n_blocks: float
  active_params: float
  total_params: float
  tokens: float
  flops: float
  loss: float

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _best_shape(flops: float, coeffs: laws.GranularCoeffs, num_experts: int,
                granularity: int, d_per_block: float) -> GranularPlan:
  """Minimise Eq. 9 over log d_model at fixed FLOPs (Eq. 10), n_blocks = d_model / 64."""
  def describe(log_d):
    d = float(np.exp(log_d))
    n_blocks = d / d_per_block
    tokens = flops / float(laws.train_flops_per_token(d, n_blocks, num_experts, granularity))
    total = float(laws.total_params(d, n_blocks, num_experts))
    loss = float(laws.granular_loss(total, tokens, granularity, coeffs))
    return GranularPlan(num_experts=num_experts, granularity=granularity, d_model=d,
                        n_blocks=n_blocks, active_params=float(laws.active_params(d, n_blocks)),
                        total_params=total, tokens=tokens, flops=float(flops), loss=loss)

  res = optimize.minimize_scalar(lambda x: describe(x).loss, method="bounded",
                                 bounds=(np.log(d_per_block), np.log(1e7)),
                                 options={"xatol": 1e-7})
  return describe(res.x)


def optimal_granular(flops: float, coeffs: laws.GranularCoeffs = laws.KRAJEWSKI_E64,
                     num_experts: int = 64, granularities: Sequence[int] = POWERS_OF_TWO,
                     d_per_block: float = 64.0) -> GranularPlan:
  """Compute-optimal G, d_model, n_blocks, N_act, N, D and loss for training FLOPs `flops`.

  finegrained_spec.md section 3 (Table 2): for each G, d_model minimises Eq. 9 with
  n_blocks = d_model / d_per_block and D = flops / (Eq. 10 per token); the best G wins.
  """
  if not flops > 0:
    raise ValueError(f"optimal_granular: flops={flops} must be > 0.")
  if num_experts < 1 or any(g < 1 for g in granularities):
    raise ValueError(f"optimal_granular: num_experts={num_experts} and granularities="
                     f"{list(granularities)} must be >= 1.")
  plans = [_best_shape(flops, coeffs, num_experts, int(g), d_per_block) for g in granularities]
  return min(plans, key=lambda p: p.loss)


def optimal_dense(flops: float, coeffs: laws.GranularCoeffs = laws.KRAJEWSKI_DENSE,
                  d_per_block: float = 64.0) -> GranularPlan:
  """The compute-optimal dense model (E = G = 1: F = 6 N D, no router) for `flops`."""
  return optimal_granular(flops, coeffs, num_experts=1, granularities=(1,),
                          d_per_block=d_per_block)


def dense_flops_for_loss(loss: float, coeffs: laws.GranularCoeffs = laws.KRAJEWSKI_DENSE,
                         d_per_block: float = 64.0) -> float:
  """Training FLOPs a compute-optimal dense model needs to reach `loss` (inf if below c)."""
  if loss <= coeffs.c:
    return float("inf")
  gap = lambda log_f: optimal_dense(10.0**log_f, coeffs, d_per_block).loss - loss
  lo, hi = 1.0, 40.0
  if gap(lo) < 0:
    raise ValueError(f"dense_flops_for_loss: loss={loss} is above the dense loss at "
                     f"1e{lo:.0f} FLOPs; nothing to plan.")
  if gap(hi) > 0:
    return float("inf")
  return 10.0**optimize.brentq(gap, lo, hi, xtol=1e-6)
