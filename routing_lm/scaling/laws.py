"""Scaling-law formulas and published coefficients (no jax: numpy only).

Two families:
- Clark et al. 2022, routed LMs (../shared/paper_spec.md section 2): a bilinear law in
  log10 of a size x (N, P or F) and of the saturated expert count Ê.
- Krajewski et al. 2024, fine-grained MoE (../shared/finegrained_spec.md sections 1-2):
  L(N, D, G) = c + (g / G^gamma + a) N^-alpha + b D^-beta, with training FLOPs (Eq. 10).

Every function accepts scalars or numpy arrays and broadcasts.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike

from routing_lm.expert_dims import check_granularity  # noqa: F401  (part of this API)


# ---------------------------------------------------------------------------------------
# Coefficient sets.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DenseCoeffs:
  """Dense law log10 L = a log10 N + d (paper_spec.md section 2.1)."""
  a: float
  d: float

  @property
  def alpha_n(self) -> float:
    """Kaplan exponent of L = (N_c / N)^alpha_N: alpha_N = -a."""
    return -self.a

  @property
  def n_c(self) -> float:
    """Kaplan scale N_c = 10^(d / alpha_N)."""
    return 10.0**(self.d / self.alpha_n)

  @classmethod
  def from_kaplan(cls, alpha_n: float, n_c: float) -> "DenseCoeffs":
    return cls(a=-alpha_n, d=alpha_n * np.log10(n_c))


@dataclasses.dataclass(frozen=True)
class RoutedCoeffs:
  """Routed law of paper_spec.md section 2.2 (Eq. 1): a, b, c, d and Ê's E_start, E_max."""
  a: float
  b: float
  c: float
  d: float
  e_start: float
  e_max: float


@dataclasses.dataclass(frozen=True)
class GranularCoeffs:
  """Fine-grained law of finegrained_spec.md section 2 (Eq. 9). Dense: g = gamma = 0."""
  a: float
  alpha: float
  b: float
  beta: float
  g: float
  gamma: float
  c: float


def coefficient_names(coeffs) -> list[str]:
  """The coefficient fields of a coefficient set or fit result (fit statistics excluded)."""
  return [f.name for f in dataclasses.fields(coeffs) if not f.kw_only]


def coefficients(coeffs) -> dict[str, float]:
  """{name: value} of the coefficients of a coefficient set or of a fit result."""
  return {name: float(getattr(coeffs, name)) for name in coefficient_names(coeffs)}


# paper_spec.md section 3: the paper's grid of dense sizes N and expert counts E.
PAPER_N_PARAMS = (15e6, 25e6, 55e6, 130e6, 370e6, 870e6, 1.3e9)
PAPER_EXPERTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# finegrained_spec.md section 2: the run grid of the E = 64 fit (5 x 5 x 3 = 75 runs);
# n_blocks = d_model / 64.
KRAJEWSKI_D_MODELS = (256, 384, 512, 640, 768)
KRAJEWSKI_GRANULARITIES = (1, 2, 4, 8, 16)
KRAJEWSKI_TOKENS = (4e9, 16e9, 64e9)

# paper_spec.md section 2.1: the paper's dense fit in Kaplan form.
CLARK_DENSE = DenseCoeffs.from_kaplan(alpha_n=0.078, n_c=3.568e13)

# paper_spec.md section 2.3 (Table 3), log10 losses.
SBASE = RoutedCoeffs(a=-0.082, b=-0.108, c=0.009, d=1.104, e_start=1.847, e_max=314.478)
RLR = RoutedCoeffs(a=-0.083, b=-0.126, c=0.012, d=1.111, e_start=1.880, e_max=469.982)
HASH = RoutedCoeffs(a=-0.087, b=-0.136, c=0.012, d=1.157, e_start=4.175, e_max=477.741)
PUBLISHED = {"sbase": SBASE, "rlr": RLR, "hash": HASH}

# finegrained_spec.md section 2 (Tables 1, 5, 8), losses in nats.
KRAJEWSKI_E64 = GranularCoeffs(
    a=18.1, alpha=0.115, b=30.8, beta=0.147, g=2.1, gamma=0.58, c=0.47)
KRAJEWSKI_E64_HELDOUT = GranularCoeffs(
    a=17.6, alpha=0.114, b=26.7, beta=0.140, g=2.07, gamma=0.570, c=0.472)
