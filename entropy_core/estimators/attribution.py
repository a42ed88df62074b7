"""Which U sequences move the entropy: c_i = ⟨∇Ĥ, v_i⟩, the share of sequence i in the exact slope.

DESIGN §1.6. In the linear regime ΔĤ ≈ η (⟨∇Ĥ, v_base⟩ + Σ_i c_i). With v_i = P ⊙ g_i,
P = −(1−β₁)/((1−β₁ᵗ) den) and g_i = a_i ∇S_i (a_i the Dr.GRPO coefficient of sequence i),
    c_i = ⟨u, P ⊙ a_i ∇S_i⟩ = a_i · D_{P⊙u} S_i,
so every c_i comes from ONE reverse pass over E (u = ∇Ĥ through the exact-derivative surrogate)
and ONE forward-mode pass over U along P ⊙ u, instead of one gradient per U sequence.

The surrogate, with ω_j the proposal ratio, D = Σ ω T and H̄ = Σ ω H / D (coefficients detached):
    exact:  L = Σ_j ω_j [H_j + (H_j − H̄ T_j) S_j] / D                     (∇L = ∇Ĥ, DESIGN §1.3)
    vr:     L = Σ_j ω_j [H_j + Σ_k (R_{j,k} − c_k) S_{j,k}] / D              (DESIGN §1.4)
Standard errors with respect to E: E is split into K groups and the per-group pieces u_k of u are
kept (same reverse pass, accumulated per group). A K-group delta-method jackknife of the whole ratio
then needs the K directions P ⊙ u_k over U (and one more, Y = ∇ Σ ω T S, for the ratio's
denominator), so error bars cost K + 1 extra tangents over U (2K + 1 with the vr column).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from torch.func import functional_call, jvp

from ..params import build_functional_params_named, dot_named, get_trainable_named
from ..scoring import TokenScores, check_batch, forward_ad_attention, position_ids_from_mask, token_logprobs_entropy
from ..update import UpdateResult, drgrpo_coefficients
from .linear import _vr_coefficients
from .true_delta import _normalised, batch_tensors, log_proposal_ratio


@dataclass
class AttributionResult:
    """Per-U-sequence shares of the slope, (N_U,) float64, and the base share; se w.r.t. the E sample."""
    c: torch.Tensor
    c_se: torch.Tensor
    base: float
    slope: float                    # Σ c + base = ⟨∇Ĥ, v⟩, the exact slope
    c_vr: torch.Tensor | None = None
    c_vr_se: torch.Tensor | None = None
    base_vr: float | None = None
    slope_vr: float | None = None
    passes: dict | None = None      # work done, in passes over E and tangents over U


def _split_groups(n: int, k: int) -> list[torch.Tensor]:
    """k contiguous groups of n sequences; k = 0 means one group (no error bars)."""
    k = 1 if k == 0 else max(2, min(k, n))
    return [idx for idx in torch.arange(n).tensor_split(k) if len(idx)]


def surrogate_gradients(model: torch.nn.Module, batch, theta_scores: TokenScores, *, groups: int = 8,
                        variance_reduced: bool = True, temperature: float = 1.0, microbatch_size: int = 8,
                        logq: torch.Tensor | None = None):
    """Per-group gradients of the exact (and vr) surrogates, and (with groups) of Y = Σ ω T S / D.

    Args: theta_scores: the θ pass over the same batch (S, H per token) — fixes ω, H̄, D and the vr
          coefficients. groups: K contiguous groups of E for the error bars; 0 = none (one group, no Y).
    Returns: (u_k list, z_k list or None, y or None, index groups, C_k / D, D_k / D as (K,) float64, H̄).
    """
    ids, am, rm = batch_tensors(batch)
    check_batch(ids, am, rm)
    st = theta_scores.per_sequence()
    w = _normalised(log_proposal_ratio(st.S, logq))                                 # (N,) ω
    D = float((w * st.T).sum())
    Hbar = float((w * st.H).sum()) / D
    coef_exact = w * (st.H - Hbar * st.T) / D                                       # (N,) detached
    vr_tok = w[:, None] * _vr_coefficients(theta_scores, w) / D if variance_reduced else None  # (N, L)
    named = get_trainable_named(model)
    tensors = list(named.values())
    device = tensors[0].device
    idx_groups = _split_groups(ids.shape[0], groups)

    def zeros():
        return {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in named.items()}

    u_k, z_k, y = [], [] if variance_reduced else None, zeros() if groups else None
    for idx in idx_groups:
        u, z = zeros(), zeros() if variance_reduced else None
        for a in range(0, len(idx), microbatch_size):
            sl = idx[a:a + microbatch_size]
            b_ids, b_am, b_rm = ids[sl].to(device), am[sl].to(device), rm[sl].to(device)
            first = int(b_rm.bool().float().argmax(-1).min())                        # earliest scored position
            logits = model(b_ids, attention_mask=b_am, position_ids=position_ids_from_mask(b_am),
                           logits_to_keep=b_ids.shape[1] - first + 1, use_cache=False).logits[:, :-1]
            S, H = token_logprobs_entropy(logits, b_ids[:, first:], temperature)     # (n, L-first) float64
            m = b_rm[:, first:].double()
            S, H = S * m, H * m
            ww, cw = w[sl].to(device), coef_exact[sl].to(device)
            entropy_part = (ww[:, None] * H).sum() / D                                # Σ ω H_j / D
            losses = [(entropy_part + (cw[:, None] * S).sum(), u)]                     # exact surrogate
            if variance_reduced:
                losses.append((entropy_part + (vr_tok[sl, first:].to(device) * S).sum(), z))
            if groups:
                losses.append(((ww * st.T[sl].to(device) * S.sum(-1)).sum() / D, y))     # Y
            for j, (loss, target) in enumerate(losses):
                grads = torch.autograd.grad(loss, tensors, retain_graph=j < len(losses) - 1, allow_unused=True)
                for n, g in zip(named, grads):
                    if g is not None:
                        target[n] += g.double()
        u_k.append(u)
        if variance_reduced:
            z_k.append(z)
    C_k = torch.stack([(w[idx] * st.H[idx]).sum() for idx in idx_groups])
    D_k = torch.stack([(w[idx] * st.T[idx]).sum() for idx in idx_groups])
    return u_k, z_k, y, idx_groups, C_k / D, D_k / D, Hbar


def _directional_S(model, u_batch, direction: Mapping[str, torch.Tensor], temperature, microbatch_size):
    """D_d S_i for every U sequence i, (N_U,) float64: one forward-mode pass over U. Only the log-prob
    of the sampled token is differentiated (not the full-vocabulary entropy), which keeps it one JVP."""
    ids, am, rm = batch_tensors(u_batch)
    p0 = next(model.parameters())
    eta0 = torch.zeros((), dtype=p0.dtype, device=p0.device)
    out = []
    with forward_ad_attention(model):
        for a in range(0, ids.shape[0], microbatch_size):
            b_ids, b_am, b_rm = (t[a:a + microbatch_size].to(p0.device) for t in (ids, am, rm))
            first = int(b_rm.bool().float().argmax(-1).min())
            kw = dict(attention_mask=b_am, position_ids=position_ids_from_mask(b_am),
                      logits_to_keep=b_ids.shape[1] - first + 1, use_cache=False)

            def S_of(eta):
                params = build_functional_params_named(model, direction, eta)
                logits = functional_call(model, params, (b_ids,), kw, strict=False).logits[:, :-1]
                logp = torch.log_softmax(logits.double() / temperature, -1)
                S = logp.gather(-1, b_ids[:, first:, None])[..., 0]                # (n, L-first)
                return (S * b_rm[:, first:]).sum(-1)                                 # (n,)

            _, dS = jvp(S_of, (eta0,), (torch.ones_like(eta0),))
            out.append(dS.cpu())
    return torch.cat(out)


def _shares(model, u_batch, update: UpdateResult, grads, a, temperature, microbatch_size):
    """a_i · D_{P⊙g} S_i for each direction g, stacked (len(grads), N_U)."""
    out = []
    for g in grads:
        d = {n: update.precond[n] * g[n] for n in g}                                # P ⊙ g
        out.append(a * _directional_S(model, u_batch, d, temperature, microbatch_size))
    return torch.stack(out)


def _delta_se(c_k: torch.Tensor, c: torch.Tensor, D_k: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """K-group delta-method jackknife of a ratio: ψ_ik = c_ik − c_i D_k/D − extra_ik, se² = K/(K−1) Σ_k (ψ−ψ̄)²."""
    psi = c_k - c[None] * D_k[:, None]
    if extra is not None:
        psi = psi - extra
    K = c_k.shape[0]
    return (K / (K - 1) * (psi - psi.mean(0)).pow(2).sum(0)).sqrt()


def attribute(model: torch.nn.Module, e_batch, u_batch, update: UpdateResult, theta_scores: TokenScores, *,
              v_base: Mapping[str, torch.Tensor], groups: int = 8, variance_reduced: bool = True,
              temperature: float = 1.0, microbatch_size: int = 8, logq: torch.Tensor | None = None
              ) -> AttributionResult:
    """Per-U-sequence attribution of the exact (and variance-reduced) slope, DESIGN §1.6.

    Args:
        e_batch: E (input_ids, attention_mask, response_mask); theta_scores: its θ pass.
        u_batch: U with advantages and group, as given to compute_update_vector; update: its result.
        v_base: the momentum / weight-decay part of v (UpdateResult.base, or v − Σ v_i).
        groups: K groups of E for the error bars (K + 1 extra tangents over U, 2K + 1 with vr);
            0 skips them: then the cost is one reverse pass over E and one tangent over U per column.
    Returns: AttributionResult with c (N_U,), c_se (N_U,) (NaN when groups = 0), base, slope (and vr columns).
    """
    was_training = model.training
    model.eval()                                        # dropout off, as in the update-vector pass
    try:
        uk, zk, y, _, Ck, Dk, Hbar = surrogate_gradients(model, e_batch, theta_scores, groups=groups,
                                                         variance_reduced=variance_reduced, temperature=temperature,
                                                         microbatch_size=microbatch_size, logq=logq)
    finally:
        model.train(was_training)
    _, _, rm = batch_tensors(u_batch)
    a = drgrpo_coefficients(u_batch["advantages"], u_batch["group"], rm.sum(-1))    # (N_U,)
    c_k = _shares(model, u_batch, update, uk, a, temperature, microbatch_size)       # (K, N_U)
    c = c_k.sum(0)
    c_se = torch.full_like(c, float("nan"))
    if groups:
        m = _shares(model, u_batch, update, [y], a, temperature, microbatch_size)[0]  # (N_U,) ⟨Y, v_i⟩ / D
        # ratio correction: −(M_i/D)·(C_k − H̄ D_k)/D, with C_k, D_k already divided by D
        c_se = _delta_se(c_k, c, Dk, m[None] * (Ck - Hbar * Dk)[:, None])
    u = {n: sum(g[n] for g in uk) for n in uk[0]}
    base = float(dot_named(u, v_base))
    out = AttributionResult(c=c, c_se=c_se, base=base, slope=float(c.sum()) + base,
                            passes=dict(e_backward=1 + int(variance_reduced) + int(groups > 0),
                                        u_tangents=len(uk) + int(groups > 0)))
    if variance_reduced:
        cv_k = _shares(model, u_batch, update, zk, a, temperature, microbatch_size)
        out.c_vr = cv_k.sum(0)
        out.c_vr_se = _delta_se(cv_k, out.c_vr, Dk, None) if groups else torch.full_like(out.c_vr, float("nan"))
        z = {n: sum(g[n] for g in zk) for n in zk[0]}
        out.base_vr = float(dot_named(z, v_base))
        out.slope_vr = float(out.c_vr.sum()) + out.base_vr
        out.passes["u_tangents"] += len(zk)
    return out


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties) of two (N,) tensors."""
    def ranks(t):
        t = t.double()
        r = torch.empty_like(t)
        order = t.argsort()
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for val in t.unique():                                   # ties share their mean rank
            tie = t == val
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def covariance_proxy(token_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Per-sequence share of −Cov(log π(y_k), A) over all U tokens, the entropy-change proxy of the
    entropy-collapse literature: proxy_i = −Σ_k (S_{i,k} − S̄)(A_i − Ā) / N_tokens, token-weighted means.

    Args: token_logp (N, L) per-token log-probs; mask (N, L) scored tokens; advantages (N,).
    Returns: (N,) float64; the proxies sum to −Cov.
    """
    m = mask.double()
    n_tok = m.sum()
    S_bar = (token_logp.double() * m).sum() / n_tok
    A = advantages.double()
    A_bar = (A[:, None] * m).sum() / n_tok
    return -(((token_logp.double() - S_bar) * m).sum(-1) * (A - A_bar)) / n_tok
