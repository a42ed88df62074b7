"""Sampling the batches U and E from π_θ, and teacher-forcing them back: the policy that is scored is
exactly the policy that sampled (DESIGN §2.2).

`SequenceProcessor.generate` calls HF `generate` with a fresh, explicit GenerationConfig (plain
sampling at temperature τ: no top-k, no top-p, no repetition penalty) and, for the duration of the
call, a neutral `model.generation_config`: HF fills every field the explicit config leaves unset
(None) from the model's own generation config, so without the swap a model's
`repetition_penalty`, `suppress_tokens`, `min_new_tokens`, ... would still apply. A guard then checks
at every step that the processed scores HF sampled from equal raw logits / τ, so whatever
changed the policy is an error that names it, never a silent bias.

The stop string is a stopping criterion: it decides where a response ends, never which token is
drawn, so the kept tokens keep their sampling probabilities. A response ends right after the first
token at which its decoded text contains `stop`, or at the first EOS (scored), or after
`max_new_tokens`; later positions are padding. Every row scores ≥ 1 token.

logq_i = Σ_k log softmax(z_{i,k}/τ)[y_{i,k}] is recorded at sampling time from HF's raw float32
logits (float64 arithmetic): the proposal log-probability S^q_i of DESIGN §1.2. Teacher forcing
(`teacher_force`, i.e. `scoring.score_tokens`) recomputes S_i without the KV cache; the two agree to
round-off (per token, float32: 6e-8 on a tiny Qwen2, 2e-5 on SmolLM2-135M), and their gap is what the
ESS of u measures. generate casts logits to float32, so a float64 model samples (and records logq)
from float32-rounded logits: another small, exactly recorded proposal gap.

Memory: HF keeps raw logits and processed scores for every step, 2 · T · batch_size · V float32 on
the device (≈10 GB for T = 128, batch 64, V = 152k); lower `batch_size` for long responses.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList)

from .data import Example, compute_rewards
from .scoring import ScoringError, TokenScores, check_batch, score_tokens

__all__ = ["BatchedSequences", "SequenceProcessor", "DegenerateGroupsError", "PolicyMismatchError"]

_FORMAT = 1
_INT_FIELDS = ("input_ids", "attention_mask", "response_mask", "prompt_index", "group")
_FLOAT_FIELDS = ("logq", "token_logq", "rewards", "advantages")
_TENSOR_FIELDS = _INT_FIELDS + _FLOAT_FIELDS
_GUARD_RTOL = 1e-6   # scores vs logits/τ: the same float32 division, so equal up to how HF divides


class DegenerateGroupsError(ValueError):
    """U groups whose G rewards are all equal (A = 0 for every response) even after resampling."""


class PolicyMismatchError(ValueError):
    """The distribution HF sampled from is not softmax(logits / τ): a logits processor changed it."""


# ------------------------------------------------------------------------------------------------
# The batch

@dataclass
class BatchedSequences:
    """N sampled sequences laid out for teacher forcing (see `scoring` for the layout).

    input_ids, attention_mask, response_mask: (N, L) int64; left-padded prompt, response from column P,
        right padding. response_mask is 1 on every scored token (a sampled EOS included).
    prompt_index: (N,) int64 row of the example list each prompt came from.
    group: (N,) int64 prompt group (U: 0..B_U-1, G contiguous rows each; E: arange(N)).
    logq: (N,) float64 Σ_k log softmax(z/τ)[y] of the response at sampling time (DESIGN §1.2 S^q).
    token_logq: (N, L) float64 the per-token terms of logq, aligned with input_ids, 0 elsewhere.
    rewards, advantages: (N,) float64 (U only); A = r − mean_group(r) (Dr.GRPO, DESIGN §1).
    texts: decoded responses; prompts: the prompt strings; golds: gold answers (or None).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_index: torch.Tensor
    group: torch.Tensor
    logq: torch.Tensor
    texts: list[str]
    prompts: list[str]
    golds: list[str] | None = None
    token_logq: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    def __post_init__(self):
        check_batch(self.input_ids, self.attention_mask, self.response_mask)
        N, L = self.input_ids.shape
        problems = []
        for name in _TENSOR_FIELDS:
            t = getattr(self, name)
            if t is None:
                if name in ("logq", "prompt_index", "group"):
                    problems.append(f"{name} is missing")
                continue
            want_dtype = torch.int64 if name in _INT_FIELDS else torch.float64
            want_shape = (N, L) if name in ("input_ids", "attention_mask", "response_mask", "token_logq") else (N,)
            if t.dtype != want_dtype or tuple(t.shape) != want_shape:
                problems.append(f"{name}: expected {want_dtype} {want_shape}, got {t.dtype} {tuple(t.shape)}")
        for name in ("texts", "prompts", "golds"):
            x = getattr(self, name)
            if x is not None and len(x) != N:
                problems.append(f"{name} has {len(x)} entries for {N} sequences")
        if (self.rewards is None) != (self.advantages is None):
            problems.append("rewards and advantages must be given together")
        if problems:
            raise ValueError(f"BatchedSequences: {len(problems)} problems: " + "; ".join(problems))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, key: str) -> torch.Tensor:
        """A tensor field by name, so estimators can read batch["input_ids"] like a dict."""
        if key not in _TENSOR_FIELDS or getattr(self, key) is None:
            raise KeyError(f"{key!r} is not a tensor of this batch; present: {', '.join(self.keys())}")
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        return [k for k in _TENSOR_FIELDS if getattr(self, k) is not None]

    @property
    def num_tokens(self) -> int:
        """Σ_i T_i, the scored response tokens."""
        return int(self.response_mask.sum())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.keys()}

    def meta(self) -> dict:
        """The non-tensor fields, JSON-able."""
        return {"format": _FORMAT, "num_sequences": len(self), "texts": list(self.texts),
                "prompts": list(self.prompts), "golds": None if self.golds is None else list(self.golds)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "BatchedSequences":
        if meta.get("format") != _FORMAT:
            raise ValueError(f"BatchedSequences meta has format {meta.get('format')!r}, this code reads {_FORMAT}")
        unknown = sorted(set(tensors) - set(_TENSOR_FIELDS))
        if unknown:
            raise ValueError(f"unknown BatchedSequences tensors {unknown}; known: {', '.join(_TENSOR_FIELDS)}")
        return cls(**tensors, texts=list(meta["texts"]), prompts=list(meta["prompts"]),
                   golds=None if meta["golds"] is None else list(meta["golds"]))

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (safetensors) and `path` with suffix .json (the meta); each atomically (temp + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, safetensors.torch.save({k: v.contiguous().cpu() for k, v in self.to_tensors().items()}))
        _atomic_write(_sidecar(path), json.dumps(self.meta(), indent=1).encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BatchedSequences":
        path = Path(path)
        meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        return cls.from_tensors(safetensors.torch.load_file(path), meta)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json") if path.suffix != ".json" else path.with_suffix(".meta.json")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------
# Sampling

@dataclass
class _Row:
    """One sampled sequence before layout: prompt tokens, kept response tokens, per-token log q."""
    prompt_ids: list[int]
    response_ids: list[int]
    token_logq: torch.Tensor      # (T,) float64
    text: str


class _FiniteLogits(LogitsProcessor):
    """Stops sampling at the first step whose logits hold NaN or +inf (or nothing finite) in some row, and
    names the sequence: torch.multinomial would otherwise fail without saying where, or draw from garbage
    (DESIGN §2.9). Leaves the scores unchanged, so the sampled policy is untouched."""

    def __init__(self, index: list[int], prompt_len: int):
        self.index, self.P = index, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | ~torch.isfinite(scores).any(-1)
        if bad.any():
            seqs = [self.index[r] for r in bad.nonzero().flatten().tolist()]
            raise ScoringError(f"non-finite logits while sampling, at response token {input_ids.shape[1] - self.P}, "
                               f"in {len(seqs)} sequences (first: index {seqs[0]}); the model or its parameters "
                               "contain NaN/inf (DESIGN §2.9)")
        return scores


class _StopOnText(StoppingCriteria):
    """Finishes a row at the first step whose decoded response contains `stop` (the test `_cut` applies).

    Only the last `window` tokens are decoded: the stop string first appears when its last character
    arrives, so it lies in the newest tokens (each token is ≥ 1 byte). `done_at[i]` is the response
    length at which row i finished (EOS or stop), for the consistency check against the final cut."""

    def __init__(self, contains_stop: Callable[[list[int]], bool], prompt_len: int, eos_ids: set[int], n: int,
                 window: int):
        self.contains_stop, self.P, self.eos_ids, self.window = contains_stop, prompt_len, eos_ids, window
        self.done_at: list[int | None] = [None] * n

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        T = input_ids.shape[1] - self.P
        tail = input_ids[:, -min(T, self.window):].tolist()
        for i, toks in enumerate(tail):
            if self.done_at[i] is None and (toks[-1] in self.eos_ids or self.contains_stop(toks)):
                self.done_at[i] = T
        return torch.tensor([d is not None for d in self.done_at], dtype=torch.bool, device=input_ids.device)


def _derive_seed(seed: int, tag: str) -> int:
    """An independent 63-bit seed per purpose, so prompt draws and token draws never share a stream."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{tag}".encode()).digest()[:8], "little") >> 1


class SequenceProcessor:
    """Samples responses from π_θ with exactly the policy that teacher forcing scores (DESIGN §2.2).

    Args:
        model: causal LM (peft-wrapped or not); tokenizer: its tokenizer (pad := eos if missing).
        max_new_tokens: response length cap. temperature: τ > 0, applied in sampling and scoring.
        top_k, top_p: must stay 0 and 1.0; truncated sampling is refused for the importance-sampling
            path (DESIGN §2.2).
        stop: stop string ending a response (the token completing it is kept); None or "" for none.
        batch_size: prompts per `generate` call.
        eos_token_id: the token(s) that end a response; default the tokenizer's eos.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, stop: str | None = "</answer>", batch_size: int = 64,
                 eos_token_id: int | Sequence[int] | None = None):
        if top_k not in (0, None) or top_p not in (1.0, None):
            raise ValueError(f"top_k={top_k}, top_p={top_p}: truncated sampling makes the sampled policy differ "
                             "from the scored one, which the importance-sampling estimator cannot use "
                             "(DESIGN §2.2); use top_k=0, top_p=1.0")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be ≥ 1")
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            raise ValueError("no eos_token_id: the tokenizer has no eos token; pass eos_token_id=")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.batch_size = int(max_new_tokens), float(temperature), batch_size
        self.stop = stop or None
        self.eos_ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
        self.pad_id = int(tokenizer.pad_token_id)

    # -- generation ---------------------------------------------------------------------------------

    def _generation_config(self) -> GenerationConfig:
        """Plain multinomial sampling from softmax(z/τ); every field that could add a processor is set."""
        return GenerationConfig(
            do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0, max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_ids if len(self.eos_ids) > 1 else self.eos_ids[0], pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_logits=True, output_scores=True,
            num_beams=1, num_return_sequences=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
            min_new_tokens=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, renormalize_logits=False)

    def _contains_stop(self, toks: list[int]) -> bool:
        return self.stop is not None and self.stop in self.tokenizer.decode(toks, skip_special_tokens=False)

    def _cut(self, toks: list[int]) -> int:
        """Number of kept response tokens: through the first EOS or the first token completing `stop`."""
        T = len(toks)
        eos = next((k + 1 for k, t in enumerate(toks) if t in self.eos_ids), T)
        if self.stop is None or not self._contains_stop(toks[:eos]):
            return eos
        lo, hi = 1, eos          # smallest k with stop in decode(toks[:k]); containment grows with k
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self._contains_stop(toks[:mid]) else (mid + 1, hi)
        return lo

    def _generate_rows(self, prompts: list[str], seed: int) -> list[_Row]:
        """One response per prompt (in order), length-sorted batches, batch b seeded with seed + b."""
        enc = [self.tokenizer(p)["input_ids"] for p in prompts]
        empty = [i for i, ids in enumerate(enc) if not ids]
        if empty:
            raise ValueError(f"{len(empty)} prompts tokenize to zero tokens (first: index {empty[0]})")
        order = sorted(range(len(prompts)), key=lambda i: len(enc[i]))
        rows: list[_Row | None] = [None] * len(prompts)
        device = next(self.model.parameters()).device
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        was_training = self.model.training
        saved_gen_cfg = getattr(base, "generation_config", None)
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        self.model.eval()                      # LoRA dropout off: the sampler is π_θ itself
        base.generation_config = GenerationConfig()   # nothing of the model's own config fills our Nones
        try:
            for b, a in enumerate(range(0, len(order), self.batch_size)):
                idx = order[a:a + self.batch_size]
                with torch.random.fork_rng(devices=fork_devices):
                    torch.manual_seed(seed + b)       # generate takes no Generator; the caller's RNG is untouched
                    for i, row in zip(idx, self._generate_batch([enc[i] for i in idx], device, index=idx)):
                        rows[i] = row
        finally:
            base.generation_config = saved_gen_cfg
            self.model.train(was_training)
        return rows

    def _generate_batch(self, prompt_ids: list[list[int]], device: torch.device,
                        index: list[int] | None = None) -> list[_Row]:
        """Sample one response per prompt; `index` (default 0..n-1) is each row's sequence index in errors."""
        n, P = len(prompt_ids), max(len(p) for p in prompt_ids)
        index = list(range(n)) if index is None else list(index)
        ids = torch.full((n, P), self.pad_id, dtype=torch.long)
        am = torch.zeros((n, P), dtype=torch.long)
        for i, p in enumerate(prompt_ids):                  # left padding; generate's positions = cumsum(mask) − 1
            ids[i, P - len(p):] = torch.tensor(p)
            am[i, P - len(p):] = 1
        criteria, stop_crit = StoppingCriteriaList(), None
        if self.stop is not None:
            stop_crit = _StopOnText(self._contains_stop, P, set(self.eos_ids), n,
                                    window=2 * len(self.stop.encode("utf-8")) + 8)
            criteria.append(stop_crit)
        cfg = self._generation_config()
        out = self.model.generate(input_ids=ids.to(device), attention_mask=am.to(device), generation_config=cfg,
                                  stopping_criteria=criteria,
                                  logits_processor=LogitsProcessorList([_FiniteLogits(index, P)]))
        gen = out.sequences[:, P:].cpu()                    # (n, T_gen)
        if len(out.logits) != gen.shape[1] or len(out.scores) != gen.shape[1]:
            raise RuntimeError(f"generate returned {gen.shape[1]} tokens but {len(out.logits)} logits / "
                               f"{len(out.scores)} scores")
        self._check_scores(out.logits, out.scores, cfg)
        cuts = [self._cut(toks) for toks in gen.tolist()]
        assert min(cuts) >= 1, f"empty responses at rows {[i for i, c in enumerate(cuts) if c < 1]}"
        if stop_crit is not None:   # after a row finished, generate wrote padding: the cut must come first
            late = [i for i, (c, d) in enumerate(zip(cuts, stop_crit.done_at)) if d is not None and c > d]
            if late:
                raise RuntimeError(f"rows {late}: the stop criterion finished them before the cut the full "
                                   "decode finds; the tokenizer's decode of a suffix disagrees with the full decode")
        logq = torch.zeros(gen.shape, dtype=torch.float64)  # (n, T_gen) log softmax(z/τ)[y], float64
        for k, z in enumerate(out.logits):                  # z: (n, V) raw float32 logits of step k
            logp = torch.log_softmax(z.double() / self.temperature, dim=-1)
            logq[:, k] = logp.gather(-1, gen[:, k:k + 1].to(z.device)).squeeze(-1).cpu()
        rows = []
        for i, c in enumerate(cuts):
            lq = logq[i, :c]
            if not torch.isfinite(lq).all():
                raise PolicyMismatchError(f"non-finite generation-time log-prob in sequence {index[i]} at tokens "
                                          f"{(~torch.isfinite(lq)).nonzero().flatten().tolist()} (DESIGN §2.9)")
            resp = gen[i, :c].tolist()
            rows.append(_Row(prompt_ids[i], resp, lq.clone(), self.tokenizer.decode(resp, skip_special_tokens=True)))
        return rows

    def _check_scores(self, logits, scores, cfg: GenerationConfig) -> None:
        """Processed scores must equal raw logits / τ at every step (same -inf pattern, same values)."""
        for k, (z, s) in enumerate(zip(logits, scores)):
            expected = z / self.temperature
            fin = torch.isfinite(expected)
            same_mask = torch.equal(fin, torch.isfinite(s))
            if same_mask and torch.allclose(s[fin], expected[fin], rtol=_GUARD_RTOL, atol=0.0):
                continue
            changed = (fin != torch.isfinite(s)).sum().item() if not same_mask else \
                int((~torch.isclose(s[fin], expected[fin], rtol=_GUARD_RTOL, atol=0.0)).sum())
            raise PolicyMismatchError(
                f"generation step {k}: the scores HF sampled from differ from logits/τ (τ={self.temperature}) "
                f"in {changed} entries, so the sampled policy is not the scored one (DESIGN §2.2). Active "
                f"settings that add a logits processor: {self._policy_changing_settings(cfg)}")

    def _policy_changing_settings(self, cfg: GenerationConfig) -> str:
        """Names of the processors HF would build from the merged config (best effort, internal HF API)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        try:
            merged, _ = base._prepare_generation_config(cfg)
            procs = base._get_logits_processor(generation_config=merged, input_ids_seq_length=1,
                                               encoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
                                               prefix_allowed_tokens_fn=None, logits_processor=None)
            names = [type(p).__name__ for p in procs if type(p).__name__ != "TemperatureLogitsWarper"]
            return ", ".join(names) or "none found in the config (a processor passed by other means, or a hook)"
        except Exception as e:  # diagnosis only: the guard's verdict stands without it
            return f"could not list them ({type(e).__name__}: {e})"

    def generate(self, prompts: list[str], *, seed: int) -> BatchedSequences:
        """One response per prompt, in order; group = arange(N), prompt_index = arange(N).

        Returns: BatchedSequences with logq (N,) and token_logq (N, L) float64 from sampling time.
        Raises:  PolicyMismatchError when a logits processor changed the sampling distribution.
        """
        rows = self._generate_rows(list(prompts), seed)
        n = len(rows)
        return self._layout(rows, prompts=list(prompts), prompt_index=torch.arange(n), group=torch.arange(n))

    def _layout(self, rows: list[_Row], *, prompts, prompt_index, group, golds=None, rewards=None,
                advantages=None) -> BatchedSequences:
        """Left-padded prompts to P = max prompt length, responses from column P, right padding."""
        N = len(rows)
        P = max(len(r.prompt_ids) for r in rows)
        L = P + max(len(r.response_ids) for r in rows)
        ids = torch.full((N, L), self.pad_id, dtype=torch.long)                   # (N, L)
        am, rm = torch.zeros((N, L), dtype=torch.long), torch.zeros((N, L), dtype=torch.long)
        tlq = torch.zeros((N, L), dtype=torch.float64)
        for i, r in enumerate(rows):
            p, T = len(r.prompt_ids), len(r.response_ids)
            ids[i, P - p:P] = torch.tensor(r.prompt_ids)
            ids[i, P:P + T] = torch.tensor(r.response_ids)
            am[i, P - p:P + T] = 1
            rm[i, P:P + T] = 1
            tlq[i, P:P + T] = r.token_logq
        return BatchedSequences(
            input_ids=ids, attention_mask=am, response_mask=rm, prompt_index=prompt_index.long(),
            group=group.long(), logq=tlq.sum(-1), token_logq=tlq, texts=[r.text for r in rows],
            prompts=list(prompts), golds=golds, rewards=rewards, advantages=advantages)

    # -- teacher forcing ------------------------------------------------------------------------------

    def teacher_force(self, batch: BatchedSequences, *, microbatch_size: int = 8) -> TokenScores:
        """S_{i,k}, H_{i,k} at θ for the sampled tokens, with the sampling temperature (scoring.score_tokens)."""
        return score_tokens(self.model, batch.input_ids, batch.attention_mask, batch.response_mask,
                            temperature=self.temperature, microbatch_size=microbatch_size)

    # -- the two batches of the measurement ------------------------------------------------------------

    def sample_E(self, examples: Sequence[Example], B_E: int, *, seed: int) -> BatchedSequences:
        """Evaluation batch E: B_E prompts drawn uniformly WITH replacement, one response each (DESIGN §1)."""
        if B_E < 1 or not examples:
            raise ValueError(f"sample_E needs B_E ≥ 1 and a non-empty example list; got B_E={B_E}, "
                             f"{len(examples)} examples")
        g = torch.Generator().manual_seed(_derive_seed(seed, "E/prompts"))
        idx = torch.randint(len(examples), (B_E,), generator=g)                     # (B_E,) with replacement
        rows = self._generate_rows([examples[i].prompt for i in idx.tolist()], _derive_seed(seed, "E/tokens"))
        return self._layout(rows, prompts=[examples[i].prompt for i in idx.tolist()], prompt_index=idx,
                            group=torch.arange(B_E), golds=[examples[i].answer for i in idx.tolist()])

    def sample_U(self, examples: Sequence[Example], B_U: int, G: int, *, reward_fn: Callable[[str, str], float],
                 seed: int, max_resample_attempts: int = 4) -> BatchedSequences:
        """Update batch U: B_U distinct prompts, G responses each, rewards, A = r − mean_group(r) (DESIGN §1).

        A group whose G rewards are all equal has A = 0 and contributes no gradient; it is replaced by a
        fresh prompt not used before and sampled again, for up to `max_resample_attempts` rounds.
        Returns: BatchedSequences with group ids 0..B_U-1 (G contiguous rows each), rewards, advantages.
        Raises:  DegenerateGroupsError with the count of groups still degenerate; ValueError for B_U larger
                 than the dataset or G < 2.
        """
        if G < 2:
            raise ValueError(f"G={G}: Dr.GRPO advantages need G ≥ 2 responses per prompt (with G = 1, A = 0)")
        if not 1 <= B_U <= len(examples):
            raise ValueError(f"B_U={B_U} distinct prompts asked for, the example list has {len(examples)}")
        g = torch.Generator().manual_seed(_derive_seed(seed, "U/prompts"))
        pool = torch.randperm(len(examples), generator=g).tolist()               # distinct prompts, in draw order
        slots: list[int | None] = pool[:B_U]                                       # prompt index per group slot
        nxt = B_U
        done: dict[int, tuple[int, list[_Row], list[float]]] = {}                  # slot -> (prompt, rows, rewards)
        todo = list(range(B_U))
        attempt = 0
        while True:
            prompt_of = [slots[j] for j in todo]
            rows = self._generate_rows([examples[p].prompt for p in prompt_of for _ in range(G)],
                                       _derive_seed(seed, f"U/tokens/{attempt}"))
            golds = [examples[p].answer for p in prompt_of for _ in range(G)]
            r = compute_rewards(reward_fn, [row.text for row in rows], golds)
            degenerate = []
            for k, j in enumerate(todo):
                rg = r[k * G:(k + 1) * G]
                if max(rg) == min(rg):
                    degenerate.append(j)
                else:
                    done[j] = (slots[j], rows[k * G:(k + 1) * G], rg)
            if not degenerate:
                break
            fresh = len(pool) - nxt
            if attempt >= max_resample_attempts or fresh < len(degenerate):
                why = (f"after {attempt} resampling rounds" if attempt >= max_resample_attempts else
                       f"and only {fresh} unused prompts are left to resample them (after {attempt} rounds)")
                raise DegenerateGroupsError(
                    f"{len(degenerate)} of {B_U} update groups still have equal rewards for all G={G} responses "
                    f"{why}; rewards seen in the last round: {sorted(set(r))[:10]}. A = 0 there, so these groups carry no "
                    "gradient. Use a larger G, a format credit (data.format_weight > 0), or an easier dataset")
            for j in degenerate:
                slots[j], nxt = pool[nxt], nxt + 1
            todo, attempt = degenerate, attempt + 1

        rows, prompt_index, rewards = [], [], []
        for j in range(B_U):
            p, rws, rg = done[j]
            rows += rws
            prompt_index += [p] * G
            rewards += rg
        group = torch.arange(B_U).repeat_interleave(G)                               # (B_U·G,)
        r = torch.tensor(rewards, dtype=torch.float64)                               # (B_U·G,)
        A = (r.view(B_U, G) - r.view(B_U, G).mean(-1, keepdim=True)).flatten()       # Dr.GRPO: no std division
        return self._layout(rows, prompts=[examples[p].prompt for p in prompt_index],
                            prompt_index=torch.tensor(prompt_index), group=group,
                            golds=[examples[p].answer for p in prompt_index], rewards=r, advantages=A)
