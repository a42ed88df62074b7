"""Estimators of the entropy change: true ΔĤ(η) by SNIS, its exact and finite-difference derivatives,
the variance-reduced slope, and jackknife standard errors (DESIGN §1.2–§1.5)."""
from .linear import (LinearResult, curvature_exact, default_fd_step, finite_difference, linear_estimates,
                     slope_exact, slope_variance_reduced)
from .true_delta import TrueDeltaPoint, TrueDeltaResult, entropy_base, ess, snis_delta, true_delta
from .variance import Estimate, jackknife

__all__ = ["LinearResult", "curvature_exact", "default_fd_step", "finite_difference", "linear_estimates",
           "slope_exact", "slope_variance_reduced", "TrueDeltaPoint", "TrueDeltaResult", "entropy_base", "ess",
           "snis_delta", "true_delta", "Estimate", "jackknife"]
