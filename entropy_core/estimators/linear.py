"""Derivatives of the SNIS estimator at η = 0 on the same sample: exact (forward-mode AD), by finite
differences, and a lower-variance slope (DESIGN §1.3, §1.4).

With u_i the proposal ratio (1 when E came from π_θ), N = Σ u H, D = Σ u T and primes for d/dη
along v (w' = D_vS w, w'' = (D²_vS + (D_vS)²) w at η = 0):
    slope     = N'/D − N D'/D²,                 N' = Σ u (D_vH + H D_vS),  D' = Σ u T D_vS
    curvature = N''/D − 2N'D'/D² − N D''/D² + 2N D'²/D³,
                N'' = Σ u (D²H + 2 D_vH D_vS + H (D²S + D_vS²)),  D'' = Σ u T (D²S + D_vS²)
With u = 1 the slope is (1/T_tot) Σ_i [D_vH_i + (H_i − H̄ T_i) D_vS_i], DESIGN §1.3.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..scoring import SequenceStats, TokenScores, jvp_scores, score_tokens
from .true_delta import _normalised, batch_tensors, log_proposal_ratio
from .variance import Estimate, estimate


@dataclass
class LinearResult:
    """First and second derivatives of ΔĤ at η = 0 and how they were obtained."""
    slope_exact: Estimate
    slope_vr: Estimate | None = None
    slope_fd: Estimate | None = None
    curvature: Estimate | None = None
    curvature_fd: Estimate | None = None
    fd_step: float | None = None
    scores: TokenScores | None = None       # the JVP pass: S, H, dS, dH (d2S, d2H) per token


def _slope_f(s: torch.Tensor) -> torch.Tensor:
    Np, D, N, Dp = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
    return Np / D - N * Dp / D ** 2


def slope_exact(stats: SequenceStats, *, logq: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> Estimate:
    """ΔĤ'(0) from per-sequence S, H, T, D_vS, D_vH (N,) float64, with its jackknife se."""
    u = _normalised(log_proposal_ratio(stats.S, logq))
    parts = torch.stack([u * (stats.dH + stats.H * stats.dS), u * stats.T, u * stats.H, u * stats.T * stats.dS], -1)
    return estimate(parts, _slope_f, groups)


def _curvature_f(s: torch.Tensor) -> torch.Tensor:
    N, D, Np, Npp, Dp, Dpp = (s[..., k] for k in range(6))
    return Npp / D - 2 * Np * Dp / D ** 2 - N * Dpp / D ** 2 + 2 * N * Dp ** 2 / D ** 3


def curvature_exact(stats: SequenceStats, *, logq: torch.Tensor | None = None,
                    groups: torch.Tensor | None = None) -> Estimate:
    """ΔĤ''(0) from per-sequence S, H, T and first and second directional derivatives."""
    u = _normalised(log_proposal_ratio(stats.S, logq))
    w2 = stats.d2S + stats.dS ** 2                                    # w''/w at η = 0
    parts = torch.stack([u * stats.H, u * stats.T, u * (stats.dH + stats.H * stats.dS),
                         u * (stats.d2H + 2 * stats.dH * stats.dS + stats.H * w2),
                         u * stats.T * stats.dS, u * stats.T * w2], -1)
    return estimate(parts, _curvature_f, groups)


def finite_difference(base: SequenceStats, plus: SequenceStats, minus: SequenceStats, h: float, *,
                      logq: torch.Tensor | None = None, groups: torch.Tensor | None = None
                      ) -> tuple[Estimate, Estimate]:
    """Central differences of the SNIS estimator itself: slope (ΔĤ(h) − ΔĤ(−h))/2h and curvature
    (ΔĤ(h) + ΔĤ(−h))/h², from the same three passes, each with a jackknife se."""
    lu = log_proposal_ratio(base.S, logq)
    wp, wm, u = _normalised(lu + plus.S - base.S), _normalised(lu + minus.S - base.S), _normalised(lu)
    parts = torch.stack([wp * plus.H, wp * plus.T, wm * minus.H, wm * minus.T, u * base.H, u * base.T], -1)

    def slope(s):
        return (s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3]) / (2 * h)

    def curv(s):
        return (s[..., 0] / s[..., 1] + s[..., 2] / s[..., 3] - 2 * s[..., 4] / s[..., 5]) / h ** 2

    return estimate(parts, slope, groups), estimate(parts, curv, groups)


