"""A toy policy small enough to list every response: the exact ground truth for the estimators.

Vocabulary of 8 tokens (EOS = 2 ends a response and is scored), at most 3 new tokens, two prompts
drawn uniformly. All 1 + 7 + 49 + 343 = 400 responses per prompt are enumerated, scored by teacher
forcing, and the exact per-token entropy functional E[Σ_k H_k] / E[T] follows from their probabilities.
"""
from __future__ import annotations

import itertools

import torch

from entropy_core.params import get_trainable_named
from entropy_core.scoring import TokenScores, score_tokens
from tiny import add_lora, make_base_model

VOCAB, EOS, PAD, MAX_NEW = 8, 2, 0, 3
SCALE = 10.0   # mean per-token entropy ≈ 1.23 nats (uniform would be ln 8 ≈ 2.08)
PROMPTS = [[5, 3], [4, 6, 7]]


def responses() -> list[list[int]]:
    """Every response: EOS at step 1, 2 or 3, or three non-EOS tokens (cut at the length limit)."""
    others = [t for t in range(VOCAB) if t != EOS]
    out = []
    for n in range(MAX_NEW):
        out += [list(p) + [EOS] for p in itertools.product(others, repeat=n)]
    out += [list(p) for p in itertools.product(others, repeat=MAX_NEW)]
    return out


def toy_model(dtype=torch.float64):
    """Tiny Qwen2 + LoRA whose next-token distributions are far from uniform (scaled-up embeddings)."""
    base = make_base_model(VOCAB, hidden=16, layers=1, eos_token_id=EOS, pad_token_id=PAD, seed=3, dtype=dtype)
    with torch.no_grad():
        base.model.embed_tokens.weight.mul_(SCALE)
    return add_lora(base, r=2, b_std=0.3, seed=4)


def enumerate_batch() -> dict[str, torch.Tensor]:
    """All (prompt, response) pairs, left-padded prompts and right-padded responses; prompt id per row."""
    rows = [(pi, p, r) for pi, p in enumerate(PROMPTS) for r in responses()]
    P, R = max(len(p) for p in PROMPTS), MAX_NEW
    N = len(rows)
    ids = torch.full((N, P + R), PAD, dtype=torch.long)
    am, rm = torch.zeros_like(ids), torch.zeros_like(ids)
    prompt = torch.zeros(N, dtype=torch.long)
    for i, (pi, p, r) in enumerate(rows):
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(r)] = torch.tensor(r)
        am[i, P - len(p):P + len(r)] = 1
        rm[i, P:P + len(r)] = 1
        prompt[i] = pi
    return {"input_ids": ids, "attention_mask": am, "response_mask": rm, "prompt": prompt}


def exact_entropy(scores: TokenScores, prompt: torch.Tensor) -> float:
    """E_x E_{r~π(·|x)}[Σ_k H_k] / E_x E_r[T] from the enumerated scores (x uniform over prompts)."""
    st = scores.per_sequence()
    p = st.S.exp() / len(PROMPTS)                                   # joint probability of (x, r)
    return float((p * st.H).sum() / (p * st.T).sum())


def direction(model, seed: int = 7) -> dict[str, torch.Tensor]:
    """A fixed random direction over the trainable tensors, unit RMS."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            for n, p in get_trainable_named(model).items()}


def score_all(model, batch, v=None, eta=0.0) -> TokenScores:
    return score_tokens(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                        v=v, eta=eta, microbatch_size=400)


def sample_indices(scores: TokenScores, prompt: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n exact draws from the policy: a uniform prompt, then a response with probability exp(S)."""
    p = scores.per_sequence().S.exp()
    x = torch.randint(len(PROMPTS), (n,), generator=generator)
    out = torch.empty(n, dtype=torch.long)
    for pi in range(len(PROMPTS)):
        rows = (prompt == pi).nonzero().flatten()
        k = int((x == pi).sum())
        out[x == pi] = rows[torch.multinomial(p[rows], k, replacement=True, generator=generator)]
    return out
