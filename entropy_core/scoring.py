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
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    empty = (rm.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ScoringError(f"{len(empty)} sequences score zero tokens (first: index {empty[0]}); an empty "
                           "pass is an error, never ΔH = 0 (DESIGN §2.7)")


def token_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """S = log softmax(z/τ)[y] and H = -Σ_a p_a log p_a, in float64.

    Args: logits (..., V) any float dtype; targets (...) int64.
    Returns: S, H (...) float64.
    """
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)          # (..., V)
    S = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)                    # (...)
    H = -(logp.exp() * logp).sum(-1)                                          # (...)
    return S, H


def _scores_one_chunk(model, params, input_ids, attention_mask, response_mask, temperature):
    """(S, H) (n, L) float64 for one microbatch; logits are computed only from the first scored
    position on (`logits_to_keep`), so the prompt costs no vocabulary projection."""
    n, L = input_ids.shape
    first = int(response_mask.bool().float().argmax(-1).min())              # earliest scored position
    keep = L - first + 1                                                     # logits at first-1 … L-1
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                  logits_to_keep=keep, use_cache=False)
    if params is None:
        logits = model(input_ids, **kwargs).logits
    else:
        logits = functional_call(model, params, (input_ids,), kwargs, strict=False).logits
    logits = logits[:, :-1]                                                  # (n, L-first, V) predicts first … L-1
    S, H = token_logprobs_entropy(logits, input_ids[:, first:], temperature)  # (n, L-first)
    m = response_mask[:, first:].bool()
    S, H = S * m, H * m                                                      # zero outside the response
    pad = S.new_zeros(n, first)
    return torch.cat([pad, S], -1), torch.cat([pad, H], -1)                  # (n, L)


def _raise_if_nonfinite(name: str, x: torch.Tensor, offset: int) -> None:
    bad = (~torch.isfinite(x)).any(-1).nonzero().flatten()
    if len(bad):
        raise ScoringError(f"non-finite {name} in {len(bad)} sequences (first: index {offset + int(bad[0])}); "
                           "logits or parameters contain NaN/inf (DESIGN §2.9)")


def score_tokens(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor, *, v: Mapping[str, torch.Tensor] | None = None, eta: float = 0.0,
                 temperature: float = 1.0, microbatch_size: int = 8) -> TokenScores:
    """Teacher-forced S_{i,k}, H_{i,k} at θ (v None) or at θ + ηv, without gradients.

    Args: input_ids, attention_mask, response_mask (N, L); v: name -> tensor over trainable params.
    Returns: TokenScores with S, H (N, L) float64 on CPU.
    Raises: ScoringError for an empty row or a non-finite value, naming the sequence index.
    """
    check_batch(input_ids, attention_mask, response_mask)
    device = next(model.parameters()).device
    S_all, H_all = [], []
    with torch.no_grad():
        params = None if v is None else build_functional_params_named(model, v, eta)
        for a in range(0, input_ids.shape[0], microbatch_size):
            sl = slice(a, a + microbatch_size)
            S, H = _scores_one_chunk(model, params, input_ids[sl].to(device), attention_mask[sl].to(device),
                                     response_mask[sl].to(device), temperature)
            _raise_if_nonfinite("log-prob", S, a)
            _raise_if_nonfinite("entropy", H, a)
            S_all.append(S.cpu())
            H_all.append(H.cpu())
    return TokenScores(S=torch.cat(S_all), H=torch.cat(H_all), mask=response_mask.bool().cpu())


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


def jvp_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               response_mask: torch.Tensor, v: Mapping[str, torch.Tensor], *, order: int = 1,
               temperature: float = 1.0, microbatch_size: int = 8) -> TokenScores:
    """S, H and their directional derivatives d/dη (order 1) and d²/dη² (order 2) at η = 0 along v,
    by forward-mode AD through `functional_call` (one JVP, or a JVP of a JVP).

    Returns: TokenScores with S, H, dS, dH (and d2S, d2H for order 2), (N, L) float64 on CPU.
    Raises: ScoringError naming the sequence on a non-finite value, or when the model cannot be
            differentiated forward (e.g. bitsandbytes 4-bit layers, flash-attn).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    check_batch(input_ids, attention_mask, response_mask)
    p0 = next(model.parameters())
    eta0 = torch.zeros((), dtype=p0.dtype, device=p0.device)
    one = torch.ones_like(eta0)
    out = {k: [] for k in ("S", "H", "dS", "dH", "d2S", "d2H")}
    # No torch.no_grad() here: it disables the decompositions that nested forward AD needs (silu's
    # second derivative). No graph is built anyway: every overridden tensor is detached.
    with forward_ad_attention(model):
        for a in range(0, input_ids.shape[0], microbatch_size):
            sl = slice(a, a + microbatch_size)
            batch = [t[sl].to(p0.device) for t in (input_ids, attention_mask, response_mask)]

            def f(eta):
                return _scores_one_chunk(model, build_functional_params_named(model, v, eta), *batch, temperature)

            try:
                if order == 1:
                    (S, H), (dS, dH) = jvp(f, (eta0,), (one,))
                    d2S = d2H = None
                else:
                    def df(eta):
                        return jvp(f, (eta,), (one,))
                    ((S, H), (dS, dH)), ((_, _), (d2S, d2H)) = jvp(df, (eta0,), (one,))
            except (NotImplementedError, RuntimeError) as e:
                if "forward AD" in str(e) or "forward-mode" in str(e) or "jvp" in str(e).lower():
                    raise ScoringError(f"{type(model).__name__} cannot be differentiated in forward mode: {e}. "
                                       "Use a non-quantised model and SDPA/eager attention") from e
                raise
            for name, x in (("S", S), ("H", H), ("dS", dS), ("dH", dH), ("d2S", d2S), ("d2H", d2H)):
                if x is not None:
                    _raise_if_nonfinite(name, x, a)
                    out[name].append(x.cpu())
    cat = {k: (torch.cat(x) if x else None) for k, x in out.items()}
    return TokenScores(mask=response_mask.bool().cpu(), **cat)