def _vr_coefficients(scores: TokenScores, u: torch.Tensor) -> torch.Tensor:
    """Per-token coefficients (R_{i,k} − c_k) of D_vS_{i,k} in the variance-reduced slope, (N, L) float64.

    R_{i,k} = Σ_{j>k} (H_{i,j} − H̄) is the centred entropy-to-go after token k (the j ≤ k terms are
    prefix-only, so they belong to the baseline) and c_k is the mean of R at response position k over
    the OTHER sequences (leave-one-out, so it does not depend on sequence i).
    Args: scores: S, H per token (N, L); u: (N,) normalised proposal weights.
    """
    st = scores.per_sequence()
    m = scores.mask.double()                                               # (N, L)
    Hbar = (u * st.H).sum() / (u * st.T).sum()
    Hc = (scores.H - Hbar) * m                                             # (N, L) centred entropies
    R = Hc.flip(-1).cumsum(-1).flip(-1) - Hc                               # (N, L) Σ_{j>k}
    # response-relative position of each scored token, so c_k pools sequences at the same step k
    k = (scores.mask.long().cumsum(-1) - 1).clamp(min=0)                   # (N, L)
    K = int(k.max()) + 1
    sumR = torch.zeros(K, dtype=torch.float64).index_add_(0, k[scores.mask], R[scores.mask])
    cnt = torch.zeros(K, dtype=torch.float64).index_add_(0, k[scores.mask], m[scores.mask])
    others = (cnt[k] - 1).clamp(min=1)
    c = torch.where(cnt[k] > 1, (sumR[k] - R) / others, torch.zeros_like(R)) * m   # leave-one-out mean
    return (R - c) * m


def slope_variance_reduced(scores: TokenScores, *, logq: torch.Tensor | None = None,
                           groups: torch.Tensor | None = None) -> Estimate:
    """The exact slope's expectation with less variance (DESIGN §1.4): the score term
    (H_i − H̄ T_i) D_vS_i is replaced by Σ_k (R_{i,k} − c_k) D_vS_{i,k} (see `_vr_coefficients`).
    Args: scores with S, H, dS per token (N, L).
    """
    st = scores.per_sequence()
    u = _normalised(log_proposal_ratio(st.S, logq))                       # (N,)
    score_term = (_vr_coefficients(scores, u) * scores.dS).sum(-1)        # (N,)
    parts = torch.stack([u * (st.dH + score_term), u * st.T], -1)
    return estimate(parts, lambda s: s[..., 0] / s[..., 1], groups)


def default_fd_step(lr: float) -> float:
    """A tenth of the learning rate: η is learning-rate-like (η = lr is the optimizer's own step), so h
    sits well inside the near-linear range without depending on the η grid being measured."""
    return 0.1 * float(lr)


def linear_estimates(model: torch.nn.Module, batch, v: Mapping[str, torch.Tensor], *, quadratic: bool = True,
                     variance_reduced: bool = True, fd_step: float | None = None, temperature: float = 1.0,
                     microbatch_size: int = 8, logq: torch.Tensor | None = None,
                     groups: torch.Tensor | None = None, base_scores: TokenScores | None = None) -> LinearResult:
    """Exact slope (one JVP, or a nested JVP when `quadratic`), and with `fd_step` the finite-difference
    slope and curvature of the SNIS estimator from two more passes at ±h (reusing `base_scores`)."""
    ids, am, rm = batch_tensors(batch)
    js = jvp_scores(model, ids, am, rm, v, order=2 if quadratic else 1, temperature=temperature,
                    microbatch_size=microbatch_size)
    fd = None
    if fd_step is not None:
        base = base_scores or score_tokens(model, ids, am, rm, temperature=temperature, microbatch_size=microbatch_size)
        plus, minus = (score_tokens(model, ids, am, rm, v=v, eta=s * fd_step, temperature=temperature,
                                    microbatch_size=microbatch_size) for s in (1, -1))
        fd = (base, plus, minus, fd_step)
    return linear_from_passes(js, fd, quadratic=quadratic, variance_reduced=variance_reduced, logq=logq,
                              groups=groups)


def linear_from_passes(js: TokenScores, fd: tuple | None, *, quadratic: bool, variance_reduced: bool,
                       logq: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> LinearResult:
    """The estimates of `linear_estimates` from passes already scored (by one process or gathered
    across ranks): the JVP pass `js`, and `fd` = (θ, θ+h v, θ−h v scores, h) or None."""
    st = js.per_sequence()
    out = LinearResult(slope_exact=slope_exact(st, logq=logq, groups=groups), scores=js)
    if variance_reduced:
        out.slope_vr = slope_variance_reduced(js, logq=logq, groups=groups)
    if quadratic:
        out.curvature = curvature_exact(st, logq=logq, groups=groups)
    if fd is not None:
        base, plus, minus, h = fd
        out.slope_fd, out.curvature_fd = finite_difference(base.per_sequence(), plus.per_sequence(),
                                                           minus.per_sequence(), h, logq=logq, groups=groups)
        out.fd_step = h
    return out
