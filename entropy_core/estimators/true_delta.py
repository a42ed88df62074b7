"""True entropy change ΔĤ(η) = Ĥ(θ+ηv) − Ĥ(θ) by self-normalised importance sampling (DESIGN §1.2).

E was sampled from a proposal q (π_θ itself, or a cheaper copy of it such as bf16); with
u_i = exp(S_i(θ) − S^q_i) and w_i = exp(S_i(θ') − S_i(θ)):
    Ĥ(θ)  = Σ u_i H_i(θ)      / Σ u_i T_i
    Ĥ(θ') = Σ u_i w_i H_i(θ') / Σ u_i w_i T_i
H_i(θ') is re-scored at θ' (the entropies move too). All arithmetic is float64 with a max-shift of
the log-weights; the θ pass is scored once and reused for every η.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..scoring import SequenceStats, TokenScores, score_tokens
from .variance import Estimate, estimate, jackknife


@dataclass
class TrueDeltaPoint:
    """ΔĤ(η) on one η with its jackknife se and the importance-weight diagnostics."""
    eta: float
    delta_h: float
    se: float
    H_eta: float          # Ĥ(θ+ηv)
    ess: float            # (Σ uw)² / Σ (uw)², in sequences
    logw_min: float
    logw_median: float
    logw_max: float
    clip_fraction: float  # share of sequences whose log-weight was clipped (0 when clipping is off)


@dataclass
class TrueDeltaResult:
    """Ĥ(θ) with its se, one TrueDeltaPoint per η, and the per-sequence statistics behind them."""
    H_base: Estimate
    points: list[TrueDeltaPoint]
    ess_proposal: float
    tokens: int
    sequences: int
    base: SequenceStats
    per_eta: list[SequenceStats] = field(default_factory=list)


def batch_tensors(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, response_mask) from a mapping or an object with those attributes."""
    get = batch.__getitem__ if isinstance(batch, Mapping) else lambda k: getattr(batch, k)
    return get("input_ids"), get("attention_mask"), get("response_mask")


def log_proposal_ratio(S_theta: torch.Tensor, logq: torch.Tensor | None) -> torch.Tensor:
    """log u_i = S_i(θ) − S^q_i, or zeros when E was sampled from π_θ itself. (N,) float64."""
    if logq is None:
        return torch.zeros_like(S_theta)
    if logq.shape != S_theta.shape or not torch.isfinite(logq).all():
        raise ValueError(f"logq must be finite with shape {tuple(S_theta.shape)}, got {tuple(logq.shape)}")
    return S_theta - logq.double()


def _normalised(logw: torch.Tensor) -> torch.Tensor:
    return (logw - logw.max()).exp()                                   # max-shift: largest weight is 1


def ess(logw: torch.Tensor) -> float:
    """Effective sample size (Σw)²/Σw² from log-weights."""
    w = _normalised(logw)
    return float(w.sum() ** 2 / w.pow(2).sum())


def _ratio(s: torch.Tensor) -> torch.Tensor:
    return s[..., 0] / s[..., 1]


def _ratio_difference(s: torch.Tensor) -> torch.Tensor:
    return s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3]


def entropy_base(base: SequenceStats, *, logq: torch.Tensor | None = None,
                 groups: torch.Tensor | None = None) -> Estimate:
    """Ĥ(θ) = Σ u H / Σ u T with its jackknife se."""
    u = _normalised(log_proposal_ratio(base.S, logq))
    return estimate(torch.stack([u * base.H, u * base.T], -1), _ratio, groups)


def snis_delta(base: SequenceStats, shifted: SequenceStats, eta: float, *, logq: torch.Tensor | None = None,
               groups: torch.Tensor | None = None, logw_clip: float | None = None) -> TrueDeltaPoint:
    """ΔĤ(η) from the per-sequence statistics at θ (`base`) and at θ+ηv (`shifted`), DESIGN §1.2.

    Args: base, shifted: SequenceStats (N,) float64 of the same sequences; logq (N,) proposal log-probs;
          groups (N,) cluster labels for the jackknife; logw_clip: upper clip on log w (off by default).
    """
    lu = log_proposal_ratio(base.S, logq)                              # (N,) log u
    logw = shifted.S - base.S                                          # (N,) log w, DESIGN §1.2
    clipped = torch.zeros_like(logw, dtype=torch.bool)
    if logw_clip is not None:
        clipped = logw > logw_clip
        logw = logw.clamp(max=logw_clip)
    uw = _normalised(lu + logw)                                        # (N,) u·w up to one constant
    u = _normalised(lu)
    parts = torch.stack([uw * shifted.H, uw * shifted.T, u * base.H, u * base.T], -1)   # (N, 4)
    d = estimate(parts, _ratio_difference, groups)
    H_eta = float(_ratio(parts[:, :2].sum(0)))
    return TrueDeltaPoint(eta=float(eta), delta_h=d.value, se=d.se, H_eta=H_eta, ess=ess(lu + logw),
                          logw_min=float(logw.min()), logw_median=float(logw.median()),
                          logw_max=float(logw.max()), clip_fraction=float(clipped.double().mean()))


def true_delta(model: torch.nn.Module, batch, v: Mapping[str, torch.Tensor], etas: Sequence[float], *,
               temperature: float = 1.0, microbatch_size: int = 8, logq: torch.Tensor | None = None,
               groups: torch.Tensor | None = None, logw_clip: float | None = None,
               base_scores: TokenScores | None = None,
               progress: Callable[[int, int], None] | None = None) -> TrueDeltaResult:
    """Score E at θ once (or reuse `base_scores`) and at θ+ηv for every η; return ΔĤ(η) with errors.

    Args: batch: input_ids, attention_mask, response_mask (N, L); v: update vector name -> tensor.
    Raises: ScoringError (empty pass, non-finite value), ValueError for η = 0 or a non-finite η.
    """
    bad = [e for e in etas if e == 0 or not torch.isfinite(torch.tensor(float(e)))]
    if bad or not etas:
        raise ValueError(f"etas must be a non-empty list of finite non-zero step sizes, got {list(etas)}")
    ids, am, rm = batch_tensors(batch)
    if base_scores is None:
        base_scores = score_tokens(model, ids, am, rm, temperature=temperature, microbatch_size=microbatch_size)
    base = base_scores.per_sequence()
    points, per_eta = [], []
    for j, eta in enumerate(etas):
        shifted = score_tokens(model, ids, am, rm, v=v, eta=eta, temperature=temperature,
                               microbatch_size=microbatch_size).per_sequence()
        points.append(snis_delta(base, shifted, eta, logq=logq, groups=groups, logw_clip=logw_clip))
        per_eta.append(shifted)
        if progress:
            progress(j + 1, len(etas))
    return TrueDeltaResult(H_base=entropy_base(base, logq=logq, groups=groups), points=points,
                           ess_proposal=ess(log_proposal_ratio(base.S, logq)), tokens=int(base.T.sum()),
                           sequences=int(base.T.numel()), base=base, per_eta=per_eta)


__all__ = ["TrueDeltaPoint", "TrueDeltaResult", "snis_delta", "entropy_base", "true_delta", "ess",
           "log_proposal_ratio", "batch_tensors", "jackknife"]
