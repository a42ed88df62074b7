"""Which U sequences move the entropy: c_i = ⟨∇Ĥ, v_i⟩, the share of sequence i in the exact slope.

DESIGN §1.6. In the linear regime ΔĤ ≈ η (⟨∇Ĥ, v_base⟩ + Σ_i c_i). With v_i = P ⊙ g_i,
P = −(1−β₁)/((1−β₁ᵗ) den) and g_i = a_i ∇S_i (a_i the Dr.GRPO coefficient of sequence i),
    c_i = ⟨u, P ⊙ a_i ∇S_i⟩ = a_i · D_{P⊙u} S_i,
so every c_i comes from a reverse pass over E (u = ∇Ĥ through the exact-derivative surrogate)
and one pass over U giving D_{P⊙u} S_i for all i at once, instead of one gradient per U sequence.

The surrogate, with ω_j the proposal ratio, D = Σ ω T and H̄ = Σ ω H / D (coefficients detached):
    exact:  L = Σ_j ω_j [H_j + (H_j − H̄ T_j) S_j] / D                     (∇L = ∇Ĥ, DESIGN §1.3)
    vr:     L = Σ_j ω_j [H_j + Σ_k (R_{j,k} − c_k) S_{j,k}] / D              (DESIGN §1.4)
Both columns share the work. Over E: ONE forward feeds one backward per surrogate (the graph is kept
for the next); for plain-head models the vocabulary projection's gradients are formed once in closed
form (`scoring.head_gradients`) and each backward starts at the decoder output. Over U: with LoRA
every direction lives on nn.Linear weights, and ONE forward + ONE backward of Σ_i S_i give every
row's gradient at every Linear output, from which D_d S_i follows for any number of directions d by
small einsums (`_directional_S_reverse`); other parameters fall back to
ONE forward-mode pass with the directions as a batch of tangents on one primal (vmap over one jvp).
Standard errors with respect to E: E is split into K groups and the per-group pieces u_k of u are
kept (same reverse pass, accumulated per group). A K-group delta-method jackknife of the whole ratio
then needs the K directions P ⊙ u_k over U and one more, Y = ∇ Σ ω T S / D, the derivative of the
ratio's denominator: K + 1 directions (2K + 1 with the vr column), all in the same pass over U. Y is
a third backward seed, independent of the other two (a per-sequence S-only weight, where exact has
per-sequence weights on S and H and vr per-token ones), and a backward through frozen weights costs
about a forward; Y only scales the correction term of the error bars, so it is estimated from the
first group of E alone (1/K of a backward; tests/test_attribution.py holds the error bars to the
brute-force jackknife). Costs measured in benchmarks/README.md.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from torch.func import jvp, vmap

from ..fastpaths import resolve_microbatching
from ..params import dot_named, get_trainable_named
from ..scoring import (TokenScores, check_batch, constant_weight_linears, forward_ad_attention, head_gradients,
                       score_tokens, scored_token_logprobs)
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
    passes: dict | None = None      # work done: passes over E and U, backwards over E, tangents over U
    u_scores: TokenScores | None = None   # S, H per token of U at θ, from the same pass over U


def _split_groups(n: int, k: int) -> list[torch.Tensor]:
    """k contiguous groups of n sequences; k = 0 means one group (no error bars)."""
    k = 1 if k == 0 else max(2, min(k, n))
    return [idx for idx in torch.arange(n).tensor_split(k) if len(idx)]


def surrogate_gradients(model: torch.nn.Module, batch, theta_scores: TokenScores, *, groups: int = 8,
                        variance_reduced: bool = True, temperature: float = 1.0, microbatch_size: int | str = 8,
                        logq: torch.Tensor | None = None):
    """Per-group gradients of the exact (and vr) surrogates, and (with groups) an estimate of
    Y = ∇ Σ ω T S / D.

    Each surrogate is Σ_tok α_tok S_tok + β Σ_j ω_j H_j / D with its own per-token α (β = 1 for the
    two surrogates, 0 for Y), so one forward per microbatch (length-bucketed and packed, `fastpaths`)
    serves every surrogate: one backward each, the graph kept until the last. Each backward starts at
    the decoder output with α dS/dx + β dH/dx from `head_gradients` when the model allows it.
    Y only enters the error bars (the ratio correction of the delta method), so it is estimated from
    the first group alone, as the ratio Y_1 · D / D_1: a third backward over 1/K of E instead of all
    of it. The shares themselves never use it.
    Args: theta_scores: the θ pass over the same batch (S, H per token) — fixes ω, H̄, D and the vr
          coefficients. groups: K contiguous groups of E for the error bars; 0 = none (one group, no Y).
    Returns: (u_k list, z_k list or None, Y estimate or None, index groups, C_k / D, D_k / D as (K,)
             float64, H̄).
    """
    ids, am, rm = (t.cpu() for t in batch_tensors(batch))
    check_batch(ids, am, rm)
    st = theta_scores.per_sequence()
    w = _normalised(log_proposal_ratio(st.S, logq))                                 # (N,) ω
    D = float((w * st.T).sum())
    Hbar = float((w * st.H).sum()) / D
    m = theta_scores.mask.double()                                                  # (N, L)
    alpha = [(w * (st.H - Hbar * st.T) / D)[:, None] * m]                          # exact: ω_j (H_j − H̄T_j) / D
    if variance_reduced:
        alpha.append(w[:, None] * _vr_coefficients(theta_scores, w) / D)             # vr: ω_j (R_jk − c_k) / D
    beta = [1.0] * len(alpha)
    if groups:
        alpha.append((w * st.T / D)[:, None] * m)                                    # Y: ω_j T_j / D
        beta.append(0.0)
    alpha = torch.stack(alpha)                                                      # (C, N, L)
    named = get_trainable_named(model)
    tensors = list(named.values())
    device = tensors[0].device
    alpha, w_dev = alpha.to(device), (w / D).to(device)
    idx_groups = _split_groups(ids.shape[0], groups)
    group_of = torch.zeros(ids.shape[0], dtype=torch.long)                          # (N,) group of each row
    for k, idx in enumerate(idx_groups):
        group_of[idx] = k
    n_sur = [len(beta) - int(bool(groups) and k > 0) for k in range(len(idx_groups))]   # Y on the first group only
    acc = [{n: torch.zeros((len(idx_groups), *p.shape), dtype=torch.float64, device=device) for n, p in named.items()}
           for _ in beta]                                                          # [surrogate] name -> (K, *shape)
    # With LoRA every trainable tensor is a Linear weight, and rows are independent, so a backward gives
    # each row's gradient at every Linear output and the groups can share microbatches (bucketed
    # together, less padding): the first group alone (it also carries Y), then all others pooled.
    # Otherwise each group runs on its own.
    sites = _linear_weights(model, named)
    parts = idx_groups if sites is None else [idx_groups[0]] + ([torch.cat(idx_groups[1:])] if groups else [])
    for part in parts:
        sub = [t[part] for t in (ids, am, rm)]
        for mb in resolve_microbatching(model, sub[1], microbatch_size, None, mode="grad"):
            packed = [t.to(device) for t in mb.pack(*sub)]
            g_mb = group_of[part[mb.rows]]                                           # (n,) group of each row
            one_group = bool((g_mb == g_mb[0]).all())
            r, col = mb.scored_coordinates(sub[2])                                   # (M,) within the part
            r, col = part[r].to(device), col.to(device)                              # original coordinates
            with _recording(sites or {}) as seen:
                hg = head_gradients(model, *packed, temperature=temperature)
                if hg is None:                                                       # any other model
                    S, H = scored_token_logprobs(model, *packed, temperature=temperature)  # (M,) each, with graph
            calls = _calls(seen) if sites is not None else None
            n = n_sur[int(g_mb[0])]
            for j, b in enumerate(beta[:n]):
                keep = j < n - 1
                if hg is not None:                                                   # backward from x
                    g_x = alpha[j, r, col][:, None] * hg.dS_dx + (b * w_dev[r])[:, None] * hg.dH_dx
                    root, seed = hg.x, g_x.to(hg.x.dtype)
                else:
                    root, seed = (alpha[j, r, col] * S).sum() + b * (w_dev[r] * H).sum(), None   # Σ α S + β Σ ω H / D
                if calls is None:                                                    # one group per part
                    grads = torch.autograd.grad(root, tensors, seed, retain_graph=keep, allow_unused=True)
                    for name, g in zip(named, grads):
                        if g is not None:
                            acc[j][name][int(g_mb[0])] += g.double()
                    continue
                gys = torch.autograd.grad(root, [y for _, _, y in calls], seed, retain_graph=keep, allow_unused=True)
                for (name, x, _), gy in zip(calls, gys):                            # gy, x: (n, W, out), (n, W, in)
                    if gy is None:
                        continue
                    if one_group:                                                    # Σ_rows Σ_t gy xᵀ (out, in)
                        acc[j][name][int(g_mb[0])] += (gy.flatten(0, -2).T @ x.flatten(0, -2)).double()
                    else:                                                            # per row, summed per group
                        acc[j][name].index_add_(0, g_mb.to(device), torch.bmm(gy.transpose(1, 2), x).double())
    u_k = [{n: g[k] for n, g in acc[0].items()} for k in range(len(idx_groups))]
    z_k = [{n: g[k] for n, g in acc[1].items()} for k in range(len(idx_groups))] if variance_reduced else None
    C_k = torch.stack([(w[idx] * st.H[idx]).sum() for idx in idx_groups])
    D_k = torch.stack([(w[idx] * st.T[idx]).sum() for idx in idx_groups])
    y = {n: g[0] / float(D_k[0] / D) for n, g in acc[-1].items()} if groups else None      # Y_1 · D / D_1
    return u_k, z_k, y, idx_groups, C_k / D, D_k / D, Hbar


@contextlib.contextmanager
def _recording(sites: Mapping[str, torch.nn.Linear]):
    """Inside: each call of a Linear in `sites` (name -> module) appends (input, output) to the yielded
    name -> list; inputs detached (n, W, in), outputs (n, W, out) with their graph."""
    seen: dict[str, list] = {n: [] for n in sites}

    def keep(name):
        return lambda mod, inp, y: seen[name].append((inp[0].detach(), y))

    handles = [m.register_forward_hook(keep(n)) for n, m in sites.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _calls(seen: Mapping[str, list]) -> list[tuple]:
    """(name, input, output) of every recorded call.
    Raises: RuntimeError when a Linear did not run (its gradient would be silently missing)."""
    missing = [n for n, calls in seen.items() if not calls]
    if missing:
        raise RuntimeError(f"{len(missing)} Linear modules with trainable weights did not run in the forward: "
                           f"{', '.join(missing)}")
    return [(n, x, y) for n, c in seen.items() for x, y in c]


def _linear_weights(model: torch.nn.Module, names) -> dict[str, torch.nn.Linear] | None:
    """name -> module when every direction tensor is the weight of an nn.Linear (LoRA's A and B are), else None."""
    modules = dict(model.named_modules())
    sites = {n: modules.get(n.rpartition(".")[0]) for n in names}
    ok = all(isinstance(m, torch.nn.Linear) and n.endswith(".weight") for n, m in sites.items())
    return sites if ok else None


def _directional_S_reverse(model, ids, am, rm, sites, tangents, temperature, microbatch_size):
    """D_d S_i from ONE forward and ONE backward over U, for any number of directions d on Linear weights.

    Sequences are independent rows, so the backward of Σ_i S_i gives at every position t of row i the
    gradient g_{i,t} = ∂S_i/∂y_t of each Linear's output y = x Wᵀ; row i's gradient of W is then
    Σ_t g_{i,t} x_{i,t}ᵀ (out, in), and D_d S_i = ⟨Σ_t g_{i,t} x_{i,t}ᵀ, d_W⟩ for every direction at once.
    The forward also gives U's per-token S and H at θ, returned beside.
    Raises: RuntimeError when a Linear carrying a direction did not run in the forward (its
            contribution would be silently missing)."""
    device = next(iter(sites.values())).weight.device
    out = torch.zeros(next(iter(tangents.values())).shape[0], ids.shape[0], dtype=torch.float64)  # (k, N_U)
    S_all, H_all = torch.zeros(ids.shape, dtype=torch.float64), torch.zeros(ids.shape, dtype=torch.float64)
    for mb in resolve_microbatching(model, am, microbatch_size, None, mode="grad"):
        packed = [t.to(device) for t in mb.pack(ids, am, rm)]
        with _recording(sites) as seen:
            hg = head_gradients(model, *packed, temperature=temperature, with_dH=False)
            S, H = (hg.S, hg.H) if hg is not None else \
                scored_token_logprobs(model, *packed, temperature=temperature)      # (M,) each; any other model
        calls = _calls(seen)
        root, seed = (S.sum(), None) if hg is None else (hg.x, hg.dS_dx)             # ∂ Σ S_i / ∂y at each call
        gys = torch.autograd.grad(root, [y for _, _, y in calls], seed, allow_unused=True)
        dS = torch.zeros(out.shape[0], len(mb.rows), dtype=torch.float64, device=device)      # (k, n)
        for (n, x, _), gy in zip(calls, gys):
            if gy is not None:
                g_row = torch.einsum("nto,nti->noi", gy.double(), x.double())          # (n, out, in) per row
                dS += torch.einsum("noi,koi->kn", g_row, tangents[n])
        out[:, mb.rows] += dS.cpu()
        r, c = mb.scored_coordinates(rm)
        S_all[r, c], H_all[r, c] = S.detach().cpu(), H.detach().cpu()
    return out, TokenScores(S=S_all, H=H_all, mask=rm.bool())


def _directional_S_forward(model, ids, am, rm, tangents, temperature, microbatch_size):
    """D_d S_i in ONE forward-mode pass over U: per microbatch the primal runs once and the directions
    ride along as a batch of tangents (vmap over the tangent of one jvp)."""
    params = dict(model.named_parameters())
    theta = {n: params[n].detach() for n in tangents}
    tangents = {n: t.to(theta[n].dtype) for n, t in tangents.items()}
    device = theta[next(iter(theta))].device
    out = torch.zeros(next(iter(tangents.values())).shape[0], ids.shape[0], dtype=torch.float64)  # (k, N_U)
    with forward_ad_attention(model), constant_weight_linears(model):
        for mb in resolve_microbatching(model, am, microbatch_size, None, mode="jvp"):
            b = [t.to(device) for t in mb.pack(ids, am, rm)]

            def S_of(p):
                return scored_token_logprobs(model, *b, params=p, temperature=temperature, entropy=False)[0]  # (M,)

            dS = vmap(lambda t: jvp(S_of, (theta,), (t,))[1])(tangents)             # (k, M)
            r, _ = mb.scored_coordinates(rm)
            out.index_add_(1, r, dS.double().cpu())
    return out


def _directional_S(model, u_batch, directions: list[Mapping[str, torch.Tensor]], temperature, microbatch_size,
                   mode: str = "auto"):
    """D_d S_i for every direction d and U sequence i, (len(directions), N_U) float64, in one pass over U,
    and U's per-token S, H at θ (TokenScores).

    mode "reverse" (the "auto" choice when every direction sits on an nn.Linear weight, as with LoRA):
    one forward + one backward whatever the number of directions, the scores from the same forward
    (`_directional_S_reverse`); "forward": one forward-mode pass with the directions as a batch of
    tangents, for any parameters, then a no-grad pass for the scores.
    Only the log-prob of the sampled token is differentiated (not the full-vocabulary entropy).
    Raises: ValueError naming every parameter whose direction has non-finite entries.
    """
    ids, am, rm = (t.cpu() for t in batch_tensors(u_batch))
    bad = [n for n in directions[0] if not all(torch.isfinite(d[n]).all() for d in directions)]
    if bad:
        raise ValueError(f"{len(bad)} attribution directions P ⊙ ∇L have non-finite entries: {', '.join(bad)}")
    tangents = {n: torch.stack([d[n] for d in directions]).double() for n in directions[0]}  # (k, *shape)
    sites = _linear_weights(model, tangents) if mode in ("auto", "reverse") else None
    if mode == "reverse" and sites is None:
        raise ValueError("mode='reverse' needs every direction on an nn.Linear weight; use mode='forward'")
    if sites is not None:
        return _directional_S_reverse(model, ids, am, rm, sites, tangents, temperature, microbatch_size)
    out = _directional_S_forward(model, ids, am, rm, tangents, temperature, microbatch_size)
    return out, score_tokens(model, ids, am, rm, temperature=temperature, microbatch_size=microbatch_size)


def _shares(model, u_batch, update: UpdateResult, grads, a, temperature, microbatch_size, mode: str = "auto"):
    """a_i · D_{P⊙g} S_i for each direction g, stacked (len(grads), N_U), from one pass over U; and U's
    per-token scores at θ."""
    dirs = [{n: update.precond[n] * g[n] for n in g} for g in grads]                  # P ⊙ g
    dS, scores = _directional_S(model, u_batch, dirs, temperature, microbatch_size, mode)
    return a * dS, scores


def _delta_se(c_k: torch.Tensor, c: torch.Tensor, D_k: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """K-group delta-method jackknife of a ratio: ψ_ik = c_ik − c_i D_k/D − extra_ik, se² = K/(K−1) Σ_k (ψ−ψ̄)²."""
    psi = c_k - c[None] * D_k[:, None]
    if extra is not None:
        psi = psi - extra
    K = c_k.shape[0]
    return (K / (K - 1) * (psi - psi.mean(0)).pow(2).sum(0)).sqrt()


def attribute(model: torch.nn.Module, e_batch, u_batch, update: UpdateResult, theta_scores: TokenScores, *,
              v_base: Mapping[str, torch.Tensor], groups: int = 8, variance_reduced: bool = True,
              temperature: float = 1.0, microbatch_size: int | str = 8, logq: torch.Tensor | None = None
              ) -> AttributionResult:
    """Per-U-sequence attribution of the exact (and variance-reduced) slope, DESIGN §1.6.

    Cost: one forward over E with one backward per surrogate (1, 2 with vr; with error bars + one over
    the first of the K groups, for Y),
    and one pass over U for every direction at once (1, 2 with vr; K + 1, 2K + 1 with error bars):
    forward + backward when the directions sit on Linear weights (LoRA), else one forward-mode pass.
    Args:
        e_batch: E (input_ids, attention_mask, response_mask); theta_scores: its θ pass.
        u_batch: U with advantages and group, as given to compute_update_vector; update: its result.
        v_base: the momentum / weight-decay part of v (UpdateResult.base, or v − Σ v_i).
        groups: K groups of E for the error bars; 0 skips them (point estimates only).
    Returns: AttributionResult with c (N_U,), c_se (N_U,) (NaN when groups = 0), base, slope (and vr
             columns), and U's per-token S, H at θ from the same pass over U.
    """
    _, _, rm = batch_tensors(u_batch)
    a = drgrpo_coefficients(u_batch["advantages"], u_batch["group"], rm.sum(-1))    # (N_U,)
    was_training = model.training
    model.eval()                                        # dropout off, as in the update-vector pass
    try:
        uk, zk, y, idx_groups, Ck, Dk, Hbar = surrogate_gradients(model, e_batch, theta_scores, groups=groups,
                                                         variance_reduced=variance_reduced, temperature=temperature,
                                                         microbatch_size=microbatch_size, logq=logq)
        grads = uk + (zk or []) + ([y] if groups else [])
        shares, u_scores = _shares(model, u_batch, update, grads, a, temperature,
                                   microbatch_size)                              # (K [+K] [+1], N_U)
    finally:
        model.train(was_training)
    K = len(uk)
    c_k = shares[:K]                                                                 # (K, N_U)
    c = c_k.sum(0)
    c_se = torch.full_like(c, float("nan"))
    if groups:
        m = shares[-1]                                                               # (N_U,) ⟨Y, v_i⟩ / D
        # ratio correction: −(M_i/D)·(C_k − H̄ D_k)/D, with C_k, D_k already divided by D
        c_se = _delta_se(c_k, c, Dk, m[None] * (Ck - Hbar * Dk)[:, None])
    u = {n: sum(g[n] for g in uk) for n in uk[0]}
    base = float(dot_named(u, v_base))
    out = AttributionResult(c=c, c_se=c_se, base=base, slope=float(c.sum()) + base,
                            passes=dict(e_forward=1, e_backward=1 + int(variance_reduced),   # full backwards
                                        e_backward_Y_rows=len(idx_groups[0]) if groups else 0,
                                        u_pass="reverse" if _linear_weights(model, u) else "forward-mode",
                                        u_directions=len(grads)), u_scores=u_scores)
    if variance_reduced:
        cv_k = shares[K:2 * K]                                                       # (K, N_U)
        out.c_vr = cv_k.sum(0)
        out.c_vr_se = _delta_se(cv_k, out.c_vr, Dk, None) if groups else torch.full_like(out.c_vr, float("nan"))
        z = {n: sum(g[n] for g in zk) for n in zk[0]}
        out.base_vr = float(dot_named(z, v_base))
        out.slope_vr = float(out.c_vr.sum()) + out.base_vr
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
