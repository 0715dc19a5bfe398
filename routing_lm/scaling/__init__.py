"""Scaling laws of routed LMs: formulas, published coefficients, fits, plots, planners.

numpy/scipy/pandas/matplotlib only (no jax): works without the training stack.
Laws: ../shared/paper_spec.md section 2 (Clark et al.) and finegrained_spec.md (Krajewski
et al.). Intervals over seeds and AIC: `routing_lm.scaling.stats`. Plots live in
`routing_lm.scaling.plots` (imported on use: matplotlib).
"""
from routing_lm.scaling import stats
from routing_lm.scaling.fit import (N_BOOTSTRAP, DenseFit, FitStats, FormFit, GranularFit,
                                    HeldOut, RoutedFit, fit_dense, fit_granular, fit_routed,
                                    synthetic_granular_table, synthetic_routed_table,
                                    validate_table)
from routing_lm.scaling.laws import (
    CLARK_DENSE, HASH, KRAJEWSKI, KRAJEWSKI_DENSE, KRAJEWSKI_E16, KRAJEWSKI_E64,
    KRAJEWSKI_D_MODELS, KRAJEWSKI_E64_HELDOUT, KRAJEWSKI_GRANULARITIES, KRAJEWSKI_NUM_EXPERTS,
    KRAJEWSKI_TOKENS, PAPER_EXPERTS, PAPER_N_PARAMS, PUBLISHED, RLR, SBASE, DenseCoeffs,
    GranularCoeffs, RoutedCoeffs, active_params, bilinear_log_loss, check_granularity,
    coefficients, cutoff_size, dense_log_loss, e_hat, effective_params, granular_loss,
    routed_log_loss, routed_loss, routed_total_params, slopes, total_params, train_flops,
    train_flops_per_token)
from routing_lm.scaling.plan import (GranularPlan, RoutedPlan, dense_flops_for_loss,
                                     optimal_dense, optimal_granular, optimal_routed)