KRAJEWSKI_E16 = GranularCoeffs(
    a=19.64, alpha=0.124, b=57.07, beta=0.169, g=1.18, gamma=0.986, c=0.472)
KRAJEWSKI_DENSE = GranularCoeffs(
    a=16.3, alpha=0.126, b=26.7, beta=0.127, g=0.0, gamma=0.0, c=0.47)
KRAJEWSKI = {"krajewski_e64": KRAJEWSKI_E64, "krajewski_e64_heldout": KRAJEWSKI_E64_HELDOUT,
             "krajewski_e16": KRAJEWSKI_E16, "krajewski_dense": KRAJEWSKI_DENSE}
# The expansion rate E each published granular fit was made at.
KRAJEWSKI_NUM_EXPERTS = {"krajewski_e64": 64, "krajewski_e64_heldout": 64,
                         "krajewski_e16": 16, "krajewski_dense": 1}


# ---------------------------------------------------------------------------------------
# Clark et al.: the routed law.
# ---------------------------------------------------------------------------------------
def e_hat(num_experts: ArrayLike, e_start: float, e_max: float) -> np.ndarray:
  """Saturating transform of E (paper_spec.md section 2.2).

  1 / Ê = 1 / (E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max, so Ê(1) = E_start and
  Ê -> E_max as E -> infinity.
  """
  e = np.asarray(num_experts, dtype=float)
  shift = 1.0 / (1.0 / e_start - 1.0 / e_max)
  return 1.0 / (1.0 / (e - 1.0 + shift) + 1.0 / e_max)


def bilinear_log_loss(log_x: ArrayLike, log_y: ArrayLike, a: float, b: float, c: float,
                      d: float) -> np.ndarray:
  """The generic law log L = a log x + b log y + c log x log y + d (paper_spec.md 2.2, 2.4).

  x is N (Eq. 1), P or F (the restatements), y is Ê; or (x, y) = (F, B) for Eq. 2. The
  dense law (section 2.1) is the case b = c = 0.
  """
  log_x = np.asarray(log_x, dtype=float)
  log_y = np.asarray(log_y, dtype=float)
  return a * log_x + b * log_y + c * log_x * log_y + d


def routed_log_loss(x: ArrayLike, num_experts: ArrayLike, coeffs: RoutedCoeffs) -> np.ndarray:
  """log10 L(x, E) of paper_spec.md section 2.2, x = N (or P, F with matching coeffs)."""
  log_e = np.log10(e_hat(num_experts, coeffs.e_start, coeffs.e_max))
  return bilinear_log_loss(np.log10(x), log_e, coeffs.a, coeffs.b, coeffs.c, coeffs.d)


def routed_loss(x: ArrayLike, num_experts: ArrayLike, coeffs: RoutedCoeffs) -> np.ndarray:
  """L(x, E) = 10^routed_log_loss (paper_spec.md section 2.2)."""
  return 10.0**routed_log_loss(x, num_experts, coeffs)


def dense_log_loss(n_params: ArrayLike, coeffs: DenseCoeffs) -> np.ndarray:
  """log10 L(N) = a log10 N + d (paper_spec.md section 2.1)."""
  return bilinear_log_loss(np.log10(n_params), 0.0, coeffs.a, 0.0, 0.0, coeffs.d)


def effective_params(n_params: ArrayLike, num_experts: ArrayLike,
                     coeffs: RoutedCoeffs) -> np.ndarray:
  """Effective parameter count N̄(N, E), Eq. 11 (paper_spec.md section 2.5).

  Solves L(N̄, 1) = L(N, E) under the same law; at E = 1, Ê = E_start, so the law is
  linear in log N̄: log N̄ = (log L(N, E) - b log E_start - d) / (a + c log E_start).
  """
  log_e1 = np.log10(coeffs.e_start)
  log_l = routed_log_loss(n_params, num_experts, coeffs)
  return 10.0**((log_l - coeffs.b * log_e1 - coeffs.d) / (coeffs.a + coeffs.c * log_e1))


def cutoff_size(coeffs: RoutedCoeffs) -> float:
  """N_c = 10^(-b/c): the size where routing stops helping (paper_spec.md section 2.2)."""
  return 10.0**(-coeffs.b / coeffs.c)


