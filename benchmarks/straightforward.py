"""The straightforward path an earlier implementation of this measurement used, kept as the baseline
the fast paths are timed against (bench_stages.py) and checked against (tests/test_fastpaths.py).

One sequence at a time, each row at the batch's full padded width L (its left padding up to the
longest prompt and right padding up to the longest response are computed), full (1, L, V) logits,
then a float64 log-softmax over all L − 1 positions, masked afterwards. Position ids are
cumsum(mask) − 1 as in generation (DESIGN §2.3), so the values are the same as the fast path's up to
summation order; only the amount of work differs.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import functional_call, jvp

from entropy_core.params import build_functional_params_named, get_optimizer_named_params
from entropy_core.scoring import (TokenScores, check_batch, forward_ad_attention, position_ids_from_mask,
                                  token_logprobs_entropy)
from entropy_core.update import UpdateResult, drgrpo_coefficients, update_from_gradient


def _row_scores(model, params, ids, am, rm, temperature):
    """(S, H) (1, L) float64 of one padded row from its full logits."""
    kwargs = dict(attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=False)
    out = model(ids, **kwargs) if params is None else functional_call(model, params, (ids,), kwargs, strict=False)
    S, H = token_logprobs_entropy(out.logits[:, :-1], ids[:, 1:], temperature)   # (1, L-1) every position
    m = rm[:, 1:].to(S.dtype)
    zero = S.new_zeros(1, 1)
    return torch.cat([zero, S * m], -1), torch.cat([zero, H * m], -1)          # (1, L)


def score_one_at_a_time(model: torch.nn.Module, input_ids, attention_mask, response_mask, *,
                        v: Mapping[str, torch.Tensor] | None = None, eta: float = 0.0,
                        temperature: float = 1.0) -> TokenScores:
    """S, H (N, L) float64 at θ or θ + ηv, one padded row per forward."""
    check_batch(input_ids, attention_mask, response_mask)
    dev = next(model.parameters()).device
    S, H = [], []
    with torch.no_grad():
        params = None if v is None else build_functional_params_named(model, v, eta)
        for i in range(input_ids.shape[0]):
            s, h = _row_scores(model, params, *(t[i:i + 1].to(dev) for t in (input_ids, attention_mask,
                                                                             response_mask)), temperature)
            S.append(s.cpu())
            H.append(h.cpu())
    return TokenScores(S=torch.cat(S), H=torch.cat(H), mask=response_mask.bool().cpu())


def jvp_one_at_a_time(model: torch.nn.Module, input_ids, attention_mask, response_mask,
                      v: Mapping[str, torch.Tensor], *, order: int = 1, temperature: float = 1.0) -> TokenScores:
    """S, H and their first (and second) derivatives along v, one padded row per (nested) JVP."""
    check_batch(input_ids, attention_mask, response_mask)
    p0 = next(model.parameters())
    eta0 = torch.zeros((), dtype=p0.dtype, device=p0.device)
    one = torch.ones_like(eta0)
    names = ("S", "H", "dS", "dH") + (("d2S", "d2H") if order == 2 else ())
    out = {k: [] for k in names}
    with forward_ad_attention(model):
        for i in range(input_ids.shape[0]):
            row = [t[i:i + 1].to(p0.device) for t in (input_ids, attention_mask, response_mask)]

            def f(eta):
                return _row_scores(model, build_functional_params_named(model, v, eta), *row, temperature)

            if order == 1:
                (S, H), (dS, dH) = jvp(f, (eta0,), (one,))
                vals = (S, H, dS, dH)
            else:
                ((S, H), (dS, dH)), ((_, _), (d2S, d2H)) = jvp(lambda e: jvp(f, (e,), (one,)), (eta0,), (one,))
                vals = (S, H, dS, dH, d2S, d2H)
            for k, x in zip(names, vals):
                out[k].append(x.detach().cpu())
    return TokenScores(mask=response_mask.bool().cpu(), **{k: torch.cat(x) for k, x in out.items()})


def gradient_one_at_a_time(model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter], batch: Mapping,
                           coef: torch.Tensor, *, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """g = ∇ Σ_i c_i S_i (DESIGN §1.1), one padded row per backward, summed in float64."""
    dev = next(iter(params.values())).device
    names, tensors = list(params), list(params.values())
    g = {n: torch.zeros(p.shape, dtype=torch.float64, device=dev) for n, p in params.items()}
    for i in range(batch["input_ids"].shape[0]):
        ids, am, rm = (batch[k][i:i + 1].to(dev) for k in ("input_ids", "attention_mask", "response_mask"))
        logits = model(ids, attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=False).logits
        S, _ = token_logprobs_entropy(logits[:, :-1], ids[:, 1:], temperature)
        loss = float(coef[i]) * (S * rm[:, 1:]).sum()
        for n, gr in zip(names, torch.autograd.grad(loss, tensors, allow_unused=True)):
            if gr is not None:
                g[n] += gr.double()
    return g


def update_vector_one_at_a_time(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping, *,
                                clip_norm: float | None = None, temperature: float = 1.0) -> UpdateResult:
    """`compute_update_vector` with the gradient from `gradient_one_at_a_time` (eval mode)."""
    check_batch(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    named = get_optimizer_named_params(model, optimizer)
    coef = drgrpo_coefficients(batch["advantages"], batch["group"], batch["response_mask"].sum(-1))
    was_training = model.training
    model.eval()
    try:
        g = gradient_one_at_a_time(model, named, batch, coef, temperature=temperature)
    finally:
        model.train(was_training)
    return update_from_gradient(model, optimizer, g, clip_norm=clip_norm)
