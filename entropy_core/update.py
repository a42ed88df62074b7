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
responses (`fastpaths.prompt_sharing`, `scoring.shared_prompt_logprobs`); its float64 log-softmax is
checkpointed per chunk of positions (`scoring.chunked_logprobs_entropy`), so the backward keeps
model-dtype logits of scored positions only.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .fastpaths import plan_forwards, prompt_sharing, worth_sharing
from .params import get_optimizer_named_params
from .scoring import _split_route, check_batch, scored_token_logprobs, shared_prompt_logprobs


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
    return _weighted_sum(_row_sums(S_tok, T), coef, torch.arange(len(T)))


def _row_sums(S_tok: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """S_i = Σ_k S_{i,k}: (M,) per-token values, row by row, with T (n,) tokens per row -> (n,) float64."""
    row = torch.arange(len(T), device=S_tok.device).repeat_interleave(T.to(S_tok.device))   # (M,) row of each token
    return torch.zeros(len(T), dtype=torch.float64, device=S_tok.device).index_add(0, row, S_tok)


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


def accumulate_gradient(model, params: Mapping[str, torch.nn.Parameter], batch: Mapping, coef: torch.Tensor, *,
                        microbatch_size: int | str, temperature: float = 1.0, per_sequence: bool = False,
                        token_budget: int | None = None, share_prompts: bool = True):
    """g = ∇ Σ_i c_i S_i summed over microbatches in float64 (name -> tensor); with `per_sequence`, also
    each sequence's share g_i as name -> (N, *shape), by one backward per sequence.

    Microbatches: when rows share prompts (`fastpaths.prompt_sharing` without a root, worth it by
    `fastpaths.worth_sharing`, a plain-head model, `share_prompts`), whole prompt groups (or row chunks
    of one), each prompt run once per microbatch; otherwise length-bucketed, packed rows.
    microbatch_size: rows per backward, or "auto" (a token budget from free memory); token_budget:
    optional cap on positions per microbatch.
    Returns: g, g_i (or None), and the loss value L (float)."""
    device = next(iter(params.values())).device
    names, tensors = list(params), list(params.values())
    g = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in params.items()}
    cols = [batch[k].cpu() for k in ("input_ids", "attention_mask", "response_mask")]
    N = cols[0].shape[0]
    g_i = {n: torch.zeros((N, *p.shape), dtype=torch.float64, device=device) for n, p in params.items()} \
        if per_sequence else None
    sharing = prompt_sharing(*cols, max_root=0) if share_prompts and not per_sequence and _split_route(model, None) \
        else None   # whole prompts (shared_prompt_logprobs): a row's gradient does not depend on other rows
    sharing = sharing if worth_sharing(sharing, cols[1]) else None   # else length-bucketed, packed rows
    plan = plan_forwards(model, cols[1], 1 if per_sequence else microbatch_size, token_budget, mode="grad",
                         sharing=sharing)
    total = 0.0
    for mb in plan:
        if sharing is not None:       # each prompt token once per microbatch (scoring.shared_prompt_logprobs)
            rows = torch.cat(mb)
            S_tok, _ = shared_prompt_logprobs(model, cols[0], cols[2], sharing, mb, temperature=temperature,
                                              entropy=False)                           # (M,) row by row
            S = _row_sums(S_tok, cols[2][rows].bool().sum(-1))
            loss = _weighted_sum(S, coef[rows], rows)
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
