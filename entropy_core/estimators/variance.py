"""Delete-one / delete-a-group jackknife of a whole estimator that is a smooth function of sums.

Every estimate in entropy-core is f(Σ_i x_i) for per-sequence rows x_i ∈ R^K (ratios of sums, and
their derivatives). The jackknife re-evaluates f on the sums with one sequence (or one prompt group)
left out, so the standard error is that of the WHOLE estimator, not of a per-shard mean (DESIGN §1.5,
trap §2.4). Leave-one-out sums are formed from prefix and suffix sums, not total − x_j, so one
dominant importance weight cannot cancel away the precision of the others.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Estimate:
    """A point estimate on the full sample with its jackknife standard error (floats)."""
    value: float
    se: float


def group_sums(parts: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Rows (N, K) summed within each group -> (n_groups, K); groups None means one row per group."""
    if groups is None:
        return parts
    _, inv = torch.unique(groups, return_inverse=True)
    out = parts.new_zeros(int(inv.max()) + 1, parts.shape[1])
    return out.index_add_(0, inv, parts)


def leave_one_out_sums(rows: torch.Tensor) -> torch.Tensor:
    """(G, K) -> (G, K) with row g = Σ_{h≠g} rows[h], from exclusive prefix + suffix sums."""
    zero = rows.new_zeros(1, rows.shape[1])
    prefix = torch.cat([zero, rows.cumsum(0)[:-1]])                     # Σ_{h<g}
    suffix = torch.cat([rows.flip(0).cumsum(0).flip(0)[1:], zero])      # Σ_{h>g}
    return prefix + suffix


def jackknife(parts: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor],
              groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and jackknife standard error of f(Σ_i parts_i).

    Args:
        parts: (N, K) float64 per-sequence contributions.
        f: maps sums (..., K) -> (..., M) or (...); applied to the full sums and to each leave-out.
        groups: (N,) int cluster labels (e.g. prompt index when several responses share a prompt);
            the jackknife then deletes one whole group at a time.
    Returns: value, se with f's output shape (float64); se is NaN when fewer than 2 groups.
    """
    parts = parts.double()
    rows = group_sums(parts, groups)                                   # (G, K)
    G = rows.shape[0]
    value = f(rows.sum(0))
    if G < 2:
        return value, torch.full_like(value, float("nan"))
    loo = f(leave_one_out_sums(rows))                                  # (G, ...)
    se = ((G - 1) / G * (loo - loo.mean(0)).pow(2).sum(0)).sqrt()      # jackknife variance, DESIGN §1.5
    return value, se


def estimate(parts: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor],
             groups: torch.Tensor | None = None) -> Estimate:
    """`jackknife` for a scalar f, as an Estimate of Python floats."""
    value, se = jackknife(parts, f, groups)
    return Estimate(float(value), float(se))
