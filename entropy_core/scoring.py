"""Teacher forcing: per-token log-probs S_{i,k} and full-vocabulary entropies H_{i,k}, at θ or θ+ηv.

Layout of a batch (as `BatchedSequences` stores it): input_ids (N, L) holds a left-padded prompt,
then the response, then right padding; attention_mask (N, L) is 1 on real tokens; response_mask
(N, L) is 1 on every scored token (a sampled EOS is scored). The token at position t is predicted
by the logits at position t-1, so every tensor here is aligned with input_ids: S[i, t] is the
log-prob of input_ids[i, t]. Position ids come from the attention mask exactly as `generate`
builds them (DESIGN §2.3). All per-token arithmetic is float64 (DESIGN §2.9: nothing is clamped
or NaN-zeroed; a non-finite value is an error naming the sequence).

Forward-mode derivatives along v (`jvp_scores`) run with the math SDPA kernel, the only attention
kernel with forward-mode AD on every device (DESIGN §2.8).

Where the work goes (`fastpaths`): rows are bucketed by length and each microbatch is packed to its
own real span, so padding is not computed. When rows share prompt tokens (a template's beginning,
repeated prompts), `score_tokens` and `jvp_scores` compute them once (`shared_prompt_passes`). The
vocabulary projection and the float64 log-softmax run on scored positions only, a chunk of positions
at a time (`scored_token_logprobs`), so no (n, L, V) tensor exists, float64 or not. float64 passes
without gradients run each LoRA Linear as one matmul with W + s·B·A (`merged_lora_linears`). Results
equal the plain padded, one-sequence-at-a-time computation up to summation order
(tests/test_fastpaths.py, tests/test_sharing.py: ≤ 2e-14 relative in float64, ≤ 6e-7 in float32).
"""
from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from .fastpaths import (Microbatch, PromptSharing, head_chunk_positions, microbatch_limits, plan_shared_passes,
                        prompt_sharing, resolve_microbatching, span_columns, worth_sharing)
from .params import build_functional_params_named


class ScoringError(ValueError):
    """A scoring pass produced no tokens or a non-finite value: never a result (DESIGN §2.7, §2.9)."""


@dataclass
class TokenScores:
    """Per-token scores aligned with input_ids; zero outside the response mask.

    S, H: (N, L) float64 log-prob of the token and entropy of the distribution it was drawn from.
    dS, dH / d2S, d2H: (N, L) float64 first / second directional derivatives along v (when asked).
    mask: (N, L) bool, the scored tokens.
    """
    S: torch.Tensor
    H: torch.Tensor
    mask: torch.Tensor
    dS: torch.Tensor | None = None
    dH: torch.Tensor | None = None
    d2S: torch.Tensor | None = None
    d2H: torch.Tensor | None = None

    def per_sequence(self) -> "SequenceStats":
        """Sums over each sequence's scored tokens (N,) float64; T_i is the token count."""
        out = {f.name: (getattr(self, f.name).sum(-1) if getattr(self, f.name) is not None else None)
               for f in fields(self) if f.name != "mask"}
        return SequenceStats(T=self.mask.sum(-1).double(), **out)

    def index(self, idx: torch.Tensor) -> "TokenScores":
        """Rows `idx` (e.g. a resample of sequences)."""
        return TokenScores(**{f.name: (getattr(self, f.name)[idx] if getattr(self, f.name) is not None else None)
                              for f in fields(self)})


