"""The update vector v = Δθ / lr: the AdamW step the optimizer would take for the Dr.GRPO loss on U.

DESIGN §1.1. Per sequence ℓ_{b,g} = −A_{b,g} Σ_k S_{b,g,k} / (G · L_max(b)), batch loss
L = (1/B_U) Σ_b Σ_g ℓ_{b,g}, gradient g = ∇L (optionally clipped to a global norm). Then, per tensor,
with m, s, t₀ and the hyperparameters of the SAVED param group:
    t = t₀+1;  m_t = β₁m + (1−β₁)g;  s_t = β₂s + (1−β₂)g²;  ŝ = max(s_max, s_t) if amsgrad else s_t
    den = sqrt(ŝ)/sqrt(1−β₂ᵗ) + ε;   v = −m_t / ((1−β₁ᵗ) den) − λθ
which is (θ_after − θ_before)/lr of `torch.optim.AdamW.step()`. Components with den frozen at its
full-batch value: v = v_base + Σ_i v_i, v_base = −β₁m/((1−β₁ᵗ)den) − λθ, v_i = −(1−β₁)g_i/((1−β₁ᵗ)den).
All arithmetic after the backward pass is float64.

The gradient pass is length-bucketed and packed like scoring (`fastpaths`), or, when the rows of each
prompt group hold the same prompt, runs every prompt once and shares its keys/values with the group's
responses (`shared_prompt_groups`); its float64 log-softmax is checkpointed per chunk of positions
(`scoring.chunked_logprobs_entropy`), so the backward keeps model-dtype logits of scored positions only.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .fastpaths import auto_token_budget, real_spans, resolve_microbatching
from .params import get_optimizer_named_params
from .scoring import _split_route, check_batch, chunked_logprobs_entropy, position_ids_from_mask, scored_token_logprobs


@dataclass
class UpdateResult:
    """v (name -> float64 tensor, parameter's shape), optional components, and summary stats."""
    vector: dict[str, torch.Tensor]
    stats: dict
    base: dict[str, torch.Tensor] | None = None              # v_base (always set by compute_update_vector)
    per_sequence: dict[str, torch.Tensor] | None = None      # name -> (N, *shape) v_i
    precond: dict[str, torch.Tensor] = field(default_factory=dict)  # P = −(1−β₁)/((1−β₁ᵗ)den), DESIGN §1.6


def drgrpo_coefficients(advantages: torch.Tensor, group: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """c_i with L = Σ_i c_i S_i: c_i = −A_i / (B_U · G_b · L_max(b)), b the group of sequence i.

    Args: advantages (N,), group (N,) prompt-group labels, T (N,) scored tokens per sequence.
    Returns: (N,) float64.
    """
    _, inv = torch.unique(group, return_inverse=True)
    B_U = int(inv.max()) + 1
    G = torch.zeros(B_U, dtype=torch.float64).index_add_(0, inv, torch.ones_like(T, dtype=torch.float64))
    L_max = torch.zeros(B_U, dtype=torch.float64).scatter_reduce_(0, inv, T.double(), "amax", include_self=False)
    return -advantages.double() / (B_U * G[inv] * L_max[inv])        # (N,), DESIGN §1.1 (trap §2.6: 1/B_U)


def drgrpo_loss(model: torch.nn.Module, input_ids, attention_mask, response_mask, coef: torch.Tensor, *,
                temperature: float = 1.0) -> torch.Tensor:
    """Σ_i c_i Σ_k S_{i,k} for one microbatch (any layout), differentiable; float64 scalar."""
    S_tok, _ = scored_token_logprobs(model, input_ids, attention_mask, response_mask, temperature=temperature,
                                     entropy=False)                               # (M,) row-major
    T = response_mask.bool().sum(-1)                                                # (n,)
    row = torch.arange(len(T), device=T.device).repeat_interleave(T)               # (M,) row of each token
    S = torch.zeros(len(T), dtype=torch.float64, device=S_tok.device).index_add(0, row, S_tok)   # (n,) S_i
    return _weighted_sum(S, coef, torch.arange(len(T)))


def _weighted_sum(S: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i S_i over one microbatch; S (n,) of the batch rows `rows`, coef (n,)."""
    bad = ~torch.isfinite(S)
    if bad.any():
        raise ValueError(f"non-finite log-prob in the update batch (sequences {rows[bad.cpu()].tolist()})")
    return (coef.to(S.device) * S).sum()


def _hparams(optimizer: torch.optim.Optimizer, group: dict) -> dict:
    """AdamW/Adam hyperparameters from a SAVED param group; unsupported options are errors (trap §2.5)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"update vector needs Adam or AdamW state, got {type(optimizer).__name__}")
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    b1, b2 = group["betas"]
    return dict(beta1=float(b1), beta2=float(b2), eps=float(group["eps"]), wd=float(group["weight_decay"]),
                amsgrad=bool(group.get("amsgrad", False)), maximize=bool(group.get("maximize", False)),
                decoupled=bool(decoupled))


def _spans(batch: Mapping) -> tuple[torch.Tensor, ...]:
    """Per row (N,) int64: first real column, first scored column, prompt tokens, response tokens."""
    am, rm = batch["attention_mask"].cpu(), batch["response_mask"].cpu()
    start, length = real_spans(am)
    first = rm.bool().float().argmax(-1)
    return start, first, first - start, start + length - first


def _columns(x: torch.Tensor, begin: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(len(begin), max n): the n[i] columns of row i of x from begin[i] on, right-padded with zeros."""
    col = torch.arange(int(n.max()))
    idx = (begin[:, None] + col[None]).clamp(max=x.shape[1] - 1)
    return x.gather(1, idx) * (col[None] < n[:, None])


def shared_prompt_groups(batch: Mapping) -> list[torch.Tensor] | None:
    """Rows of each prompt group (batch["group"]) when every row is one contiguous real span and the
    rows of a group hold the same prompt (their real tokens before the first scored one); else None."""
    if "group" not in batch:
        return None
    ids, am = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
    start, first, P, R = _spans(batch)
    if not bool((am.sum(-1) == P + R).all()):
        return None                                                            # a hole inside a real span
    group = batch["group"].cpu()
    groups = [torch.nonzero(group == g).flatten() for g in torch.unique(group)]
    prompt = _columns(ids, start, P)                                           # (N, P_max)
    same = all(bool((P[rows] == P[rows[0]]).all() and (prompt[rows] == prompt[rows[0]]).all()) for rows in groups)
    return groups if same else None


def _shared_prompt_plan(spans: tuple[torch.Tensor, ...], groups: list[torch.Tensor], max_rows: int | None,
                        budget: int | None) -> list[list[torch.Tensor]]:
    """Microbatches as lists of pieces (rows of one group): whole groups while the microbatch keeps to
    `max_rows` rows and to `budget` tokens (k·P_max + n·R_max); a group too large alone is split into row
    chunks, each of which recomputes its prompt. spans: `_spans` of the batch."""
    _, _, P, R = spans

    def fits(pieces: list[torch.Tensor]) -> bool:
        heads, rows = torch.stack([c[0] for c in pieces]), torch.cat(pieces)
        return (max_rows is None or len(rows) <= max_rows) and \
            (budget is None or len(pieces) * int(P[heads].max()) + len(rows) * int(R[rows].max()) <= budget)
    plan, cur = [], []
    for rows in sorted(groups, key=lambda r: -int(R[r].max())):
        rows = rows[R[rows].argsort(descending=True, stable=True)]
        n = len(rows) if max_rows is None else min(len(rows), max_rows)
        if budget is not None:
            n = min(n, max(1, (budget - int(P[rows[0]])) // max(1, int(R[rows[0]]))))
        for chunk in rows.split(n):
            if cur and not fits(cur + [chunk]):
                plan.append(cur)
                cur = []
            cur.append(chunk)
    return plan + ([cur] if cur else [])


def _shared_prompt_S(model, batch: Mapping, spans: tuple[torch.Tensor, ...], pieces: list[torch.Tensor],
                     temperature: float) -> torch.Tensor:
    """S_i of the rows of `pieces` (each: rows sharing one prompt), in that order, each prompt run once:
    its keys/values are repeated for its rows and its last hidden state predicts their first response
    token. Differentiable; equals scoring the rows one by one up to summation order. (n,) float64."""
    decoder, head, _, _ = _split_route(model, None)
    device = next(model.parameters()).device
    ids, rm = batch["input_ids"].cpu(), batch["response_mask"].cpu()
    start, first, P, R = spans
    rows, heads = torch.cat(pieces), torch.stack([c[0] for c in pieces])
    owner = torch.arange(len(pieces)).repeat_interleave(torch.tensor([len(c) for c in pieces]))   # (n,) piece
    p_mask = (torch.arange(int(P[heads].max()))[None] < P[heads][:, None]).long()                 # (k, P_max)
    p_ids = _columns(ids[heads], start[heads], P[heads])
    r_mask = (torch.arange(int(R[rows].max()))[None] < R[rows][:, None]).long()                    # (n, R_max)
    r_ids, r_scored = _columns(ids[rows], first[rows], R[rows]), _columns(rm[rows], first[rows], R[rows])

    cache = DynamicCache(config=decoder.config)     # the kwarg: `cache` in newer transformers, else `past_key_values`
    kw = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    h_p = decoder(p_ids.to(device), attention_mask=p_mask.to(device), position_ids=position_ids_from_mask(
        p_mask).to(device), use_cache=True, **{kw: cache}).last_hidden_state                      # (k, P_max, d)
    cache.batch_select_indices(owner.to(device))                                                  # k -> n rows
    h_r = decoder(r_ids.to(device), attention_mask=torch.cat([p_mask[owner], r_mask], 1).to(device),
                  position_ids=(P[heads][owner][:, None] + torch.arange(r_mask.shape[1])[None]).to(device),
                  use_cache=True, **{kw: cache}).last_hidden_state                                # (n, R_max, d)
    h_last = h_p[owner.to(device), (P[heads][owner] - 1).to(device)]                              # (n, d)
    h_pred = torch.cat([h_last[:, None], h_r[:, :-1]], 1)                 # position j predicts response token j
    m = r_scored.bool().to(device)
    S_tok, _ = chunked_logprobs_entropy(h_pred[m], r_ids.to(device)[m], temperature, entropy=False, head=head)
    row = torch.arange(len(rows), device=device).repeat_interleave(m.sum(-1))
    return torch.zeros(len(rows), dtype=torch.float64, device=device).index_add(0, row, S_tok)


def accumulate_gradient(model, params: Mapping[str, torch.nn.Parameter], batch: Mapping, coef: torch.Tensor, *,
                        microbatch_size: int | str, temperature: float = 1.0, per_sequence: bool = False,
                        token_budget: int | None = None, share_prompts: bool = True):
    """g = ∇ Σ_i c_i S_i summed over microbatches in float64 (name -> tensor); with `per_sequence`, also
    each sequence's share g_i as name -> (N, *shape), by one backward per sequence.

    Microbatches: when the rows of every prompt group share their prompt (`shared_prompt_groups`, a
    plain-head model, `share_prompts`), whole groups (or row chunks of one), each prompt run once;
    otherwise length-bucketed, packed rows. microbatch_size: rows per backward, or "auto" (a token
    budget from free memory); token_budget: optional cap on tokens per microbatch.
    Returns: g, g_i (or None), and the loss value L (float)."""
    device = next(iter(params.values())).device
    names, tensors = list(params), list(params.values())
    g = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in params.items()}
    cols = [batch[k].cpu() for k in ("input_ids", "attention_mask", "response_mask")]
    N = cols[0].shape[0]
    g_i = {n: torch.zeros((N, *p.shape), dtype=torch.float64, device=device) for n, p in params.items()} \
        if per_sequence else None
    groups = shared_prompt_groups(batch) if share_prompts and not per_sequence and _split_route(model, None) \
        else None
    if groups is not None:      # each prompt runs once per microbatch; its responses share its keys/values
        spans = _spans(batch)               # as resolve_microbatching: "auto" = no row cap, a token budget
        _, _, P, R = spans
        auto = microbatch_size == "auto"
        budget = token_budget if token_budget is not None or not auto else \
            auto_token_budget(model, width=int((P + R).max()), mode="grad")
        plan = _shared_prompt_plan(spans, groups, None if auto else microbatch_size, budget)
    else:
        plan = resolve_microbatching(model, cols[1], 1 if per_sequence else microbatch_size, token_budget,
                                     mode="grad")
    total = 0.0
    for mb in plan:
        if groups is not None:
            rows = torch.cat(mb)
            loss = _weighted_sum(_shared_prompt_S(model, batch, spans, mb, temperature), coef[rows], rows)
        else:
            loss = drgrpo_loss(model, *(t.to(device) for t in mb.pack(*cols)), coef[mb.rows],
                               temperature=temperature)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        total += float(loss.detach())
        for n, gr in zip(names, grads):
            if gr is not None:
                g[n] += gr.double()
                if per_sequence:
                    g_i[n][int(mb.rows[0])] = gr.double()
    return g, g_i, total


def compute_update_vector(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping, *,
                          microbatch_size: int | str = 4, clip_norm: float | None = None, components: bool = False,
                          temperature: float = 1.0, dropout: bool = False,
                          token_budget: int | None = None) -> UpdateResult:
    """AdamW step per unit learning rate for the trainable tensors: v = (θ_next − θ) / lr. DESIGN §1.1.

    Hyperparameters come from the optimizer's saved param_groups, never from defaults. The gradient
    pass runs in eval mode (dropout off) unless `dropout`, so v is deterministic. The model, its
    gradients and the optimizer are left untouched.

    Args:
        batch: input_ids, attention_mask, response_mask (N, L); advantages (N,); group (N,) prompt labels.
        components: also return v_base and every v_i (one backward per sequence; small batches only).
        microbatch_size: rows per backward, or "auto" (token budget from free memory); token_budget:
            optional cap on rows × packed width. Either way the sum is the same up to round-off.
    Returns: UpdateResult(vector={name: float64 tensor}, stats={norm, tensor_norms, loss, grad_norm,
             clip_scale, num_tensors, num_sequences, tokens}).
    Raises: ValueError naming each parameter whose optimizer state is missing or non-finite.
    """
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    check_batch(ids, am, rm)
    named = get_optimizer_named_params(model, optimizer)                   # name -> Parameter, optimizer order
    _check_state(named, optimizer)                                         # before the expensive backward
    T = rm.sum(-1)
    coef = drgrpo_coefficients(batch["advantages"], batch["group"], T)
    was_training = model.training
    model.train(dropout)
    try:
        g, g_i, loss = accumulate_gradient(model, named, batch, coef, microbatch_size=microbatch_size,
                                           temperature=temperature, per_sequence=components,
                                           token_budget=token_budget)
    finally:
        model.train(was_training)
    res = update_from_gradient(model, optimizer, g, clip_norm=clip_norm, g_i=g_i)
    res.stats.update(loss=loss, num_sequences=int(ids.shape[0]), tokens=int(T.sum()))
    return res


def _check_state(named: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    missing = [n for n, p in named.items() if not optimizer.state.get(p) or "exp_avg" not in optimizer.state[p]]
    if missing:
        raise ValueError(f"{len(missing)} parameters have no AdamW state (exp_avg/exp_avg_sq/step): "
                         f"{', '.join(missing)}; the optimizer file must come from a run that has stepped")


def update_from_gradient(model: torch.nn.Module, optimizer: torch.optim.Optimizer, g: Mapping[str, torch.Tensor], *,
                         clip_norm: float | None = None, g_i: Mapping[str, torch.Tensor] | None = None
                         ) -> UpdateResult:
    """The AdamW half of `compute_update_vector`: v from a batch gradient g = ∇L computed elsewhere
    (DESIGN §1.1), and with per-sequence shares g_i the components v_base, v_i.

    Args: g: name -> float64 tensor for every optimizer tensor; g_i: name -> (N, *shape) or None.
    Returns: UpdateResult; stats without loss / num_sequences / tokens (the caller knows them).
    """
    named = get_optimizer_named_params(model, optimizer)
    _check_state(named, optimizer)
    group_of = {id(p): grp for grp in optimizer.param_groups for p in grp["params"]}
    components = g_i is not None
    grad_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))
    clip_scale = 1.0
    if clip_norm is not None:                                             # as torch.nn.utils.clip_grad_norm_
        clip_scale = min(1.0, clip_norm / (grad_norm + 1e-6))
    v, base, per_seq, precond, bad = {}, {}, {}, {}, []
    for n, p in named.items():
        hp, st = _hparams(optimizer, group_of[id(p)]), optimizer.state[p]
        grad = g[n] * clip_scale
        theta = p.detach().double()
        if hp["maximize"]:
            grad = -grad
        if not hp["decoupled"] and hp["wd"]:
            grad = grad + hp["wd"] * theta                                 # Adam's L2 penalty enters the gradient
        t = float(st["step"]) + 1
        m, s = st["exp_avg"].double().to(grad.device), st["exp_avg_sq"].double().to(grad.device)
        m_t = hp["beta1"] * m + (1 - hp["beta1"]) * grad
        s_t = hp["beta2"] * s + (1 - hp["beta2"]) * grad * grad
        if hp["amsgrad"]:
            s_t = torch.maximum(st["max_exp_avg_sq"].double().to(grad.device), s_t)
        bc1, bc2 = 1 - hp["beta1"] ** t, 1 - hp["beta2"] ** t
        den = s_t.sqrt() / math.sqrt(bc2) + hp["eps"]
        decay = hp["wd"] * theta if hp["decoupled"] else 0.0
        v[n] = -m_t / (bc1 * den) - decay                                 # DESIGN §1.1
        precond[n] = -(1 - hp["beta1"]) * clip_scale * (-1 if hp["maximize"] else 1) / (bc1 * den)
        base[n] = -hp["beta1"] * m / (bc1 * den) - decay                  # v_base, DESIGN §1.1 (cheap: kept always)
        if not hp["decoupled"] and hp["wd"]:                              # L2 term belongs to no sequence
            base[n] = base[n] + precond[n] * hp["wd"] * theta / clip_scale * (-1 if hp["maximize"] else 1)
        if components:
            per_seq[n] = precond[n] * g_i[n]                               # (N, *shape) v_i = P ⊙ g_i
        if not torch.isfinite(v[n]).all():
            bad.append(n)
    if bad:
        raise ValueError(f"{len(bad)} tensors of the update vector are non-finite: {', '.join(bad)}")
    tensor_norms = {n: float(x.norm()) for n, x in v.items()}
    stats = dict(norm=math.sqrt(sum(x ** 2 for x in tensor_norms.values())), tensor_norms=tensor_norms,
                 grad_norm=grad_norm, clip_scale=clip_scale, clip_norm=clip_norm, num_tensors=len(v))
    return UpdateResult(vector=v, stats=stats, base=base, per_sequence=per_seq if components else None,
                        precond=precond)
