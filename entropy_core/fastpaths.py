"""Where the teacher-forcing work goes: length-bucketed, packed microbatches, and how many tokens fit.

Every pass over a batch (scoring at θ or θ+ηv, the JVPs, the gradient of the update batch) costs
time in proportion to the columns it computes, real or padding (DESIGN §4: "padding is pure
waste"). The batch layout of `BatchedSequences` pads every row to the longest prompt on the left
and the longest response on the right, so a random microbatch computes mostly padding when lengths
vary (prompts of 20-120 tokens, responses of 5-150). Here:

1. Bucketing: rows are sorted by real length, longest first (an out-of-memory error then shows in
   the first microbatch), and consecutive rows form a microbatch, capped by a row count and/or a
   token budget (rows × packed width).
2. Packing: inside a microbatch, each row is shifted left so that its first real token sits in
   column 0, and the columns are cropped to the longest real length. Nothing the model sees
   changes: position ids are cumsum(mask) − 1 of the packed row, equal to the original ones on
   every real token (left padding adds 0 to the cumsum), so RoPE rotates by the same positions;
   causal attention from a real token covers exactly the same real keys; pad keys get weight
   exactly 0 either way. What changes is only the summation order inside matmuls and softmaxes.
   Measured against one padded sequence at a time (tiny random Qwen2, transformers 5.24, CPU):
   ≤ 4e-16 relative in float64 for S, H and the update vector, ≤ 2e-14 for first and second
   directional derivatives; ≤ 1.3e-8 in float32 for S. tests/test_fastpaths.py pins 1e-12 (float64)
   and 1e-6 (float32). The packed layout has right padding only, so no attention row is fully masked.
3. Sizing: `microbatch_size="auto"` derives a token budget from free CUDA memory (an estimate from
   the model's config, with a safety fraction) or uses a fixed CPU budget.

4. Head chunks: how many positions the vocabulary head and its float64 log-softmax take at a time
   (`head_chunk_positions`).

5. Shared prompts (`prompt_sharing`, `plan_shared_prompts`): rows whose prompts are the same (the G
   responses of a U group; E's prompts, drawn with replacement) or begin the same (every prompt of a
   template: 83 SmolLM2 tokens of gsm8k_r1_template precede the question) need those tokens computed
   once. Scoring passes and the JVPs run the prompt tokens all rows begin with (the root) once, each
   distinct prompt's remaining tokens once (`plan_shared_passes`), and the responses attending to both
   through the keys/values cache (`scoring.shared_prompt_passes`); the update pass runs each distinct
   prompt once per microbatch (`scoring.shared_prompt_logprobs`, no root). Same values up to summation
   order: causal attention from a response token sees exactly the same keys at the same positions.

Apart from the CUDA memory query, everything here is index arithmetic on CPU tensors; `scoring` and
`update` call the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_TOKEN_BUDGET = 1024         # tokens per microbatch on CPU: CPU matmuls gain nothing from larger microbatches,
                                # which pad more (measured on the 5M-param bench shape: 1 row at a time and 1024
                                # tokens run equally fast, 4096 tokens 25% slower)
HEAD_CHUNK_ELEMENTS = 1 << 24   # positions × vocab per float64 log-softmax chunk: 128 MiB per float64 temporary
CPU_HEAD_CHUNK_ELEMENTS = 1 << 20   # on CPU: 8 MiB per temporary, which the elementwise passes find in cache
                                    # (θ pass on the 5M bench shape, 64 rows, 1 thread, interleaved:
                                    # median 2.37 s with 2^24, 2.02 s with 2^20)
CPU_HEAD_CHUNK_MIN_POSITIONS = 64   # every chunk reads the whole (V, d) head weight: fewer positions than this
                                    # make the head matmul memory-bound for a large V (V = 151 936: 2.4× slower at 8)
AUTO_MEMORY_FRACTION = 0.5      # share of free device memory the auto budget plans for (the estimate is rough)
_STREAMS = {"score": 1, "jvp": 2, "jvp2": 4, "grad": 1}   # primal / tangent copies of every activation


class MicrobatchingError(ValueError):
    """A microbatch size or token budget that cannot be used."""


@dataclass(frozen=True)
class Microbatch:
    """Rows of one microbatch and where their real tokens start in the original (N, L) layout.

    rows: (n,) int64 original row indices, longest first. start: (n,) int64 first real column of
    each row. length: (n,) int64 real span (last real column + 1 − start). width: packed columns.
    """
    rows: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    width: int

    @property
    def tokens(self) -> int:
        """Positions the model computes for this microbatch: n × width."""
        return int(self.rows.numel()) * self.width

    def pack(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Each (N, L) tensor's rows of this microbatch, shifted to start at column 0 and cropped to
        `width` columns: (n, width), zero after each row's real span."""
        L = tensors[0].shape[1]
        col = torch.arange(self.width)                                         # (W,)
        idx = (col[None] + self.start[:, None]).clamp(max=L - 1)               # (n, W) original column
        valid = col[None] < self.length[:, None]                               # (n, W)
        return [(t[self.rows].gather(1, idx.to(t.device)) * valid.to(t.device)).to(t.dtype) for t in tensors]

    def scored_coordinates(self, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Original (row, column) of every scored token of this microbatch, in row-major order: the
        order of the packed response mask's nonzeros, so flat per-token results scatter back."""
        rc = response_mask[self.rows].bool().nonzero()                        # (M, 2) row-major
        return self.rows[rc[:, 0]], rc[:, 1]


def real_spans(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First real column and real span length per row, (N,) int64 each (rows of zeros: span 0)."""
    am = attention_mask.bool().cpu()
    L = am.shape[1]
    start = am.float().argmax(-1)                                              # first 1 (0 if none)
    end = L - am.flip(-1).float().argmax(-1)                                   # last 1, + 1
    length = torch.where(am.any(-1), end - start, torch.zeros_like(end))
    return start.long(), length.long()


def plan_microbatches(attention_mask: torch.Tensor, *, max_rows: int | None = None,
                      token_budget: int | None = None, bucket: bool = True) -> list[Microbatch]:
    """Split N rows into packed microbatches.

    Rows are sorted by real length, longest first (stable, so equal lengths keep their order), unless
    `bucket` is False. A microbatch takes consecutive rows while it has fewer than `max_rows` rows and
    (rows + 1) × width ≤ `token_budget`, width being its first (longest) row's length; a row longer
    than the budget goes alone.

    Args: attention_mask (N, L); max_rows ≥ 1 or None; token_budget ≥ 1 or None (not both None).
    Returns: microbatches covering every row exactly once.
    """
    if max_rows is None and token_budget is None:
        raise MicrobatchingError("plan_microbatches needs max_rows, token_budget or both")
    if (max_rows is not None and max_rows < 1) or (token_budget is not None and token_budget < 1):
        raise MicrobatchingError(f"max_rows and token_budget must be ≥ 1, got {max_rows}, {token_budget}")
    start, length = real_spans(attention_mask)
    N = length.numel()
    order = torch.sort(-length, stable=True).indices if bucket else torch.arange(N)
    plan, a = [], 0
    while a < N:
        width = int(length[order[a]])
        b = a + 1
        while b < N and (max_rows is None or b - a < max_rows):
            w = max(width, int(length[order[b]]))
            if token_budget is not None and (b - a + 1) * w > token_budget:
                break
            width, b = w, b + 1
        rows = order[a:b]
        width = max(int(length[rows].max()), 1)
        plan.append(Microbatch(rows=rows, start=start[rows], length=length[rows], width=width))
        a = b
    return plan


def auto_token_budget(model: torch.nn.Module, *, width: int, mode: str = "score",
                      memory_fraction: float = AUTO_MEMORY_FRACTION) -> int:
    """Tokens per microbatch that fit in free memory, for rows up to `width` tokens.

    CUDA: AUTO_MEMORY_FRACTION × (free device memory + memory cached by torch's allocator) divided
    by an estimate of the bytes each token needs (`bytes_per_token`). CPU: CPU_TOKEN_BUDGET. Never
    below `width` (one row). The estimate is deliberately simple; a CUDA out-of-memory error is still
    possible and is handled by the caller (stages halve the microbatch and retry).

    Args: mode: "score" (no grad), "jvp" / "jvp2" (first / nested forward-mode AD), "grad" (backward).
    """
    if mode not in _STREAMS:
        raise MicrobatchingError(f"mode must be one of {sorted(_STREAMS)}, got {mode!r}")
    p = next(model.parameters())
    if p.device.type != "cuda":
        return max(CPU_TOKEN_BUDGET, width)
    free, _ = torch.cuda.mem_get_info(p.device)
    free += torch.cuda.memory_reserved(p.device) - torch.cuda.memory_allocated(p.device)
    return budget_from_free_memory(model, free, width=width, mode=mode, memory_fraction=memory_fraction)


def head_chunk_positions(vocab_size: int, device: torch.device) -> int:
    """Positions per chunk of the vocabulary head and its float64 log-softmax (scoring.py): large chunks
    on a GPU, cache-sized ones on CPU."""
    if device.type == "cpu":
        return max(CPU_HEAD_CHUNK_MIN_POSITIONS, CPU_HEAD_CHUNK_ELEMENTS // vocab_size)
    return max(1, HEAD_CHUNK_ELEMENTS // vocab_size)


def budget_from_free_memory(model: torch.nn.Module, free_bytes: int, *, width: int, mode: str = "score",
                            memory_fraction: float = AUTO_MEMORY_FRACTION) -> int:
    """memory_fraction × (free_bytes − the fixed float64 head temporaries) / bytes_per_token, ≥ width."""
    free = free_bytes - 4 * _STREAMS[mode] * HEAD_CHUNK_ELEMENTS * 8       # float64 head temporaries, fixed
    return max(width, int(memory_fraction * max(free, 0) / bytes_per_token(model, width=width, mode=mode)))


def bytes_per_token(model: torch.nn.Module, *, width: int, mode: str = "score") -> float:
    """Rough peak activation bytes per token of a decoder-only transformer microbatch.

    From the config: d = hidden size, f = intermediate size, n_l layers, n_h heads, V vocabulary,
    b bytes per element. Live inside one layer: ≈ (6d + 3f)·b (residual, norm, q, k, v, attention
    output, gate, up, activation) plus the math-kernel attention matrix 2·n_h·width·b; logits and
    their gathered copy 2·V·b. Without a graph about two layers' worth is live (the one running and
    its input); a backward keeps all n_l plus the running one.
    Forward-mode AD carries 2 (JVP) or 4 (nested JVP) copies of everything.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    d, nl = cfg.hidden_size, cfg.num_hidden_layers
    f = getattr(cfg, "intermediate_size", 4 * d)
    nh = getattr(cfg, "num_attention_heads", 1)
    V = cfg.vocab_size
    b = next(model.parameters()).element_size()
    layer = (6 * d + 3 * f) * b + 2 * nh * width * b
    act = (nl + 1) * layer if mode == "grad" else 2 * layer               # + the layer being recomputed
    return float(_STREAMS[mode] * (act + 2 * V * b))


def resolve_microbatching(model: torch.nn.Module, attention_mask: torch.Tensor, microbatch_size: int | str,
                          token_budget: int | None, *, mode: str) -> list[Microbatch]:
    """The plan for `microbatch_size` (rows, or "auto") and an optional `token_budget` (tokens).

    "auto": no row cap, and the token budget from `auto_token_budget` unless one is given.
    Raises: MicrobatchingError for anything else than an int ≥ 1 or "auto".
    """
    max_rows, token_budget = microbatch_limits(model, attention_mask, microbatch_size, token_budget, mode)
    return plan_microbatches(attention_mask, max_rows=max_rows, token_budget=token_budget)


def microbatch_limits(model, attention_mask, microbatch_size, token_budget, mode) -> tuple[int | None, int | None]:
    """(row cap, token budget) for `microbatch_size` and `token_budget`: "auto" is no row cap and, unless
    a budget is given, `auto_token_budget` for the longest row."""
    if microbatch_size == "auto":
        if token_budget is None:
            _, length = real_spans(attention_mask)
            token_budget = auto_token_budget(model, width=int(length.max()), mode=mode)
        return None, token_budget
    if isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int) or microbatch_size < 1:
        raise MicrobatchingError(f"microbatch_size must be an int ≥ 1 or 'auto', got {microbatch_size!r}")
    return microbatch_size, token_budget


def plan_forwards(model: torch.nn.Module, attention_mask: torch.Tensor, microbatch_size: int | str,
                  token_budget: int | None, *, mode: str, sharing: PromptSharing | None = None
                  ) -> list[Microbatch] | list[list[torch.Tensor]]:
    """`resolve_microbatching`, or, given `sharing`, `plan_shared_prompts` under the same limits."""
    if sharing is None:
        return resolve_microbatching(model, attention_mask, microbatch_size, token_budget, mode=mode)
    max_rows, token_budget = microbatch_limits(model, attention_mask, microbatch_size, token_budget, mode)
    return plan_shared_prompts(sharing, max_rows=max_rows, token_budget=token_budget)


def padding_stats(attention_mask: torch.Tensor, plan: list[Microbatch]) -> dict:
    """Real tokens vs computed positions for a plan and for the unbucketed (N, L) layout."""
    real = int(attention_mask.bool().sum())
    computed = sum(mb.tokens for mb in plan)
    return {"real_tokens": real, "computed_tokens": computed, "padded_layout_tokens": attention_mask.numel(),
            "microbatches": len(plan)}


SHARED_PROMPT_MIN_SAVING = 0.1   # share prompts only when that skips ≥ this fraction of the real tokens: the
                                 # shared layout pads each level to its own widest row and masks with holes


@dataclass(frozen=True)
class PromptSharing:
    """Which prompt tokens the rows of a batch have in common.

    start, first, P, R: (N,) int64 first real column, first scored column, prompt and response tokens.
    groups: row indices of each distinct prompt, in order of first appearance.
    root: tokens every prompt begins with, at most min(P) − 1, so that each prompt keeps a token of its
    own, whose last hidden state predicts its rows' first response token.
    """
    start: torch.Tensor
    first: torch.Tensor
    P: torch.Tensor
    R: torch.Tensor
    groups: list[torch.Tensor]
    root: int

    def saved_tokens(self) -> int:
        """Positions that running the root once and each distinct prompt once does not compute."""
        shared = sum((len(rows) - 1) * (int(self.P[rows[0]]) - self.root) for rows in self.groups)
        return (len(self.P) - 1) * self.root + shared


def span_columns(x: torch.Tensor, begin: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(len(begin), max n): the n[i] columns of row i of x from begin[i] on, right-padded with zeros."""
    col = torch.arange(max(int(n.max()), 0))
    idx = (begin[:, None] + col[None]).clamp(max=x.shape[1] - 1)
    return x.gather(1, idx) * (col[None] < n[:, None])


def prompt_sharing(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, *,
                   max_root: int | None = None) -> PromptSharing | None:
    """Distinct prompts and their common beginning, or None when a row's real tokens are not one span
    (prompt then response), which the shared layout cannot represent.

    Args: input_ids, attention_mask, response_mask (N, L) in the `BatchedSequences` layout; max_root: a
          cap on the root (a shard of a batch passes the whole batch's root, so that each row is
          computed as in one process).
    """
    ids, am, rm = input_ids.cpu(), attention_mask.cpu(), response_mask.cpu()
    start, length = real_spans(am)
    first = rm.bool().float().argmax(-1)
    P, R = first - start, start + length - first
    if not bool((am.sum(-1) == length).all()) or not bool((P >= 1).all()) or not bool((R >= 1).all()):
        return None
    prompt = span_columns(ids, start, P)                                       # (N, P_max), zero after P
    keyed = torch.cat([P[:, None], prompt], 1)                                 # equal rows = equal prompts
    _, inv = torch.unique(keyed, dim=0, return_inverse=True)                   # (N,) prompt of each row
    first_row = torch.full((int(inv.max()) + 1,), len(inv)).scatter_reduce(0, inv, torch.arange(len(inv)), "amin")
    groups = [torch.nonzero(inv == g).flatten() for g in torch.argsort(first_row)]
    col = torch.arange(prompt.shape[1])
    same = ((prompt == prompt[:1]) & (col[None] < P[:, None])).all(0)          # (P_max,) column shared by all
    common = int(same.long().cumprod(0).sum())                                 # length of the common beginning
    root = min(common, int(P.min()) - 1, max_root if max_root is not None else common)
    return PromptSharing(start=start, first=first, P=P, R=R, groups=groups, root=root)


def plan_shared_prompts(sharing: PromptSharing, *, max_rows: int | None = None,
                        token_budget: int | None = None) -> list[list[torch.Tensor]]:
    """Microbatches as lists of pieces (rows of one prompt), longest responses first: whole groups while
    the microbatch keeps to `max_rows` rows and `token_budget` positions (root + k·Q_max + n·R_max for k
    prompts of Q = P − root own tokens and n rows); a group too large alone is split into row chunks,
    each of which recomputes its prompt."""
    P, R, root = sharing.P, sharing.R, sharing.root

    def fits(pieces: list[torch.Tensor]) -> bool:
        heads, rows = torch.stack([c[0] for c in pieces]), torch.cat(pieces)
        cost = root + len(pieces) * (int(P[heads].max()) - root) + len(rows) * int(R[rows].max())
        return (max_rows is None or len(rows) <= max_rows) and (token_budget is None or cost <= token_budget)
    plan, cur = [], []
    for rows in sorted(sharing.groups, key=lambda r: -int(R[r].max())):
        rows = rows[R[rows].argsort(descending=True, stable=True)]
        n = len(rows) if max_rows is None else min(len(rows), max_rows)
        if token_budget is not None:
            n = min(n, max(1, (token_budget - int(P[rows[0]])) // max(1, int(R[rows[0]]))))
        for chunk in rows.split(n):
            if cur and not fits(cur + [chunk]):
                plan.append(cur)
                cur = []
            cur.append(chunk)
    return plan + ([cur] if cur else [])


def plan_shared_passes(sharing: PromptSharing, *, max_rows: int | None = None, token_budget: int | None = None
                       ) -> tuple[list[Microbatch], list[Microbatch]]:
    """The two passes of `scoring.shared_prompt_passes`, each length-bucketed under the same limits: the
    distinct prompts' own tokens after the root (rows index `sharing.groups`), then the responses (rows
    index the batch)."""
    heads = torch.stack([g[0] for g in sharing.groups])
    Q = sharing.P[heads] - sharing.root                                        # (K,) ≥ 1
    own = (torch.arange(int(Q.max()))[None] < Q[:, None]).long()               # (K, Q_max)
    resp = (torch.arange(int(sharing.R.max()))[None] < sharing.R[:, None]).long()   # (N, R_max)
    return (plan_microbatches(own, max_rows=max_rows, token_budget=token_budget),
            plan_microbatches(resp, max_rows=max_rows, token_budget=token_budget))


def worth_sharing(sharing: PromptSharing | None, attention_mask: torch.Tensor) -> bool:
    """Whether the shared layout skips at least SHARED_PROMPT_MIN_SAVING of the real tokens."""
    return sharing is not None and \
        sharing.saved_tokens() >= SHARED_PROMPT_MIN_SAVING * int(attention_mask.bool().sum())


__all__ = ["Microbatch", "MicrobatchingError", "plan_microbatches", "auto_token_budget", "budget_from_free_memory",
           "bytes_per_token",
           "resolve_microbatching", "real_spans", "padding_stats", "CPU_TOKEN_BUDGET", "HEAD_CHUNK_ELEMENTS",
           "head_chunk_positions", "PromptSharing", "prompt_sharing", "plan_shared_prompts", "worth_sharing",
           "span_columns", "SHARED_PROMPT_MIN_SAVING", "plan_forwards",
           "microbatch_limits", "plan_shared_passes"]