@dataclass
class SequenceStats:
    """Per-sequence sufficient statistics (N,) float64: S_i = Σ_k S_{i,k}, H_i = Σ_k H_{i,k}, T_i."""
    S: torch.Tensor
    H: torch.Tensor
    T: torch.Tensor
    dS: torch.Tensor | None = None
    dH: torch.Tensor | None = None
    d2S: torch.Tensor | None = None
    d2H: torch.Tensor | None = None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as HF `generate` builds them for left padding: cumsum(mask) - 1, pads set to 1."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Shapes agree, scored tokens are real tokens with a predecessor, and every row scores ≥ 1 token."""
    if not (input_ids.shape == attention_mask.shape == response_mask.shape) or input_ids.dim() != 2:
        raise ScoringError(f"input_ids, attention_mask, response_mask must share one (N, L) shape; got "
                           f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}")
    rm = response_mask.bool()
    if rm[:, 0].any():
        raise ScoringError("response_mask[:, 0] must be 0: the first token has no logits predicting it")
    outside = (rm & (attention_mask == 0)).any(-1).nonzero().flatten().tolist()
    if outside:
        raise ScoringError(f"response_mask marks padding as scored in sequences {outside[:10]}")
    orphan = (rm[:, 1:] & (attention_mask[:, :-1] == 0)).any(-1).nonzero().flatten().tolist()
    if orphan:
        raise ScoringError(f"sequences {orphan[:10]} score a token right after padding: its logits would come "
                           "from a pad position; every response needs a prompt of ≥ 1 real token")
    empty = (rm.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ScoringError(f"{len(empty)} sequences score zero tokens (first: index {empty[0]}); an empty "
                           "pass is an error, never ΔH = 0 (DESIGN §2.7)")


def token_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """S = log softmax(z/τ)[y] and H = -Σ_a p_a log p_a, in float64, with one exp over the vocabulary:
    with c = z/τ − max(z/τ), e = exp(c) and s = Σ e, S = c_y − log s and H = log s − Σ e·c / s.
    (The shift is a constant: both are invariant to it, so it carries no derivative.)

    Args: logits (..., V) any float dtype; targets (...) int64.
    Returns: S, H (...) float64.
    """
    z = logits.double()
    z = z / temperature if temperature != 1.0 else z                          # z/1 == z exactly
    c = z - z.detach().amax(-1, keepdim=True)                                  # (..., V)
    e = c.exp()
    s = e.sum(-1)
    log_s = s.log()
    S = c.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_s               # (...)
    H = log_s - (e * c).sum(-1) / s                                           # (...)
    return S, H


# Causal LMs whose forward is exactly `lm_head(decoder(...).last_hidden_state)` (transformers 5.x): for
# these the vocabulary projection can be applied to the scored positions only, a chunk at a time.
# Others (logit soft-capping, logit scales, ...) go through the model's own forward, and so does a
# model whose head carries hooks: a hook expects the model's own (n, L, V) logits layout.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})


def _split_route(model: torch.nn.Module, params: Mapping[str, torch.Tensor] | None):
    """(decoder, head, decoder overrides, head overrides) when the model's logits are lm_head(decoder
    output) and every override belongs to one of the two; otherwise None (use the model's forward)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES or not hasattr(base, "get_decoder"):
        return None
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None or head._forward_hooks or head._forward_pre_hooks:
        return None
    prefix = {id(m): n for n, m in model.named_modules() if m is decoder or m is head}
    if len(prefix) != 2:
        return None
    dp, hp = prefix[id(decoder)] + ".", prefix[id(head)] + "."
    params = params or {}
    d_over = {k[len(dp):]: x for k, x in params.items() if k.startswith(dp)}
    h_over = {k[len(hp):]: x for k, x in params.items() if k.startswith(hp)}
    if len(d_over) + len(h_over) != len(params):
        return None
    return decoder, head, d_over, h_over


def _logprob_chunk(z: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """S only: log softmax(z/τ)[y] in float64, (m,)."""
    z = z.double()
    logp = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)     # (m, V)
    return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _head_chunk(head, h_over, x, y, temperature, entropy):
    """Logits of a chunk of positions (x: (m, d) hidden states, or (m, V) logits when head is None),
    then S (and H) in float64."""
    z = x if head is None else (functional_call(head, h_over, (x,), strict=False) if h_over else head(x))
    return token_logprobs_entropy(z, y, temperature) if entropy else (_logprob_chunk(z, y, temperature),)


def chunked_logprobs_entropy(z: torch.Tensor, y: torch.Tensor, temperature: float = 1.0, *, entropy: bool = True,
                             chunk_elements: int | None = None, head: torch.nn.Module | None = None,
                             head_params: Mapping[str, torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs_entropy` a chunk of `chunk_elements // V` positions at a time (by default
    `fastpaths.head_chunk_positions`: large on a GPU, cache-sized on CPU), so neither the logits nor
    their float64 log-softmax exist for all M positions at once (positions are independent, so
    chunking changes nothing). Under autograd each chunk is checkpointed: the backward keeps only
    the chunk's input and recomputes its logits and float64 log-softmax (same ops, same gradient).

    Args: z: (M, V) logits, or (M, d) hidden states when `head` (the vocabulary projection, with
          optional `head_params` overrides) is given; y (M,) int64. entropy: also H (else None).
    Returns: S, H (M,) float64.
    """
    V = z.shape[-1] if head is None else head.weight.shape[0]
    c = max(1, chunk_elements // V) if chunk_elements else head_chunk_positions(V, z.device)
    S, H = [], []
    for xc, yc in zip(z.split(c), y.split(c)):
        args = (head, head_params, xc, yc, temperature, entropy)
        out = checkpoint(_head_chunk, *args, use_reentrant=False) if xc.requires_grad else _head_chunk(*args)
        S.append(out[0])
        if entropy:
            H.append(out[1])
    return torch.cat(S), (torch.cat(H) if entropy else None)


def scored_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          response_mask: torch.Tensor, *, params: Mapping[str, torch.Tensor] | None = None,
                          temperature: float = 1.0, entropy: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_{i,k} (and H_{i,k}) of the scored tokens of ONE microbatch, flat, in row-major order.

    For plain-head models (Qwen2/3, Llama, Mistral) the decoder runs once and the vocabulary
    projection is applied to the scored positions only, a chunk at a time; otherwise the model's own
    forward computes logits from the first scored position on (`logits_to_keep`). Either way the
    float64 log-softmax runs on scored positions only, in chunks. Works on any layout (packed or
    left-padded); differentiable (autograd or forward AD) in `params`.

    Args: input_ids, attention_mask, response_mask (n, L) on the model's device; params: overrides for
          `functional_call` (θ + ηv), None for the module's own parameters.
    Returns: S, H (M,) float64, M = response_mask.sum(); the order of response_mask.nonzero().
    """
    rm = response_mask.bool()
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                  use_cache=False)
    route = _split_route(model, params)
    if route is not None:
        decoder, head, d_over, h_over = route
        h = (functional_call(decoder, d_over, (input_ids,), kwargs, strict=False) if d_over
             else decoder(input_ids, **kwargs)).last_hidden_state               # (n, L, d)
        m = rm[:, 1:]                                                           # position t-1 predicts token t
        return chunked_logprobs_entropy(h[:, :-1][m], input_ids[:, 1:][m], temperature, entropy=entropy,
                                        head=head, head_params=h_over)         # (M,) each
    L = input_ids.shape[1]
    first = int(rm.float().argmax(-1).min())                                 # earliest scored position
    kwargs["logits_to_keep"] = L - first + 1                                 # logits at first-1 … L-1
    if params is None:
        logits = model(input_ids, **kwargs).logits
    else:
        logits = functional_call(model, params, (input_ids,), kwargs, strict=False).logits
    m = rm[:, first:]                                                        # (n, L-first)
    z = logits[:, :-1][m]                                                    # (M, V) predicts each scored token
    del logits
    return chunked_logprobs_entropy(z, input_ids[:, first:][m], temperature, entropy=entropy)


def _cache_call(decoder, d_over, ids, mask, pos, cache):
    """Decoder output (b, t, d) of `ids` after the tokens in `cache` (which it extends); mask covers the
    cached columns and ids', pos gives ids' position ids."""
    kw = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    kwargs = dict(attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache})
    out = functional_call(decoder, d_over, (ids,), kwargs, strict=False) if d_over else decoder(ids, **kwargs)
    return out.last_hidden_state


def shared_prompt_root(model: torch.nn.Module, input_ids: torch.Tensor, sharing: PromptSharing, *,
                       params: Mapping[str, torch.Tensor] | None = None) -> DynamicCache:
    """Keys/values of the root (the `sharing.root` tokens every prompt begins with), for one row."""
    decoder, _, d_over, _ = _split_route(model, params)
    device = next(model.parameters()).device
    row = int(sharing.groups[0][0])
    root = input_ids.cpu()[row:row + 1, int(sharing.start[row]):int(sharing.start[row]) + sharing.root]   # (1, C)
    cache = DynamicCache(config=decoder.config)
    _cache_call(decoder, d_over, root.to(device), torch.ones_like(root).to(device),
                torch.arange(sharing.root, device=device)[None], cache)
    return cache


def shared_prompt_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor,
                           sharing: PromptSharing, pieces: list[torch.Tensor], *,
                           params: Mapping[str, torch.Tensor] | None = None, temperature: float = 1.0,
                           entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`scored_token_logprobs` of the rows of `pieces` (each: rows holding one prompt), each piece's prompt
    computed once and its keys/values repeated for the piece's rows, whose responses attend to them
    through the cache; the prompt's last hidden state predicts its rows' first response token. Whole
    prompts: `sharing.root` is not split off, so a row's values do not depend on the other rows' prompts.
    Plain-head models only (`_split_route`); differentiable in `params` (the update pass runs it per
    microbatch; scoring and the JVPs use `shared_prompt_passes`).

    Args: input_ids, response_mask (N, L) of the whole batch; sharing: its `prompt_sharing`.
    Returns: S, H (M,) float64 for the scored tokens of rows = cat(pieces), row by row, left to right.
    """
    decoder, head, d_over, h_over = _split_route(model, params)
    device = next(model.parameters()).device
    ids, rm = input_ids.cpu(), response_mask.cpu()
    start, first, P, R = sharing.start, sharing.first, sharing.P, sharing.R
    rows, heads = torch.cat(pieces), torch.stack([c[0] for c in pieces])             # (n,), (k,)
    owner = torch.arange(len(pieces)).repeat_interleave(torch.tensor([len(c) for c in pieces]))   # (n,) piece
    Pk = P[heads]                                                                    # (k,) prompt tokens
    p_mask = (torch.arange(int(Pk.max()))[None] < Pk[:, None]).long()                # (k, P_max)
    p_ids = span_columns(ids[heads], start[heads], Pk)                               # (k, P_max)
    r_mask = (torch.arange(int(R[rows].max()))[None] < R[rows][:, None]).long()      # (n, R_max)
    r_ids, r_scored = span_columns(ids[rows], first[rows], R[rows]), span_columns(rm[rows], first[rows], R[rows])

    def dev(*ts):
        return [t.to(device) for t in ts]
    cache = DynamicCache(config=decoder.config)
    pos = torch.arange(p_mask.shape[1])[None].expand(len(heads), -1)               # (k, P_max)
    h_p = _cache_call(decoder, d_over, *dev(p_ids, p_mask, pos), cache)              # (k, P_max, d)
    cache.batch_select_indices(owner.to(device))                                     # k -> n rows
    h_r = _cache_call(decoder, d_over, *dev(r_ids, torch.cat([p_mask[owner], r_mask], 1),
                                            Pk[owner][:, None] + torch.arange(r_mask.shape[1])[None]),
                      cache)                                                         # (n, R_max, d)
    h_last = h_p[owner.to(device), (Pk[owner] - 1).to(device)]                       # (n, d)
    h_pred = torch.cat([h_last[:, None], h_r[:, :-1]], 1)               # position j predicts response token j
    m = r_scored.bool().to(device)
    return chunked_logprobs_entropy(h_pred[m], r_ids.to(device)[m], temperature, entropy=entropy, head=head,
                                    head_params=h_over)


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (b, kv_heads, t, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def shared_prompt_passes(model: torch.nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor,
                         sharing: PromptSharing, *, params: Mapping[str, torch.Tensor] | None = None,
                         temperature: float = 1.0, max_rows: int | None = None, token_budget: int | None = None,
                         progress: Callable[[int, int], None] | None = None
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """S and H of every row without gradients, each prompt token computed once, in two bucketed passes:
    the root (`sharing.root` tokens all prompts begin with) once; then the distinct prompts' own tokens,
    bucketed by length, whose keys/values are kept (flat, ΣQ positions per layer) with each prompt's last
    hidden state; then the responses, bucketed by length, each microbatch attending to the root and to
    its rows' prompts through a cache gathered from those keys/values. Equals `scored_token_logprobs` on
    the packed rows up to summation order. Plain-head models only (`_split_route`). Holds the keys/values
    of every distinct prompt at once: ΣQ positions × layers × 2 × kv width (≈ 3.6 GB in float32 for
    Qwen2.5-1.5B at the seed's E).

    Args: input_ids, response_mask (N, L); sharing: their `prompt_sharing`; max_rows, token_budget: the
          limits of each forward (`fastpaths.microbatch_limits`); progress: called with (rows done, N)
          after each response microbatch.
    Yields: per response microbatch, rows (n,) and S, H (M,) float64 of their scored tokens, row by row.
    """
    decoder, head, d_over, h_over = _split_route(model, params)
    device = next(model.parameters()).device
    ids, rm = input_ids.cpu(), response_mask.cpu()
    start, first, P, C = sharing.start, sharing.first, sharing.P, sharing.root
    heads = torch.stack([g[0] for g in sharing.groups])                               # (K,) a row per prompt
    group = torch.empty(len(P), dtype=torch.long)                                     # (N,) prompt of each row
    for k, rows in enumerate(sharing.groups):
        group[rows] = k
    Q = P[heads] - C                                                                  # (K,) own tokens, ≥ 1
    root = _kv(shared_prompt_root(model, ids, sharing, params=params)) if C else []  # per layer (1, h, C, hd)
    prompt_plan, response_plan = plan_shared_passes(sharing, max_rows=max_rows, token_budget=token_budget)

    def cache_of(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
        cache = DynamicCache(config=decoder.config)
        for layer, (k, v) in enumerate(kv):
            cache.update(k, v, layer)
        return cache

    def lengths_mask(length: torch.Tensor, width: int) -> torch.Tensor:
        return (torch.arange(width)[None] < length[:, None]).long()                   # (n, width)

    # prompts: own tokens after the root; keep their keys/values, flat in plan order, and last hidden states
    offset = torch.empty(len(heads), dtype=torch.long)                                # (K,) first flat position
    flat, h_last, done = [], None, 0
    for mb in prompt_plan:
        g, W, n = mb.rows, mb.width, len(mb.rows)                                     # g: prompts
        x = span_columns(ids[heads[g]], start[heads[g]] + C, Q[g])                  # (n, W)
        own = lengths_mask(Q[g], W)                                                   # (n, W)
        cache = cache_of([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in root])
        h = _cache_call(decoder, d_over, x.to(device), torch.cat([torch.ones(n, C, dtype=torch.long), own], 1)
                        .to(device), (C + torch.arange(W))[None].expand(n, -1).to(device), cache)   # (n, W, d)
        if h_last is None:
            h_last = h.new_empty(len(heads), h.shape[-1])                             # (K, d)
        h_last[g.to(device)] = h[torch.arange(n, device=device), (Q[g] - 1).to(device)]
        real = own.bool().to(device)
        flat.append([(k[:, :, C:].transpose(1, 2)[real], v[:, :, C:].transpose(1, 2)[real])
                     for k, v in _kv(cache)])                                          # per layer (ΣQ_mb, h, hd)
        offset[g] = done + torch.cumsum(Q[g], 0) - Q[g]
        done += int(Q[g].sum())
        del cache, h
    own_kv = [(torch.cat([f[layer][0] for f in flat]), torch.cat([f[layer][1] for f in flat]))
              for layer in range(len(flat[0]))]                                        # per layer (ΣQ, h, hd)
    del flat

    # responses: gather their prompts' keys/values behind the root, then score
    done = 0
    for mb in response_plan:
        rows, W, n = mb.rows, mb.width, len(mb.rows)
        o = group[rows]                                                               # (n,) prompt of each row
        col = torch.arange(int(Q[o].max()))[None]
        at = (offset[o][:, None] + torch.minimum(col, Q[o][:, None] - 1)).to(device)  # (n, Qm) flat positions
        kv = []
        for layer, (k_own, v_own) in enumerate(own_kv):
            k, v = (t[at].transpose(1, 2) for t in (k_own, v_own))                    # (n, h, Qm, hd)
            if C:
                k = torch.cat([root[layer][0].expand(n, -1, -1, -1), k], 2)
                v = torch.cat([root[layer][1].expand(n, -1, -1, -1), v], 2)
            kv.append((k, v))
        x = span_columns(ids[rows], first[rows], mb.length)                          # (n, W)
        scored = span_columns(rm[rows], first[rows], mb.length).bool()               # (n, W)
        mask = torch.cat([torch.ones(n, C, dtype=torch.long), lengths_mask(Q[o], col.shape[1]),
                          lengths_mask(mb.length, W)], 1)
        pos = P[rows][:, None] + torch.arange(W)[None]                               # (n, W)
        h = _cache_call(decoder, d_over, x.to(device), mask.to(device), pos.to(device), cache_of(kv))   # (n, W, d)
        h_pred = torch.cat([h_last[o.to(device)][:, None], h[:, :-1]], 1)  # position j predicts response token j
        m = scored.to(device)
        S, H = chunked_logprobs_entropy(h_pred[m], x.to(device)[m], temperature, head=head, head_params=h_over)
        done += n
        if progress:
            progress(done, len(P))
        yield rows, S, H


@dataclass
class HeadGradients:
    """The decoder output at the scored positions, with its graph, and S, H with their gradients
    with respect to it. A loss Σ α S + β H (per-token α, β) then backpropagates from x alone:
    `torch.autograd.grad(x, params, α[:, None] dS_dx + β[:, None] dH_dx)`. All (M, ...) in the order
    of response_mask.nonzero()."""
    x: torch.Tensor                 # (M, d) decoder output, with graph
    S: torch.Tensor                 # (M,) float64
    H: torch.Tensor                 # (M,) float64
    dS_dx: torch.Tensor             # (M, d) in x's dtype
    dH_dx: torch.Tensor | None      # (M, d); None unless asked for


def head_gradients(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   response_mask: torch.Tensor, *, temperature: float = 1.0, with_dH: bool = True,
                   chunk_elements: int | None = None) -> HeadGradients | None:
    """One decoder forward with graph, then the vocabulary projection in closed form, a chunk at a time.

    With z = x Wᵀ/τ, p = softmax(z), S = log p_y and H = −Σ p log p:
        ∂S/∂z = e_y − p,   ∂H/∂z = −p ⊙ (log p + H),   and ∂/∂x = (∂/∂z) W / τ.
    Several surrogates over the same batch then share one head pass instead of recomputing and
    differentiating the (M, V) float64 log-softmax in every backward (it holds no graph at all).
    The gradients are formed in float64 and cast to W's dtype before the product with W, as autograd
    does. Returns None when the head is not a plain frozen Linear after the decoder (a trainable head
    needs its own gradient; other models go through `scored_token_logprobs`).
    """
    route = _split_route(model, None)
    if route is None:
        return None
    decoder, head = route[0], route[1]
    if not isinstance(head, torch.nn.Linear) or any(p.requires_grad for p in head.parameters()):
        return None
    rm = response_mask.bool()
    h = decoder(input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False).last_hidden_state                            # (n, L, d)
    x = h[:, :-1][rm[:, 1:]]                                                 # (M, d) position t-1 predicts t
    y = input_ids[:, 1:][rm[:, 1:]]                                          # (M,)
    W = head.weight                                                          # (V, d)
    c = max(1, chunk_elements // W.shape[0]) if chunk_elements else head_chunk_positions(W.shape[0], W.device)
    S, H, dS, dH = [], [], [], []
    with torch.no_grad():
        for xc, yc in zip(x.detach().split(c), y.split(c)):
            z = head(xc).double()
            logp = torch.log_softmax(z / temperature if temperature != 1.0 else z, -1)    # (m, V)
            p = logp.exp()
            S.append(logp.gather(-1, yc[:, None]).squeeze(-1))
            Hc = -(p * logp).sum(-1)                                         # (m,)
            H.append(Hc)
            grads = [(logp.add_(Hc[:, None]).mul_(p).neg_(), dH)] if with_dH else []  # ∂H/∂z = −p (log p + H)
            gS = p.neg_().scatter_add_(-1, yc[:, None], torch.ones(len(yc), 1, dtype=p.dtype, device=p.device))
            for g, out in [(gS, dS)] + grads:                                # gS = ∂S/∂z = e_y − p
                out.append((g / temperature if temperature != 1.0 else g).to(W.dtype) @ W)   # (m, d)
    return HeadGradients(x, torch.cat(S), torch.cat(H), torch.cat(dS), torch.cat(dH) if with_dH else None)


def _raise_if_nonfinite(name: str, x: torch.Tensor, rows: torch.Tensor) -> None:
    """x (M,) per-token values; rows (M,) the original sequence index of each token."""
    bad = rows[~torch.isfinite(x).cpu()].unique()
    if len(bad):
        raise ScoringError(f"non-finite {name} in {len(bad)} sequences (first: index {int(bad[0])}); "
                           "logits or parameters contain NaN/inf (DESIGN §2.9)")


def _packed(mb: Microbatch, tensors, device) -> list[torch.Tensor]:
    return [t.to(device) for t in mb.pack(*tensors)]


@contextlib.contextmanager
def _forwards_replaced(mods: list[torch.nn.Module], forward: Callable):
    """Inside: each module in `mods` runs `forward` (bound to it) instead of its own; restored on exit."""
    for m in mods:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def _merged_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    W = self.base_layer.weight                                               # (out, in)
    for name in self.active_adapters:
        if name in self.lora_A:
            W = W + self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)
    return F.linear(x, W, self.base_layer.bias)


def _mergeable(m: torch.nn.Module) -> bool:
    """A vanilla float64 peft LoRA Linear (plain nn.Linear base, no DoRA or other variant, no LoRA bias,
    no active dropout) whose forward nobody replaced and that is not merged.

    float64 only: an η pass adds the step s·η·(v_B A + B v_A) onto W, and in float32 rounding to W's
    scale loses more of it than keeping it in A and B does (B is small early in training): the error
    of S(θ+hv) − S(θ−hv) against float64 grew by 10-23% (h = 1e-6 … 1e-4, "small" bench shape)."""
    if type(m).__name__ != "Linear" or not type(m).__module__.startswith("peft.tuners.lora"):
        return False
    if "forward" in vars(m) or m.merged or m.disable_adapters or type(m.base_layer) is not torch.nn.Linear \
            or getattr(m, "fan_in_fan_out", False):
        return False
    dtype = m.base_layer.weight.dtype
    if dtype != torch.float64:
        return False
    for name in m.active_adapters:
        if name not in m.lora_A:
            continue
        A, B, drop = m.lora_A[name], m.lora_B[name], m.lora_dropout[name]
        if name in getattr(m, "lora_variant", {}) or B.bias is not None or A.bias is not None \
                or (drop.training and not isinstance(drop, torch.nn.Identity) and drop.p > 0) \
                or A.weight.dtype != dtype or B.weight.dtype != dtype:
            return False
    return True


@contextlib.contextmanager
def merged_lora_linears(model: torch.nn.Module):
    """Inside: every vanilla float64 LoRA Linear (`_mergeable`) computes x (W + s B A)ᵀ, one matmul
    instead of three (base, A, B); the merged weight is formed in each forward from the module's
    current tensors, so `functional_call` overrides of A and B (θ + ηv) are used. For passes without
    gradients: the same values up to round-off, fewer FLOPs (r (in + out) per token per module) and no
    thin r-wide matmuls. Restored on exit."""
    with _forwards_replaced([m for m in model.modules() if _mergeable(m)], _merged_lora_forward):
        yield


def scoring_sharing(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor, *, params: Mapping[str, torch.Tensor] | None = None,
                    prompt_root: int | None = None) -> PromptSharing | None:
    """The batch's `prompt_sharing` when `score_tokens` uses it: a plain-head model (`_split_route`)
    and enough tokens skipped (`worth_sharing`), or, with `prompt_root`, always, with a root of at most
    that many tokens; else None (the packed path)."""
    if _split_route(model, params) is None:
        return None
    sharing = prompt_sharing(input_ids, attention_mask, response_mask, max_root=prompt_root)
    return sharing if prompt_root is not None or worth_sharing(sharing, attention_mask) else None


def score_tokens(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor, *, v: Mapping[str, torch.Tensor] | None = None, eta: float = 0.0,
                 temperature: float = 1.0, microbatch_size: int | str = 8, token_budget: int | None = None,
                 share_prompts: bool = True, prompt_root: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> TokenScores:
    """Teacher-forced S_{i,k}, H_{i,k} at θ (v None) or at θ + ηv, without gradients.

    Rows whose prompts are the same or begin the same have those tokens computed once
    (`shared_prompt_passes`, when that skips enough of the work, `fastpaths.worth_sharing`); other
    batches are length-bucketed and packed (`fastpaths`). Results do not depend on either beyond
    round-off.
    Args: input_ids, attention_mask, response_mask (N, L); v: name -> tensor over trainable params.
          microbatch_size: rows per forward, or "auto" (token budget from free memory).
          token_budget: optional cap on positions per forward.
          share_prompts: False forces the packed path. prompt_root: share prompts whenever the layout
          allows, computing at most this many leading tokens once for all rows (a shard of a batch
          passes the whole batch's `scoring_sharing` root, so its rows are computed as in one process).
          progress: called with (sequences done, N) after each microbatch.
    Returns: TokenScores with S, H (N, L) float64 on CPU.
    Raises: ScoringError for an empty row or a non-finite value, naming the sequence index.
    """
    input_ids, attention_mask, response_mask = (t.cpu() for t in (input_ids, attention_mask, response_mask))
    check_batch(input_ids, attention_mask, response_mask)
    device = next(model.parameters()).device
    S_all = torch.zeros(input_ids.shape, dtype=torch.float64)                # (N, L)
    H_all = torch.zeros_like(S_all)
    done = 0
    with torch.no_grad(), merged_lora_linears(model):
        params = None if v is None else build_functional_params_named(model, v, eta)
        sharing = scoring_sharing(model, input_ids, attention_mask, response_mask, params=params,
                                  prompt_root=prompt_root) if share_prompts else None
        if sharing is None:
            plan = resolve_microbatching(model, attention_mask, microbatch_size, token_budget, mode="score")
            passes = ((mb.rows, *scored_token_logprobs(model, *_packed(mb, (input_ids, attention_mask, response_mask),
                                                                      device), params=params, temperature=temperature))
                      for mb in plan)
        else:
            max_rows, budget = microbatch_limits(model, attention_mask, microbatch_size, token_budget, "score")
            passes = shared_prompt_passes(model, input_ids, response_mask, sharing, params=params,
                                          temperature=temperature, max_rows=max_rows, token_budget=budget)
        for rows, S, H in passes:                                            # S, H (M,) each
            rc = response_mask[rows].bool().nonzero()                        # (M, 2) row-major, as S and H
            r, c = rows[rc[:, 0]], rc[:, 1]                                   # (M,) original coordinates
            _raise_if_nonfinite("log-prob", S, r)
            _raise_if_nonfinite("entropy", H, r)
            S_all[r, c], H_all[r, c] = S.cpu(), H.cpu()
            done += len(rows)
            if progress:
                progress(done, len(input_ids))
    return TokenScores(S=S_all, H=H_all, mask=response_mask.bool())


@contextlib.contextmanager
def forward_ad_attention(model: torch.nn.Module):
    """Run attention through SDPA's math kernel (forward-mode AD works there, in the model's own dtype)
    and restore the caller's attention implementation afterwards (DESIGN §2.8).

    Eager attention is avoided on purpose: it runs softmax in float32 even for a float64 model, and turns
    the fully-masked rows of left padding into NaN under a float64 mask."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    old = getattr(base.config, "_attn_implementation", None)
    if not hasattr(base, "set_attn_implementation"):
        raise ScoringError(f"{type(base).__name__} cannot switch attention implementation; forward-mode "
                           "derivatives need SDPA's math kernel")
    if old != "sdpa":
        base.set_attn_implementation("sdpa")
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if old is not None and old != "sdpa":
            base.set_attn_implementation(old)


class _ConstantWeightLinear(torch.autograd.Function):
    """F.linear with a constant weight and bias, whose forward-mode derivative is x_t Wᵀ alone.

    Autograd's rule for mm / addmm stands a materialised zero in for the weight's missing tangent and
    multiplies by it: a whole wasted matmul per frozen Linear per JVP level, compounding in a nested
    JVP. Same values, same derivatives, one matmul fewer."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)            # a missing tangent arrives as None, not as zeros
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        if weight_t is not None or bias_t is not None:
            raise RuntimeError("_ConstantWeightLinear got a tangent for its weight or bias; it is only for "
                               "frozen Linear layers")
        (weight,) = ctx.saved_tensors
        return _ConstantWeightLinear.apply(x_t, weight, None)                 # the outer level skips zeros too


def _constant_weight_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _ConstantWeightLinear.apply(x, self.weight, self.bias)


@contextlib.contextmanager
def constant_weight_linears(model: torch.nn.Module):
    """Inside: every frozen plain nn.Linear of `model` (weight and bias not requiring grad; not
    subclasses such as quantised layers; not modules whose forward someone already replaced) computes
    through `_ConstantWeightLinear`; restored on exit. For forward-mode passes only (no backward)."""
    mods = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
            and not any(p.requires_grad for p in m.parameters(recurse=False))]
    with _forwards_replaced(mods, _constant_weight_forward):
        yield


def jvp_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               response_mask: torch.Tensor, v: Mapping[str, torch.Tensor], *, order: int = 1,
               temperature: float = 1.0, microbatch_size: int | str = 8, token_budget: int | None = None,
               share_prompts: bool = True, prompt_root: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> TokenScores:
    """S, H and their directional derivatives d/dη (order 1) and d²/dη² (order 2) at η = 0 along v,
    by forward-mode AD through `functional_call` (one JVP, or a JVP of a JVP).

    Microbatching and prompt sharing as in `score_tokens` ("auto" plans for 2 or 4 copies of every
    activation); with shared prompts one JVP runs through both passes of `shared_prompt_passes`, the
    kept keys/values of every prompt carrying their tangents (2 or 4 copies).
    Returns: TokenScores with S, H, dS, dH (and d2S, d2H for order 2), (N, L) float64 on CPU.
    Raises: ScoringError naming the sequence on a non-finite value, or when the model cannot be
            differentiated forward (e.g. bitsandbytes 4-bit layers, flash-attn).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    input_ids, attention_mask, response_mask = (t.cpu() for t in (input_ids, attention_mask, response_mask))
    check_batch(input_ids, attention_mask, response_mask)
    p0 = next(model.parameters())
    eta0 = torch.zeros((), dtype=p0.dtype, device=p0.device)
    one = torch.ones_like(eta0)
    mode = "jvp" if order == 1 else "jvp2"
    sharing = scoring_sharing(model, input_ids, attention_mask, response_mask, prompt_root=prompt_root) \
        if share_prompts else None
    names = ("S", "H", "dS", "dH") + (("d2S", "d2H") if order == 2 else ())
    out = {k: torch.zeros(input_ids.shape, dtype=torch.float64) for k in names}    # (N, L) each
    done = 0

    def derivatives(f: Callable) -> tuple[torch.Tensor, ...]:
        """f(η) -> (S, H) flat; returns S, H, dS, dH (, d2S, d2H) at η = 0."""
        try:
            if order == 1:
                (S, H), (dS, dH) = jvp(f, (eta0,), (one,))
                return S, H, dS, dH
            ((S, H), (dS, dH)), ((_, _), (d2S, d2H)) = jvp(lambda eta: jvp(f, (eta,), (one,)), (eta0,), (one,))
            return S, H, dS, dH, d2S, d2H
        except (NotImplementedError, RuntimeError) as e:
            if "forward AD" in str(e) or "forward-mode" in str(e) or "jvp" in str(e).lower():
                raise ScoringError(f"{type(model).__name__} cannot be differentiated in forward mode: {e}. "
                                   "Use a non-quantised model and SDPA/eager attention") from e
            raise

    def store(rows: torch.Tensor, values: tuple[torch.Tensor, ...]) -> None:
        rc = response_mask[rows].bool().nonzero()                            # (M, 2) row-major, as the values
        r, c = rows[rc[:, 0]], rc[:, 1]
        for name, x in zip(names, values):
            _raise_if_nonfinite(name, x, r)
            out[name][r, c] = x.detach().cpu()

    # No torch.no_grad() here: it disables the decompositions that nested forward AD needs (silu's
    # second derivative). No graph is built anyway: every overridden tensor is detached.
    with forward_ad_attention(model), constant_weight_linears(model):
        if sharing is None:
            for mb in resolve_microbatching(model, attention_mask, microbatch_size, token_budget, mode=mode):
                batch = _packed(mb, (input_ids, attention_mask, response_mask), p0.device)
                store(mb.rows, derivatives(lambda eta: scored_token_logprobs(
                    model, *batch, params=build_functional_params_named(model, v, eta), temperature=temperature)))
                done += len(mb.rows)
                if progress:
                    progress(done, len(input_ids))
        else:       # one JVP through both shared passes: the prompts' keys/values carry their tangents
            max_rows, budget = microbatch_limits(model, attention_mask, microbatch_size, token_budget, mode)
            rows = torch.cat([mb.rows for mb in plan_shared_passes(sharing, max_rows=max_rows, token_budget=budget)[1]])

            def f(eta):
                parts = list(shared_prompt_passes(model, input_ids, response_mask, sharing, temperature=temperature,
                                                  params=build_functional_params_named(model, v, eta),
                                                  max_rows=max_rows, token_budget=budget, progress=progress))
                return torch.cat([S for _, S, _ in parts]), torch.cat([H for _, _, H in parts])
            store(rows, derivatives(f))
    return TokenScores(mask=response_mask.bool(), **out)