def routed_total_params(n_params: ArrayLike, num_experts: ArrayLike,
                        routing_frequency: float = 0.5,
                        ffw_fraction: float = 2.0 / 3.0) -> np.ndarray:
  """P(N, E) = N (1 + (E - 1) R f): each routed FFW holds E copies (paper_spec.md 3).

  f is the FFW share of N: 8 d^2 of the 12 d^2 per block with d_ff = 4 d and rotary
  positions (2/3); the router's E d weights per routed layer are neglected.
  """
  extra = (np.asarray(num_experts, dtype=float) - 1.0) * routing_frequency * ffw_fraction
  return np.asarray(n_params, dtype=float) * (1.0 + extra)


def slopes(n_params: ArrayLike, num_experts: ArrayLike,
           coeffs: RoutedCoeffs) -> tuple[np.ndarray, np.ndarray]:
  """Eq. 8 (paper_spec.md 2.2): (-dlogL/dlogN, -dlogL/dlogÊ) = (-(a + c logÊ), -(b + c logN))."""
  log_e = np.log10(e_hat(num_experts, coeffs.e_start, coeffs.e_max))
  return -(coeffs.a + coeffs.c * log_e), -(coeffs.b + coeffs.c * np.log10(n_params))


# ---------------------------------------------------------------------------------------
# Krajewski et al.: the fine-grained law, sizes and FLOPs.
# ---------------------------------------------------------------------------------------
C_F = 6.0   # FLOPs per active parameter per token in training (Eq. 10)
C_R = 14.0  # FLOPs per router weight per token in training (Eq. 10)


def granular_loss(total_params: ArrayLike, tokens: ArrayLike, granularity: ArrayLike,
                  coeffs: GranularCoeffs) -> np.ndarray:
  """Eq. 9 (finegrained_spec.md section 2): c + (g / G^gamma + a) N^-alpha + b D^-beta.

  N is the total non-embedding parameter count, D the training tokens, G the granularity.
  """
  n = np.asarray(total_params, dtype=float)
  d = np.asarray(tokens, dtype=float)
  g = np.asarray(granularity, dtype=float)
  return (coeffs.c + (coeffs.g / g**coeffs.gamma + coeffs.a) * n**-coeffs.alpha
          + coeffs.b * d**-coeffs.beta)


def active_params(d_model: ArrayLike, n_blocks: ArrayLike) -> np.ndarray:
  """N_act = 12 d_model^2 n_blocks (finegrained_spec.md section 1)."""
  return 12.0 * np.asarray(d_model, dtype=float)**2 * np.asarray(n_blocks, dtype=float)


def total_params(d_model: ArrayLike, n_blocks: ArrayLike, num_experts: ArrayLike) -> np.ndarray:
  """N = d_model^2 (8E + 4) n_blocks, router excluded (finegrained_spec.md section 1)."""
  d = np.asarray(d_model, dtype=float)
  return d**2 * (8.0 * np.asarray(num_experts, dtype=float) + 4.0) * np.asarray(n_blocks)


def train_flops_per_token(d_model: ArrayLike, n_blocks: ArrayLike, num_experts: ArrayLike,
                          granularity: ArrayLike) -> np.ndarray:
  """Eq. 10 per token (finegrained_spec.md section 1): 6 N_act + 14 d_model E G n_blocks.

  A dense model (E = G = 1) has no router, so its router term is zero: F / D = 6 N.
  """
  d = np.asarray(d_model, dtype=float)
  # E*G routed experts (routing_lm.expert_dims), elementwise over arrays of runs.
  experts = np.asarray(num_experts, dtype=float) * np.asarray(granularity, dtype=float)
  router = np.where(experts > 1, C_R * d * experts * np.asarray(n_blocks), 0.0)
  return C_F * active_params(d, n_blocks) + router


def train_flops(d_model: ArrayLike, n_blocks: ArrayLike, num_experts: ArrayLike,
                granularity: ArrayLike, tokens: ArrayLike) -> np.ndarray:
  """Eq. 10 (finegrained_spec.md section 1): F = (12 d^2 c_f + d E G c_r) D n_blocks."""
  return train_flops_per_token(d_model, n_blocks, num_experts, granularity) * np.asarray(tokens)
