"""Time every stage of one measurement at a given scale, and the fast teacher-forcing paths against the
straightforward one-sequence-at-a-time path of an earlier implementation, in the same process.

Stages (DESIGN §1, §4): sampling E and U (SequenceProcessor.generate), the update vector
(compute_update_vector), the θ pass and one η pass over E (score_tokens), the exact-derivative JVP and
the curvature (nested JVP) over E (jvp_scores), and the report arithmetic (SNIS, slopes, jackknife).
Then, on a random subset of the same E and U rows at the batch's full padded width, the
straightforward path (benchmarks/straightforward.py) against the fast path: θ pass, JVP, update.

Model: a random-weight Qwen2 of a named shape (`--shape tiny | small | qwen2_5_1_5b`, the last being
the real Qwen2.5-1.5B config with LoRA r=64 on q,k,v,o,gate,up,down = 73.9M trainable), or a real model
(`--model`, a registry name or local dir, via load_peft_for_probe with a fresh LoRA of the same kind).
Teacher-forcing batches are synthetic by default (BatchedSequences layout; prompt lengths from
--prompt-len: 'lo-hi' uniform or 'gsm8k_r1', the real GSM8K R1-template prompt lengths; responses
uniform in [5, --new-tokens]; a random-weight model almost never samples EOS, so its sampled responses
all run to the cap); `--tf-batch sampled` uses the sampled ones. With --measure-rows the E stages run on
that many random rows of E and are extrapolated to B_E, while E keeps the padded layout of all B_E rows:
the width the straightforward path pays for at the seed's scale.

FLOP model ("useful" model FLOPs, a lower bound on the work done): a forward over a batch costs
2·P_lin·T_real + 2·P_head·T_scored, where P_lin counts the weights of every Linear in the decoder (LoRA
A and B included, embeddings excluded), P_head = V·d the vocabulary projection, T_real the non-pad
tokens and T_scored the response tokens (float64 θ and η passes run each LoRA Linear as one matmul
with W + s·B·A, `scoring.merged_lora_linears`, so for them P_lin leaves A and B out); attention's O(L²) term is left out (≈1.5% at L ≈ 270 for the
1.5B shape). A gradient pass counts 2 forwards (backward through frozen weights = activation
gradients only; LoRA weight gradients are negligible), a JVP 2 (primal + tangent), a nested JVP 4.
Sampling counts 2·P_lin·(prompt + kept response tokens) + 2·P_head·(kept response tokens).
Achieved TFLOP/s is divided by the best matmul rate of the same dtype measured at the start of the
run (square matmuls of a few sizes in fp32, fp64, bf16). Rates use wall time, except on CPU with
--threads 1, where they use this process's CPU time (immune to other processes on a shared machine);
both are in the JSON. Each stage runs --repeats times and the fastest run counts.

Usage (progress on stderr, a table last on stdout, JSON to benchmarks/results/<name>-<timestamp>.json):
    python benchmarks/bench_stages.py --shape small --B-E 2048 --measure-rows 64 --B-U 4 --target-B-U 64 \\
        --G 8 --prompt-len gsm8k_r1 --new-tokens 150 --threads 1 --repeats 3 --straightforward-rows 48
    bash benchmarks/gpu_bench.sh          # qwen2_5_1_5b at the seed's scale on a GPU, ≤ 8 minutes
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _stub_math_verify() -> None:
    """entropy_core.sequences imports the data package, whose reward module imports math_verify. The GPU
    machines have only torch/transformers/peft/safetensors; rewards are never computed here, so a stub
    that fails loudly if called is enough."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        import types
        mod = types.ModuleType("math_verify")

        def _unavailable(*a, **k):
            raise RuntimeError("math_verify is not installed; bench_stages never computes rewards")
        mod.parse = mod.verify = _unavailable
        sys.modules["math_verify"] = mod


_stub_math_verify()

from entropy_core.estimators.linear import (curvature_exact, finite_difference, slope_exact,  # noqa: E402
                                            slope_variance_reduced)
from entropy_core.estimators.true_delta import entropy_base, snis_delta  # noqa: E402
from entropy_core.allocator import keep_freed_memory  # noqa: E402
from entropy_core.fastpaths import (microbatch_limits, padding_stats, plan_forwards, plan_shared_passes,  # noqa: E402
                                    prompt_sharing, resolve_microbatching, worth_sharing)
from entropy_core.params import get_trainable_named  # noqa: E402
from entropy_core.precision import (apply_global_precision, force_grads_fp32, keep_norms_in_dtype,  # noqa: E402
                                    str_to_dtype)
from entropy_core.scoring import jvp_scores, score_tokens, scoring_sharing  # noqa: E402
from entropy_core.update import compute_update_vector  # noqa: E402
from benchmarks.straightforward import (jvp_one_at_a_time, score_one_at_a_time,  # noqa: E402
                                        update_vector_one_at_a_time)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {   # random-weight Qwen2 shapes; qwen2_5_1_5b is the real Qwen2.5-1.5B config
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, lora_r=4),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=704, vocab_size=8192, lora_r=16),
    "qwen2_5_1_5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, lora_r=64, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=32768),
}
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2      # special ids of the random-model word-level tokenizer
# `--prompt-len gsm8k_r1`: prompt-token quantiles of the real gsm8k_r1_template train prompts (first 3000,
# SmolLM2 tokenizer; min 101, median 144, max 283), sampled by piecewise-linear inverse CDF.
GSM8K_R1_PROMPT_QUANTILES = ((0.0, 101), (0.1, 125), (0.5, 144), (0.9, 177), (0.99, 218), (1.0, 283))
GSM8K_R1_TEMPLATE_TOKENS = 83   # SmolLM2 tokens every gsm8k_r1_template prompt begins with (up to "Question:")
GSM8K_TEST_PROMPTS = 1319       # E's split: B_E = 2048 draws with replacement hit ≈ 1039 distinct prompts
FLOP_MULT = {"forward": 1, "score": 1, "grad": 2, "jvp": 2, "jvp2": 4}
ETA = 1e-3                            # one η pass; the value does not change the cost
N_ETA = 5                             # η passes in the whole-measurement total (issue 6: 5 η)
SHARED_NOTE = ("prompt tokens shared by rows run once (fastpaths.prompt_sharing); tokens and FLOPs are counted per "
               "row, prompt included, as for the packed path; computed_tokens counts the positions really run")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- model, tokenizer, batches ---------------------------------------------------------------------------

def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose every id decodes: 'tK' for id K, specials <pad>, <eos>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": UNK_ID}
    vocab.update({f"t{k}": k for k in range(3, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def random_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random Qwen2ForCausalLM of a named shape + LoRA (r, alpha = 2r) on all 7 linear modules; lora_B
    random so gradients are not zero. Built directly on the device (fast init for 1.5B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    spec = dict(SHAPES[shape])
    r = spec.pop("lora_r")
    cfg = Qwen2Config(**spec, tie_word_embeddings=True, bos_token_id=None, eos_token_id=EOS_ID,
                      pad_token_id=PAD_ID, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        base = Qwen2ForCausalLM(cfg)
    base = base.to(dtype).eval()
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    if dtype in (torch.bfloat16, torch.float16):
        force_grads_fp32(model)
    keep_norms_in_dtype(model)
    return model.eval(), word_tokenizer(cfg.vocab_size)


def real_model(name: str, dtype: torch.dtype, device: torch.device, r: int = 64):
    from entropy_core.loading import load_peft_for_probe
    model, tok = load_peft_for_probe(name, new_adapter={"r": r, "lora_alpha": 2 * r, "target_modules": LORA_TARGETS},
                                     dtype=dtype, device=str(device))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    return model.eval(), tok


def flop_params(model) -> tuple[int, int, int]:
    """(P_lin, P_head, P_lora): weights of the decoder's Linear layers (LoRA included), of the vocabulary
    head, and of the LoRA A and B matrices alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    p_lin = sum(m.weight.numel() for m in model.modules()
                if isinstance(m, torch.nn.Linear) and m is not head)
    p_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    return p_lin, head.weight.numel(), p_lora


def parse_range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition("-")
    return int(lo), int(hi or lo)


def draw_lengths(spec: str, n: int, g: torch.Generator) -> torch.Tensor:
    """n lengths: 'lo-hi' (or 'k') uniform, or 'gsm8k_r1' from GSM8K_R1_PROMPT_QUANTILES. (n,) int64."""
    if spec == "gsm8k_r1":
        u = torch.rand(n, generator=g, dtype=torch.float64)
        qs = torch.tensor([q for q, _ in GSM8K_R1_PROMPT_QUANTILES], dtype=torch.float64)
        xs = torch.tensor([x for _, x in GSM8K_R1_PROMPT_QUANTILES], dtype=torch.float64)
        k = torch.searchsorted(qs, u, right=True).clamp(1, len(qs) - 1)
        t = (u - qs[k - 1]) / (qs[k] - qs[k - 1])
        return (xs[k - 1] + t * (xs[k] - xs[k - 1])).round().long()
    lo, hi = parse_range(spec)
    return torch.randint(lo, hi + 1, (n,), generator=g)


def synthetic_batch(n: int, vocab: int, prompt_len: str, max_new: int, *, G: int = 1, seed: int = 0,
                    prefix: int = 0, pool: int = 0, special=(PAD_ID, EOS_ID, UNK_ID)) -> dict[str, torch.Tensor]:
    """BatchedSequences layout: left-padded prompts to P, responses from column P, right padding. Groups of
    G consecutive rows share one prompt; prompt lengths from `prompt_len` (draw_lengths), responses
    uniform in [5, max_new]. Every prompt begins with the same `prefix` tokens (a prompt template), and
    with `pool` > 0 the groups draw their prompts with replacement from `pool` distinct ones (as E draws
    from a dataset split), else each group has its own."""
    g = torch.Generator().manual_seed(seed)
    B = n // G
    lo = max(special) + 1
    n_prompts = pool or B
    lengths = draw_lengths(prompt_len, n_prompts, g).clamp(min=prefix + 1)
    head = torch.randint(lo, vocab, (prefix,), generator=g)
    prompts = [torch.cat([head, torch.randint(lo, vocab, (int(k) - prefix,), generator=g)]) for k in lengths]
    pick = torch.randint(n_prompts, (B,), generator=g) if pool else torch.arange(B)
    p_len = lengths[pick].repeat_interleave(G)
    r_len = torch.randint(min(5, max_new), max_new + 1, (B * G,), generator=g)
    P, L = int(p_len.max()), int(p_len.max() + r_len.max())
    ids = torch.full((B * G, L), PAD_ID, dtype=torch.long)
    am, rm = torch.zeros_like(ids), torch.zeros_like(ids)
    for b in range(B):
        prompt = prompts[int(pick[b])]
        for j in range(b * G, (b + 1) * G):
            p, r = int(p_len[j]), int(r_len[j])
            ids[j, P - p:P] = prompt
            ids[j, P:P + r] = torch.randint(lo, vocab, (r,), generator=g)
            am[j, P - p:P + r] = 1
            rm[j, P:P + r] = 1
    group = torch.arange(B).repeat_interleave(G)
    A = torch.randn(B * G, generator=g, dtype=torch.float64)
    A = A - A.view(B, G).mean(-1).repeat_interleave(G) if G > 1 else A
    return {"input_ids": ids, "attention_mask": am, "response_mask": rm, "group": group, "advantages": A}


def prompts_text(n: int, vocab: int, prompt_len: str, tok, seed: int) -> list[str]:
    """Random prompts of the given token lengths (exact for the word-level tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    out = []
    for k in draw_lengths(prompt_len, n, g).tolist():
        ids = [i for i in torch.randint(3, min(vocab, len(tok)), (2 * k,), generator=g).tolist()
               if i not in special][:k]
        out.append(tok.decode(ids))
    return out


def stepped_optimizer(model) -> torch.optim.AdamW:
    """AdamW over the LoRA tensors with plausible saved state (t₀ = 10), no real step needed."""
    params = list(get_trainable_named(model).values())
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01)
    g = torch.Generator(device=params[0].device).manual_seed(1)
    for p in params:
        m = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * 1e-4
        opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": m.to(p.dtype),
                        "exp_avg_sq": (m * m + 1e-10).to(p.dtype)}
    return opt


# -- measurements ----------------------------------------------------------------------------------------

def cpu_clock(device: torch.device) -> bool:
    """Rates on CPU with one thread use this process's CPU time: immune to time slices that other
    processes take on a shared machine (wall time varied 2-5x there). Everywhere else: wall time."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def matmul_ceiling(device: torch.device) -> dict:
    """Best TFLOP/s of square matmuls per dtype (TF32 off: apply_global_precision ran first), on the
    same clock as the stage rates (`cpu_clock`)."""
    sizes = (2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024)
    clock = time.process_time if cpu_clock(device) else time.perf_counter
    out = {}
    for name, dt in (("float32", torch.float32), ("float64", torch.float64), ("bfloat16", torch.bfloat16)):
        best = 0.0
        for n in sizes:
            try:
                a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
                a @ b
                sync(device)
                reps, t0 = 0, clock()
                while True:
                    a @ b
                    reps += 1
                    sync(device)
                    if clock() - t0 > 0.3:
                        break
                best = max(best, 2 * n ** 3 * reps / (clock() - t0) / 1e12)
                del a, b
            except RuntimeError as e:      # e.g. a dtype the device lacks
                log(f"matmul {name} {n}: {e}")
        out[name] = best
        log(f"matmul ceiling {name}: {best:.3f} TFLOP/s")
    return out


class Bench:
    def __init__(self, device, dtype, ceiling, p_lin, p_head, p_lora, time_budget, out_path: Path, meta: dict):
        self.device, self.dtype, self.ceiling = device, dtype, ceiling
        self.p_lin, self.p_head, self.p_lora, self.budget = p_lin, p_head, p_lora, time_budget
        self.out_path, self.meta = out_path, meta
        self.t_start = time.perf_counter()
        self.rows: list[dict] = []
        self.comparison: dict = {}

    def result(self) -> dict:
        return dict(meta=self.meta, matmul_ceiling_tflops=self.ceiling, stages=self.rows,
                    fast_vs_straightforward=self.comparison, whole_measurement=self.whole_measurement())

    def whole_measurement(self) -> dict | None:
        """The pipeline's composition at the target scale (DESIGN §1): sampling E and U, the update vector,
        the θ pass, N_ETA η passes, one nested JVP (it yields the exact slope and the curvature; the
        pipeline runs no separate first-order JVP) and the two ±h passes of the finite differences.
        None until every one of those stages has a time."""
        t = {r["stage"]: r.get("extrapolated_seconds") or r["seconds"] for r in self.rows if "seconds" in r}
        need = ("sample_E", "sample_U", "update_vector", "theta_pass", "eta_pass", "jvp2_curvature")
        if any(k not in t for k in need):
            return None
        parts = dict(sampling=t["sample_E"] + t["sample_U"], update_vector=t["update_vector"],
                     theta_pass=t["theta_pass"], eta_passes=N_ETA * t["eta_pass"],
                     slope_and_curvature=t["jvp2_curvature"], finite_difference=2 * t["eta_pass"])
        return dict(seconds=sum(parts.values()), parts=parts, n_eta=N_ETA,
                    note="stage times at the target B_E, B_U (extrapolated where measured on a subset); "
                         "model load and process start not included")

    def save(self) -> None:
        """Rewrite the JSON after every stage, so a run cut short still leaves what it measured."""
        self.meta["total_seconds"] = time.perf_counter() - self.t_start
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result(), indent=1, default=float))
        os.replace(tmp, self.out_path)

    def merge_last(self, *stages: str) -> None:
        """Collapse the repeated rows of these stages into one row each (fastest run, all times kept)."""
        for st in stages:
            rows = [r for r in self.rows if r["stage"] == st]
            key = "cpu_seconds" if cpu_clock(self.device) else "seconds"
            self.rows = [r for r in self.rows if r["stage"] != st] + [_merge(rows, key)]

    def out_of_time(self) -> bool:
        return self.budget is not None and time.perf_counter() - self.t_start > self.budget

    def run(self, stage: str, fn, *, kind: str, seqs: int = 0, computed: int = 0, real: int = 0, scored: int = 0,
            scale: float = 1.0, note: str = "", counts=None, repeats: int = 1):
        """Time fn() `repeats` times (seconds = the fastest); record throughput and FLOP rate; return fn's
        result (None on failure).
        counts(result) -> dict(seqs, computed, real, scored, ...) when the counts are known only afterwards."""
        row = dict(stage=stage, kind=kind, sequences=seqs, computed_tokens=computed, useful_tokens=real,
                   scored_tokens=scored, note=note)
        if self.out_of_time():
            row["skipped"] = f"time budget of {self.budget} s spent"
            log(f"{stage}: skipped ({row['skipped']})")
            self.rows.append(row)
            self.save()
            return None
        log(f"{stage}: {seqs or '?'} sequences ...")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times, cpu_times = [], []
        try:
            for _ in range(repeats):
                result = None
                sync(self.device)
                t0, c0 = time.perf_counter(), time.process_time()
                result = fn()
                sync(self.device)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        except Exception as e:   # a benchmark records a failing stage (e.g. OOM) and goes on
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"{stage}: FAILED {row['error']}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.rows.append(row)
            self.save()
            return None
        s = min(times)               # the least disturbed run (shared machines)
        row["cpu_seconds"] = min(cpu_times)   # this process's CPU time: on CPU with --threads 1, immune to
        if repeats > 1:                       # time slices lost to other processes
            row["seconds_all"] = times
        if counts is not None:
            c = counts(result)
            seqs, computed, real, scored = c.pop("seqs"), c.pop("computed"), c.pop("real"), c.pop("scored")
            row.update(c, sequences=seqs, computed_tokens=computed, useful_tokens=real, scored_tokens=scored)
        merged = kind == "score" and self.dtype == torch.float64             # merged LoRA: no A, B matmuls
        p_lin = self.p_lin - self.p_lora if merged else self.p_lin
        flops = FLOP_MULT[kind] * 2 * (p_lin * real + self.p_head * scored) if kind in FLOP_MULT else 0
        ceil = self.ceiling.get(str(self.dtype).removeprefix("torch."), 0.0)
        r = row["cpu_seconds"] if cpu_clock(self.device) else s          # the clock rates are measured on
        row.update(seconds=s, tokens_per_s=computed / r, useful_tokens_per_s=real / r,
                   tflops=flops / r / 1e12, ceiling_fraction=(flops / r / 1e12 / ceil) if ceil and flops else None,
                   extrapolated_seconds=s * scale if scale != 1.0 else None)
        if self.device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        log(f"{stage}: {s:.3f} s, {row['useful_tokens_per_s']:,.0f} useful tok/s, {row['tflops']:.3g} TFLOP/s")
        self.rows.append(row)
        self.save()
        return result


def _merge(rows: list[dict], key: str) -> dict:
    """One row from repeated runs of a stage: the fastest on `key`'s clock, with every time listed."""
    ok = [r for r in rows if "seconds" in r]
    if not ok:
        return rows[-1]
    best = dict(min(ok, key=lambda r: r[key]))
    best["seconds_all"] = [r["seconds"] for r in ok]
    best["cpu_seconds_all"] = [r["cpu_seconds"] for r in ok]
    return best


def tf_counts(batch, model=None, mb=None, budget=None, mode=None) -> dict:
    """seqs, real and scored tokens of a teacher-forcing batch, and the positions a pass computes: the padded
    layout without `model` (the straightforward path), else the fast path's plan for `mode` (`computed`)."""
    am = batch["attention_mask"]
    return dict(seqs=int(am.shape[0]), real=int(am.sum()), scored=int(batch["response_mask"].sum()),
                computed=int(am.numel()) if model is None else computed(model, batch, mb, budget, mode))


def computed(model, batch, mb, budget, mode: str) -> int:
    """Positions the fast path computes: with shared prompts (scoring passes and JVPs; the update pass) the
    root, each prompt's own tokens and the responses, each padded to its microbatch's width; else the
    packed rows."""
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    if mode in ("score", "jvp", "jvp2") and (sharing := scoring_sharing(model, ids, am, rm)) is not None:
        max_rows, b = microbatch_limits(model, am, mb, budget, mode)
        return sharing.root + sum(m.tokens for p in plan_shared_passes(sharing, max_rows=max_rows, token_budget=b)
                                  for m in p)
    if mode == "grad" and worth_sharing(sharing := prompt_sharing(ids, am, rm), am):
        total = 0
        for pieces in plan_forwards(model, am, mb, budget, mode="grad", sharing=sharing):
            heads, rows = torch.stack([c[0] for c in pieces]), torch.cat(pieces)
            total += sharing.root + len(pieces) * int(sharing.P[heads].max() - sharing.root) \
                + len(rows) * int(sharing.R[rows].max())
        return total
    return padding_stats(am, resolve_microbatching(model, am, mb, budget, mode=mode))["computed_tokens"]


def subset(batch: dict, idx: torch.Tensor) -> dict:
    """Rows idx of every tensor, at the batch's full padded width (as the earlier implementation saw them)."""
    return {k: v[idx] for k, v in batch.items()}


def group_subset(U: dict, n_groups: int, G: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    groups = torch.randperm(int(U["group"].max()) + 1, generator=g)[:n_groups]
    idx = torch.cat([torch.arange(int(b) * G, (int(b) + 1) * G) for b in groups.sort().values])
    out = subset(U, idx)
    out["group"] = torch.arange(n_groups).repeat_interleave(G)
    return out


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))


# -- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=sorted(SHAPES), help="random-weight Qwen2 of this shape (default small)")
    src.add_argument("--model", help="real model: registry name or local dir (load_peft_for_probe, fresh LoRA r=64)")
    ap.add_argument("--B-E", type=int, default=48, help="evaluation sequences (one response each)")
    ap.add_argument("--B-U", type=int, default=4, help="update prompts")
    ap.add_argument("--G", type=int, default=4, help="responses per update prompt")
    ap.add_argument("--prompt-len", default="20-120", help="prompt tokens: 'lo-hi' uniform, one number, or "
                                                          "'gsm8k_r1' (real GSM8K R1-template prompt lengths)")
    ap.add_argument("--shared-prefix", type=int, default=None,
                    help="tokens every synthetic prompt begins with (a template; default 83, gsm8k_r1_template's "
                         "beginning in SmolLM2 tokens, with --prompt-len gsm8k_r1, else 0)")
    ap.add_argument("--prompt-pool", type=int, default=None,
                    help="distinct prompts synthetic E draws from with replacement (default 1319, GSM8K test, with "
                         "--prompt-len gsm8k_r1, else 0: every row its own)")
    ap.add_argument("--new-tokens", type=int, default=150, help="max new tokens (responses uniform in [5, this])")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory (or a .json path)")
    ap.add_argument("--microbatch", default="auto", help="rows per microbatch, or 'auto' (token budget)")
    ap.add_argument("--token-budget", type=int, default=None, help="cap on rows × packed width per microbatch")
    ap.add_argument("--gen-batch", type=int, default=64, help="prompts per generate call")
    ap.add_argument("--straightforward-rows", type=int, default=None,
                    help="E rows for the one-at-a-time comparison (default min(B_E, 64)); U uses ≤ 4 groups")
    ap.add_argument("--measure-rows", type=int, default=None,
                    help="run the E stages (and sample_E) on this many random rows of E, extrapolated to B_E; "
                         "E's padded layout, which the straightforward path pays for, stays that of B_E rows")
    ap.add_argument("--target-B-E", type=int, default=None, help="extrapolate E stages linearly to this B_E")
    ap.add_argument("--target-B-U", type=int, default=None, help="extrapolate U stages linearly to this B_U")
    ap.add_argument("--tf-batch", choices=("synthetic", "sampled"), default="synthetic")
    ap.add_argument("--stages", default="all", help="comma list among: sample,update,theta,eta,jvp,jvp2,report,"
                                                    "straightforward (default all)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--time-budget", type=float, default=None, help="skip stages once this many s have passed")
    ap.add_argument("--repeats", type=int, default=1, help="runs per stage, the fastest is reported "
                                                          "(the comparison interleaves them)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    gsm8k = args.prompt_len == "gsm8k_r1"
    prefix = args.shared_prefix if args.shared_prefix is not None else (GSM8K_R1_TEMPLATE_TOKENS if gsm8k else 0)
    pool = args.prompt_pool if args.prompt_pool is not None else (GSM8K_TEST_PROMPTS if gsm8k else 0)
    apply_global_precision(allow_tf32=False, matmul_precision="highest")       # DESIGN §2.1
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = str_to_dtype(args.dtype)
    mb = "auto" if args.microbatch == "auto" else int(args.microbatch)
    stages = set("sample,update,theta,eta,jvp,jvp2,report,straightforward".split(",")) if args.stages == "all" \
        else set(args.stages.split(","))
    shape = args.shape or (None if args.model else "small")
    prompt_len = args.prompt_len

    allocator = "glibc keeps freed blocks (entropy_core.allocator)" if device.type == "cpu" and keep_freed_memory() \
        else "default"
    ceiling = matmul_ceiling(device)
    log(f"building {'shape ' + shape if shape else 'model ' + args.model} in {args.dtype} on {device}")
    model, tok = random_model(shape, dtype, device, args.seed) if shape else real_model(args.model, dtype, device)
    base = model.get_base_model()
    V = base.config.vocab_size
    p_lin, p_head, p_lora = flop_params(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in get_trainable_named(model).values())
    log(f"model: {n_params / 1e6:.1f}M params, {n_train / 1e6:.2f}M trainable, P_lin {p_lin / 1e6:.1f}M, "
        f"P_head {p_head / 1e6:.1f}M")
    import transformers
    name = (shape or Path(args.model).name) + f"-{device.type}-{args.dtype}"
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    meta = dict(name=name, shape=shape, model=args.model, dtype=args.dtype, device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                or platform.machine(), torch=torch.__version__, transformers=transformers.__version__,
                threads=torch.get_num_threads(), B_E=args.B_E, measure_rows=args.measure_rows, B_U=args.B_U, G=args.G,
                prompt_len=args.prompt_len, shared_prefix=prefix, prompt_pool=pool, allocator=allocator,
                new_tokens=args.new_tokens, microbatch=args.microbatch, token_budget=args.token_budget,
                tf_batch=args.tf_batch, target_B_E=args.target_B_E, target_B_U=args.target_B_U,
                params=n_params, trainable=n_train, P_lin=p_lin, P_head=p_head, P_lora=p_lora,
                rate_clock="process CPU time (CPU, 1 thread)" if cpu_clock(device) else "wall time",
                flop_model="useful FLOPs = mult * 2 * (P_lin * real tokens + P_head * scored tokens); mult: forward 1, "
                           "grad 2, jvp 2, jvp2 4; attention L^2 term and embeddings excluded",
                argv=sys.argv[1:] if argv is None else list(argv))
    bench = Bench(device, dtype, ceiling, p_lin, p_head, p_lora, args.time_budget, out, meta)
    n_E = min(args.measure_rows or args.B_E, args.B_E)      # E rows the stages run on
    sE = (args.target_B_E or args.B_E) / n_E
    sU = args.target_B_U / args.B_U if args.target_B_U else 1.0

    # -- sampling ------------------------------------------------------------------------------------
    E_sampled = U_sampled = None
    if "sample" in stages:
        from entropy_core.sequences import SequenceProcessor
        proc = SequenceProcessor(model, tok, max_new_tokens=args.new_tokens, temperature=1.0, stop=None,
                                 batch_size=args.gen_batch)
        shapes_seen = []
        real_gen = proc._generate_batch

        def spy(prompt_ids, *args, **kwargs):   # records (rows, prompt width, kept response max) per call
            rows = real_gen(prompt_ids, *args, **kwargs)
            shapes_seen.append((len(prompt_ids), max(len(p) for p in prompt_ids),
                                max(len(r.response_ids) for r in rows)))
            return rows
        proc._generate_batch = spy
        proc.generate(prompts_text(2, V, prompt_len, tok, seed=99), seed=0)          # warm-up, untimed
        for name, n_rep, B, scale in (("sample_E", 1, n_E, sE), ("sample_U", args.G, args.B_U, sU)):
            prompts = [p for p in prompts_text(B, V, prompt_len, tok, seed=args.seed + len(name))
                       for _ in range(n_rep)]
            shapes_seen.clear()

            def counts(out):
                return dict(seqs=len(out), real=int(out.attention_mask.sum()), scored=out.num_tokens,
                            computed=sum(n * (P + T) for n, P, T in shapes_seen), generate_calls=len(shapes_seen))
            out = bench.run(name, lambda: proc.generate(prompts, seed=args.seed), kind="forward", scale=scale,
                            counts=counts, note="FLOPs: one forward over prompt + kept tokens (KV cache)",
                            repeats=1)  # repeats would re-sample; the counts spy covers one run
            if name == "sample_E":
                E_sampled = out
            else:
                U_sampled = out

    # -- teacher-forcing batches ----------------------------------------------------------------------
    if args.tf_batch == "sampled" and E_sampled is not None and U_sampled is not None:
        E = {k: E_sampled[k] for k in ("input_ids", "attention_mask", "response_mask")}
        U = {k: U_sampled[k] for k in ("input_ids", "attention_mask", "response_mask")}
        g = torch.Generator().manual_seed(args.seed)
        U["group"] = torch.arange(args.B_U).repeat_interleave(args.G)
        A = torch.randn(args.B_U, args.G, generator=g, dtype=torch.float64)
        U["advantages"] = (A - A.mean(-1, keepdim=True)).flatten()
    else:
        E = synthetic_batch(args.B_E, V, prompt_len, args.new_tokens, seed=args.seed + 1, prefix=prefix, pool=pool)
        U = synthetic_batch(args.B_U * args.G, V, prompt_len, args.new_tokens, G=args.G, seed=args.seed + 2,
                            prefix=prefix)
    st_E = padding_stats(E["attention_mask"], resolve_microbatching(model, E["attention_mask"], mb, args.token_budget,
                                                                     mode="score"))
    shared_E = computed(model, E, mb, args.token_budget, "score")
    meta.update(E_real_tokens=st_E["real_tokens"], E_packed_positions=st_E["computed_tokens"],
                E_padded_positions=st_E["padded_layout_tokens"], E_shared_prompt_positions=shared_E)
    log(f"E: {E['input_ids'].shape[0]} rows, {st_E['real_tokens']} real tokens, packed {st_E['computed_tokens']} "
        f"positions, {shared_E} with shared prompts, vs {st_E['padded_layout_tokens']} in the padded layout")
    E_all, N_all = E, E["input_ids"].shape[0]      # a sampled E already has only n_E rows
    if n_E < N_all:   # stages on a random subset of E's rows (the layout, hence the straightforward width, stays)
        E = subset(E, torch.randperm(N_all, generator=torch.Generator().manual_seed(args.seed + 5))[:n_E]
                   .sort().values)
    Eids, Eam, Erm = E["input_ids"], E["attention_mask"], E["response_mask"]
    cE = tf_counts(E, model, mb, args.token_budget, "score")
    kw = dict(microbatch_size=mb, token_budget=args.token_budget)
    warm = subset(E, torch.arange(min(2, n_E)))                # warm-up, untimed: first-call kernels and caches
    score_tokens(model, warm["input_ids"], warm["attention_mask"], warm["response_mask"], **kw)
    if stages & {"jvp", "jvp2", "straightforward"}:
        jvp_scores(model, warm["input_ids"], warm["attention_mask"], warm["response_mask"],
                   {n: torch.zeros_like(p) for n, p in get_trainable_named(model).items()}, order=1, **kw)
    if stages & {"update", "straightforward"}:
        compute_update_vector(model, stepped_optimizer(model), group_subset(U, 1, args.G, args.seed), **kw)

    # -- stages ---------------------------------------------------------------------------------------
    v = None
    if "update" in stages or "eta" in stages or "jvp" in stages or "jvp2" in stages or "straightforward" in stages:
        opt = stepped_optimizer(model)
        res = bench.run("update_vector", lambda: compute_update_vector(model, opt, U, **kw), kind="grad",
                        scale=sU, **tf_counts(U, model, mb, args.token_budget, "grad"), repeats=args.repeats,
                        note=SHARED_NOTE) \
            if "update" in stages else None
        v = res.vector if res is not None else \
            {n: torch.randn_like(p, dtype=torch.float64) * 1e-2 for n, p in get_trainable_named(model).items()}
    theta = eta_s = js = js2 = None
    if "theta" in stages or "report" in stages:
        theta = bench.run("theta_pass", lambda: score_tokens(model, Eids, Eam, Erm, **kw), kind="score",
                          scale=sE, **cE, repeats=args.repeats, note=SHARED_NOTE)
    if "eta" in stages or "report" in stages:
        eta_s = bench.run("eta_pass", lambda: score_tokens(model, Eids, Eam, Erm, v=v, eta=ETA, **kw),
                          kind="score", scale=sE, **cE, repeats=args.repeats, note=SHARED_NOTE)
    if "jvp" in stages or "report" in stages:
        js = bench.run("jvp_exact_slope", lambda: jvp_scores(model, Eids, Eam, Erm, v, order=1, **kw), kind="jvp",
                       scale=sE, **tf_counts(E, model, mb, args.token_budget, "jvp"), repeats=args.repeats,
                       note=SHARED_NOTE)
    # -- straightforward vs fast on the same rows -------------------------------------------------------
    comparison = bench.comparison
    if "straightforward" in stages:
        n_sf = min(N_all, args.straightforward_rows or 64)
        idx = torch.randperm(N_all, generator=torch.Generator().manual_seed(args.seed + 3))[:n_sf].sort().values
        Es = subset(E_all, idx)
        Us = group_subset(U, min(args.B_U, 4), args.G, args.seed + 4)
        ids, am, rm = Es["input_ids"], Es["attention_mask"], Es["response_mask"]
        pairs = [
            ("theta", "forward", Es,
             lambda: score_one_at_a_time(model, ids, am, rm),
             lambda: score_tokens(model, ids, am, rm, **kw), ("S", "H")),
            ("jvp", "jvp", Es,
             lambda: jvp_one_at_a_time(model, ids, am, rm, v, order=1),
             lambda: jvp_scores(model, ids, am, rm, v, order=1, **kw), ("S", "H", "dS", "dH")),
            ("update", "grad", Us,
             lambda: update_vector_one_at_a_time(model, opt, Us),
             lambda: compute_update_vector(model, opt, Us, **kw), None),
        ]
        for name, kind, b, slow, fast, fields in pairs:
            mode = {"forward": "score", "jvp": "jvp", "grad": "grad"}[kind]
            c_fast = tf_counts(b, model, mb, args.token_budget, mode)
            c_slow = tf_counts(b)
            r_slow = r_fast = None
            for rep in range(args.repeats):    # interleaved, so both see the same machine load
                r_slow = bench.run(f"straightforward_{name}", slow, kind=kind,
                                   note="one sequence at a time, full width",
                                   **{k: c_slow[k] for k in ("seqs", "computed", "real", "scored")})
                r_fast = bench.run(f"fast_{name}", fast, kind="score" if kind == "forward" else kind,
                                   note=f"same rows, fast path; {SHARED_NOTE}",
                                   **c_fast)
                if r_slow is None or r_fast is None:
                    break
            if args.repeats > 1:
                bench.merge_last(f"straightforward_{name}", f"fast_{name}")
            row_slow = next(r for r in reversed(bench.rows) if r["stage"] == f"straightforward_{name}")
            row_fast = next(r for r in reversed(bench.rows) if r["stage"] == f"fast_{name}")
            t_slow, t_fast = row_slow.get("seconds"), row_fast.get("seconds")
            if r_slow is None or r_fast is None:
                continue
            if fields:    # max |fast − slow| / max |slow| over the tensor, worst field
                diff = max(max_rel(getattr(r_fast, f), getattr(r_slow, f)) for f in fields)
            else:         # ‖v_fast − v_slow‖ / ‖v_slow‖ over all tensors
                diff = math.sqrt(sum(float((r_fast.vector[n] - r_slow.vector[n]).pow(2).sum()) for n in r_slow.vector)
                                 / sum(float(r_slow.vector[n].pow(2).sum()) for n in r_slow.vector))
            comparison[name] = dict(rows=c_slow["seqs"], straightforward_s=t_slow, fast_s=t_fast,
                                    speedup=t_slow / t_fast, max_rel_diff=diff)
            if device.type == "cpu":   # with one thread, CPU time is the load-independent measure
                comparison[name].update(straightforward_cpu_s=row_slow["cpu_seconds"], fast_cpu_s=row_fast["cpu_seconds"],
                                        speedup_cpu_time=row_slow["cpu_seconds"] / row_fast["cpu_seconds"])
            log(f"{name}: straightforward {t_slow:.3f} s, fast {t_fast:.3f} s -> {t_slow / t_fast:.2f}x "
                f"(max rel diff {diff:.1e})")
            bench.save()

    # the curvature last: the most expensive stage, so a time budget cuts it rather than the comparison
    if "jvp2" in stages:
        js2 = bench.run("jvp2_curvature", lambda: jvp_scores(model, Eids, Eam, Erm, v, order=2, **kw),
                        kind="jvp2", scale=sE, **tf_counts(E, model, mb, args.token_budget, "jvp2"),
                        repeats=args.repeats, note=SHARED_NOTE)
    if "report" in stages and theta is not None and eta_s is not None and js is not None:
        def report():
            base_st, sh = theta.per_sequence(), eta_s.per_sequence()
            out = [entropy_base(base_st), snis_delta(base_st, sh, ETA), slope_exact(js.per_sequence()),
                   slope_variance_reduced(js), finite_difference(base_st, sh, sh, ETA)]
            if js2 is not None:
                out.append(curvature_exact(js2.per_sequence()))
            return out
        bench.run("report_arithmetic", report, kind="cpu", seqs=cE["seqs"], scale=sE, repeats=args.repeats)

    # -- output -----------------------------------------------------------------------------------------
    bench.save()
    log(f"wrote {bench.out_path}")
    result = bench.result()
    print_table(result)
    return 0


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(result: dict) -> None:
    m = result["meta"]
    print(f"\n{m['name']}: {m['params'] / 1e6:.1f}M params ({m['trainable'] / 1e6:.2f}M trainable), "
          f"{m['device_name']}, torch {m['torch']}, {m['threads']} threads; B_E={m['B_E']}, B_U={m['B_U']}x{m['G']}, "
          f"prompts {m['prompt_len']}, new tokens {m['new_tokens']}")
    print("matmul ceiling TFLOP/s: " + ", ".join(f"{k} {v:.3g}" for k, v in result["matmul_ceiling_tflops"].items()))
    print(f"E: {m['E_real_tokens']} real tokens; packed {m['E_packed_positions']} positions, with shared prompts "
          f"{m['E_shared_prompt_positions']} (prompts begin with {m['shared_prefix']} common tokens, drawn from "
          f"{m['prompt_pool'] or 'all-distinct'} prompts), padded layout {m['E_padded_positions']}")
    print("tok/s, useful/s and TFLOP/s count every row's prompt, shared or not: with shared prompts they are "
          "effective rates")
    hdr = f"{'stage':26s} {'seconds':>9s} {'extrap s':>9s} {'seqs':>6s} {'tok/s':>10s} {'useful/s':>10s} " \
          f"{'TFLOP/s':>8s} {'%ceil':>6s} {'GiB':>6s}"
    print(hdr)
    print("-" * len(hdr))
    for r in result["stages"]:
        if "seconds" not in r:
            print(f"{r['stage']:26s} {r.get('error') or r.get('skipped')}")
            continue
        frac = r.get("ceiling_fraction")
        print(f"{r['stage']:26s} {r['seconds']:9.3f} {_fmt(r.get('extrapolated_seconds'), '9.1f')} "
              f"{r['sequences']:6d} {_fmt(r['tokens_per_s'] or None, '10,.0f')} "
              f"{_fmt(r['useful_tokens_per_s'] or None, '10,.0f')} {_fmt(r.get('tflops') or None, '8.3g')} "
              f"{_fmt(100 * frac if frac else None, '6.1f')} {_fmt(r.get('peak_memory_gib'), '6.2f')}")
    if result["fast_vs_straightforward"]:
        print("\nfast / straightforward on the same rows (straightforward = one sequence at a time, full padded width):")
        for k, c in result["fast_vs_straightforward"].items():
            cpu = f" (CPU time: {c['speedup_cpu_time']:.2f}x)" if "speedup_cpu_time" in c else ""
            print(f"  {k:8s} {c['rows']:4d} rows: straightforward {c['straightforward_s']:.3f} s, fast {c['fast_s']:.3f} s,"
                  f" speedup {c['speedup']:.2f}x{cpu}, max rel diff {c['max_rel_diff']:.1e}")
    w = result["whole_measurement"]
    if w:
        print(f"\nwhole measurement at B_E={m['target_B_E'] or m['B_E']}, B_U={m['target_B_U'] or m['B_U']}x{m['G']} "
              f"({w['n_eta']} η, slope + curvature, ±h): {w['seconds']:.0f} s = "
              + ", ".join(f"{k} {v:.0f}" for k, v in w["parts"].items()))


if __name__ == "__main__":
    sys.exit(main())
