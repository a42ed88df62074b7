"""Fast paths (length bucketing, packing, chunked float64 log-softmax, auto microbatching) against the
straightforward one-sequence-at-a-time path of an earlier implementation (benchmarks/straightforward.py),
on mixed lengths with left padding, in float32 and float64."""
import sys
from pathlib import Path

import pytest
import torch
from torch.func import jvp, vmap

from entropy_core.estimators import linear_estimates, snis_delta, true_delta
from entropy_core.estimators.linear import curvature_exact, slope_exact
from entropy_core.fastpaths import (CPU_HEAD_CHUNK_ELEMENTS, CPU_HEAD_CHUNK_MIN_POSITIONS, CPU_TOKEN_BUDGET,
                                    HEAD_CHUNK_ELEMENTS, MicrobatchingError, auto_token_budget,
                                    budget_from_free_memory, bytes_per_token, head_chunk_positions, padding_stats,
                                    plan_microbatches, real_spans, resolve_microbatching)
from entropy_core.params import get_trainable_named
from entropy_core.scoring import (ScoringError, _split_route, chunked_logprobs_entropy, constant_weight_linears,
                                  jvp_scores, merged_lora_linears, score_tokens, token_logprobs_entropy)
from entropy_core.update import compute_update_vector
from test_update import stepped
from tiny import make_lora_model, random_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.straightforward import (jvp_one_at_a_time, score_one_at_a_time,  # noqa: E402
                                        update_vector_one_at_a_time)

# Issue 6: fast == plain up to summation order. Observed on these tiny models: ≤ 4e-16 (float64) and
# ≤ 3e-8 (float32) relative; the bounds leave room for other BLAS builds.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
N_E = 11
MICROBATCHES = [1, 3, "auto"]     # "auto" on CPU: all N_E rows in one microbatch (CPU_TOKEN_BUDGET tokens)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box OpenMP spinning made this file
    20× slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))


def assert_rel(a, b, tol, name):
    err = rel_err(a, b)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def mixed_batch(n=N_E, vocab=64, seed=5):
    """Prompts of 1-12 tokens (left padding up to 10 columns), responses of 1-15 (right padding)."""
    g = torch.Generator().manual_seed(seed)
    return random_batch(vocab, n, torch.randint(1, 13, (n,), generator=g).tolist(),
                        torch.randint(1, 16, (n,), generator=g).tolist(), seed=seed)


@pytest.fixture(scope="module")
def models():
    return {dt: make_lora_model(64, dtype=dt, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj")) for dt in REL_TOL}


def direction(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            for n, p in get_trainable_named(model).items()}


# -- the plan ------------------------------------------------------------------------------------------

def test_plan_covers_every_row_once_longest_first():
    b = mixed_batch()
    _, length = real_spans(b["attention_mask"])
    for kw in (dict(max_rows=1), dict(max_rows=3), dict(max_rows=100), dict(token_budget=40),
               dict(max_rows=2, token_budget=25)):
        plan = plan_microbatches(b["attention_mask"], **kw)
        rows = torch.cat([mb.rows for mb in plan])
        assert sorted(rows.tolist()) == list(range(N_E)), kw
        assert length[rows].tolist() == sorted(length.tolist(), reverse=True), kw
        for mb in plan:
            assert mb.width == int(length[mb.rows].max())
            assert kw.get("max_rows") is None or len(mb.rows) <= kw["max_rows"]
            assert kw.get("token_budget") is None or len(mb.rows) == 1 or mb.tokens <= kw["token_budget"]


def test_pack_keeps_tokens_and_positions_and_scatters_back():
    b = mixed_batch()
    for mb in plan_microbatches(b["attention_mask"], max_rows=4):
        ids, am, rm = mb.pack(b["input_ids"], b["attention_mask"], b["response_mask"])
        assert (am[:, 0] == 1).all()                                          # no left padding left
        for j, i in enumerate(mb.rows.tolist()):
            real = b["attention_mask"][i].bool()
            assert ids[j][am[j].bool()].tolist() == b["input_ids"][i][real].tolist()
            assert rm[j][am[j].bool()].tolist() == b["response_mask"][i][real].tolist()
        r, c = mb.scored_coordinates(b["response_mask"])
        assert torch.equal(b["input_ids"][r, c], ids[rm.bool()])               # same tokens, same order


def test_bucketing_computes_far_fewer_positions():
    g = torch.Generator().manual_seed(0)
    n = 64
    am = random_batch(64, n, torch.randint(20, 121, (n,), generator=g).tolist(),
                      torch.randint(5, 151, (n,), generator=g).tolist())["attention_mask"]
    st = padding_stats(am, plan_microbatches(am, max_rows=8))
    assert st["computed_tokens"] < 1.15 * st["real_tokens"] < 0.7 * st["padded_layout_tokens"]


def test_bad_microbatch_sizes_are_refused(models):
    b = mixed_batch()
    for bad in (0, -2, "big", 2.5, True):
        with pytest.raises(MicrobatchingError):
            score_tokens(models[torch.float64], b["input_ids"], b["attention_mask"], b["response_mask"],
                         microbatch_size=bad)


def test_token_after_padding_is_refused(models):
    b = mixed_batch()
    i = int(b["attention_mask"][:, 0].argmin())                              # a row with left padding
    first = int(b["attention_mask"][i].argmax())
    b["response_mask"][i, first] = 1                                          # its first real token scored
    with pytest.raises(ScoringError, match=rf"sequences \[{i}\] score a token right after padding"):
        score_tokens(models[torch.float64], b["input_ids"], b["attention_mask"], b["response_mask"])


def test_auto_budget_on_cpu_and_memory_model(models):
    m = models[torch.float32]
    am = mixed_batch()["attention_mask"]
    assert len(resolve_microbatching(m, am, "auto", None, mode="score")) == 1     # all rows fit CPU_TOKEN_BUDGET
    assert len(resolve_microbatching(m, am, "auto", 40, mode="score")) > 3        # a given budget wins
    assert auto_token_budget(m, width=30) == CPU_TOKEN_BUDGET
    assert auto_token_budget(m, width=CPU_TOKEN_BUDGET + 5) == CPU_TOKEN_BUDGET + 5   # one row always fits
    per = {mode: bytes_per_token(m, width=64, mode=mode) for mode in ("score", "jvp", "jvp2", "grad")}
    assert per["score"] < per["jvp"] < per["jvp2"] and per["score"] < per["grad"]
    assert bytes_per_token(models[torch.float64], width=64) == 2 * per["score"]
    gib = 2 ** 30                                                              # the CUDA branch's arithmetic
    b40 = budget_from_free_memory(m, 40 * gib, width=64, mode="grad")
    assert b40 > budget_from_free_memory(m, 20 * gib, width=64, mode="grad") > 64
    assert budget_from_free_memory(m, 0, width=64) == 64                       # nothing free: one row


# -- chunked float64 head --------------------------------------------------------------------------------

@pytest.mark.parametrize("with_head", [False, True])
def test_chunked_head_equals_one_shot_and_keeps_gradients(with_head):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False, dtype=torch.float64)
    x = torch.randn(37, 16 if with_head else 50, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(50, (37,), generator=g)
    S0, H0 = token_logprobs_entropy(head(x) if with_head else x, y, 0.7)
    S1, H1 = chunked_logprobs_entropy(x, y, 0.7, chunk_elements=50 * 4,      # 10 chunks of 4 positions
                                      head=head if with_head else None)
    torch.testing.assert_close(S1, S0, rtol=0, atol=1e-15)
    torch.testing.assert_close(H1, H0, rtol=0, atol=1e-15)
    w = torch.randn(37, generator=g, dtype=torch.float64)
    g0, = torch.autograd.grad((w * S0).sum() + (w * H0).sum(), x)
    g1, = torch.autograd.grad((w * S1).sum() + (w * H1).sum(), x)            # through the checkpoints
    torch.testing.assert_close(g1, g0, rtol=0, atol=1e-15)


def test_head_chunks_are_cache_sized_on_cpu_but_never_thin():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")                      # no CUDA needed: arithmetic only
    assert head_chunk_positions(8192, cpu) == CPU_HEAD_CHUNK_ELEMENTS // 8192 > CPU_HEAD_CHUNK_MIN_POSITIONS
    assert head_chunk_positions(151_936, cpu) == CPU_HEAD_CHUNK_MIN_POSITIONS  # a large vocabulary: the floor
    assert head_chunk_positions(151_936, cuda) == HEAD_CHUNK_ELEMENTS // 151_936


def test_both_logit_routes_equal_one_at_a_time(models):
    """Qwen2 takes the decoder + chunked-head route; a hook on the head sends it through the model's own
    forward (`logits_to_keep`). Both equal the straightforward path."""
    m, b = models[torch.float64], mixed_batch()
    v = direction(m)
    assert _split_route(m, None) is not None
    args = (b["input_ids"], b["attention_mask"], b["response_mask"])
    ref = jvp_one_at_a_time(m, *args, v, order=1)
    hook = m.get_base_model().lm_head.register_forward_hook(lambda mod, inp, out: None)
    try:
        assert _split_route(m, None) is None
        for mb in (3, "auto"):
            ts = score_tokens(m, *args, microbatch_size=mb)
            js = jvp_scores(m, *args, v, microbatch_size=mb)
            for name, x, r in (("S", ts.S, ref.S), ("H", ts.H, ref.H), ("dS", js.dS, ref.dS), ("dH", js.dH, ref.dH)):
                assert_rel(x, r, REL_TOL[torch.float64], f"{name} mb={mb} (model forward)")
    finally:
        hook.remove()


# -- fast == straightforward -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_score_tokens_equals_one_at_a_time(models, dtype):
    m, b = models[dtype], mixed_batch()
    v = direction(m)
    for eta, vv in ((0.0, None), (1e-2, v)):
        ref = score_one_at_a_time(m, b["input_ids"], b["attention_mask"], b["response_mask"], v=vv, eta=eta,
                                  temperature=0.8)
        for mb in MICROBATCHES:
            ts = score_tokens(m, b["input_ids"], b["attention_mask"], b["response_mask"], v=vv, eta=eta,
                              temperature=0.8, microbatch_size=mb)
            assert torch.equal(ts.mask, ref.mask)
            assert_rel(ts.S, ref.S, REL_TOL[dtype], f"S eta={eta} mb={mb}")
            assert_rel(ts.H, ref.H, REL_TOL[dtype], f"H eta={eta} mb={mb}")
            assert (ts.S[~ts.mask] == 0).all() and (ts.H[~ts.mask] == 0).all()
    ts = score_tokens(m, b["input_ids"], b["attention_mask"], b["response_mask"], temperature=0.8,
                      microbatch_size=4, token_budget=30)
    assert_rel(ts.S, score_one_at_a_time(m, b["input_ids"], b["attention_mask"], b["response_mask"],
                                         temperature=0.8).S, REL_TOL[dtype], "S token_budget=30")


def test_merged_lora_forward_replaces_every_vanilla_lora_linear_and_only_those(models):
    """In float64, score_tokens runs each LoRA Linear as one matmul with W + s B A (the equality with
    the three-matmul path is test_score_tokens_equals_one_at_a_time); a layer with active dropout and
    every float32 layer keep peft's own forward, and everything is restored on exit."""
    with merged_lora_linears(models[torch.float32]):
        assert not any("forward" in vars(mod) for mod in models[torch.float32].modules()
                       if type(mod).__module__.startswith("peft.tuners.lora"))
    m = models[torch.float64]
    lora = [mod for mod in m.modules() if type(mod).__module__.startswith("peft.tuners.lora") and
            type(mod).__name__ == "Linear"]
    assert len(lora) == 2 * 7
    before = {id(mod) for mod in m.modules() if "forward" in vars(mod)}          # e.g. the norms' dtype rule
    with merged_lora_linears(m):
        assert {id(mod) for mod in m.modules() if "forward" in vars(mod)} == before | {id(mod) for mod in lora}
    assert {id(mod) for mod in m.modules() if "forward" in vars(mod)} == before
    drop = lora[0].lora_dropout["default"]
    lora[0].lora_dropout["default"] = torch.nn.Dropout(0.1).train()
    try:
        with merged_lora_linears(m):
            assert "forward" not in vars(lora[0]) and "forward" in vars(lora[1])
    finally:
        lora[0].lora_dropout["default"] = drop


@pytest.mark.parametrize("dtype,order", [(torch.float64, 1), (torch.float64, 2), (torch.float32, 1)])
def test_jvp_scores_equals_one_at_a_time(models, dtype, order):
    m, b = models[dtype], mixed_batch()
    v = direction(m)
    ref = jvp_one_at_a_time(m, b["input_ids"], b["attention_mask"], b["response_mask"], v, order=order)
    for mb in (MICROBATCHES if order == 1 else [1, "auto"]):                # nested JVPs are slow on CPU
        js = jvp_scores(m, b["input_ids"], b["attention_mask"], b["response_mask"], v, order=order,
                        microbatch_size=mb)
        for name in ("S", "H", "dS", "dH") + (("d2S", "d2H") if order == 2 else ()):
            assert_rel(getattr(js, name), getattr(ref, name), REL_TOL[dtype], f"{name} mb={mb}")


@pytest.mark.parametrize("dtype,hooked", [(torch.float64, False), (torch.float32, False), (torch.float64, True)])
def test_update_vector_equals_one_at_a_time(dtype, hooked):
    m, opt, u, _ = stepped(dtype, False)
    ref = update_vector_one_at_a_time(m, opt, u, clip_norm=1e-3).vector
    if hooked:   # the model's own forward instead of decoder + chunked head
        m.get_base_model().lm_head.register_forward_hook(lambda mod, inp, out: None)
    for mb in (1, 3, 6, "auto"):
        v = compute_update_vector(m, opt, u, microbatch_size=mb, clip_norm=1e-3).vector
        for n in ref:
            assert_rel(v[n], ref[n], REL_TOL[dtype], f"v[{n}] mb={mb}")
    v = compute_update_vector(m, opt, u, microbatch_size=6, token_budget=20, clip_norm=1e-3).vector
    assert max(rel_err(v[n], ref[n]) for n in ref) <= REL_TOL[dtype]


def test_estimates_equal_one_at_a_time(models):
    """Ĥ(θ), Ĥ(θ+ηv), ΔĤ(η), the exact slope and curvature from the fast paths equal those from the
    straightforward scores, float64, for every microbatching. ΔĤ = Ĥ(θ+ηv) − Ĥ(θ) inherits the round-off
    of Ĥ (≈ 4 here, while ΔĤ ≈ 1e-3), so it is compared on Ĥ's scale."""
    m, b = models[torch.float64], mixed_batch()
    v = direction(m)
    ids, am, rm = b["input_ids"], b["attention_mask"], b["response_mask"]
    tol, eta = REL_TOL[torch.float64], 0.3
    base = score_one_at_a_time(m, ids, am, rm).per_sequence()
    ref = snis_delta(base, score_one_at_a_time(m, ids, am, rm, v=v, eta=eta).per_sequence(), eta)
    H0 = float(base.H.sum() / base.T.sum())
    jv = jvp_one_at_a_time(m, ids, am, rm, v, order=2).per_sequence()
    ref_slope, ref_curv = slope_exact(jv).value, curvature_exact(jv).value
    for mb in (1, 3, "auto"):
        td = true_delta(m, b, v, [eta], microbatch_size=mb)
        d = td.points[0]
        assert abs(td.H_base.value - H0) <= tol * H0, mb
        assert abs(d.H_eta - ref.H_eta) <= tol * abs(ref.H_eta), mb
        assert abs(d.delta_h - ref.delta_h) <= tol * H0, (mb, d.delta_h, ref.delta_h)
        assert d.se == pytest.approx(ref.se, rel=1e-9) and d.ess == pytest.approx(ref.ess, rel=tol)
    for mb in (3, "auto"):
        lin = linear_estimates(m, b, v, quadratic=True, variance_reduced=False, microbatch_size=mb)
        assert abs(lin.slope_exact.value - ref_slope) <= tol * abs(ref_slope), mb
        assert abs(lin.curvature.value - ref_curv) <= tol * abs(ref_curv), mb


def test_progress_reports_every_sequence(models):
    b, seen = mixed_batch(), []
    score_tokens(models[torch.float32], b["input_ids"], b["attention_mask"], b["response_mask"], microbatch_size=4,
                 progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, N_E), (8, N_E), (N_E, N_E)]


# -- generation ------------------------------------------------------------------------------------------

def test_generation_batches_are_length_sorted(monkeypatch):
    from entropy_core.sequences import SequenceProcessor
    from tiny import make_tokenizer
    tok = make_tokenizer()
    proc = SequenceProcessor(make_lora_model(len(tok), dtype=torch.float32), tok, max_new_tokens=2, batch_size=3,
                             stop=None)
    seen = []
    real = proc._generate_batch

    def spy(prompt_ids, *args, **kwargs):
        seen.append([len(p) for p in prompt_ids])
        return real(prompt_ids, *args, **kwargs)

    monkeypatch.setattr(proc, "_generate_batch", spy)
    prompts = ["Tom has 3 apples" * k for k in (5, 1, 3, 2, 6, 1, 4)]
    batch = proc.generate(prompts, seed=0)
    flat = [n for s in seen for n in s]
    assert flat == sorted(flat) and [len(s) for s in seen] == [3, 3, 1]
    assert batch.prompts == prompts                                          # rows back in the caller's order


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_auto_microbatching_equals_one_at_a_time(dtype):
    """On a GPU: "auto" sizes from free device memory; results still equal the straightforward path."""
    m, b = make_lora_model(64, dtype=dtype).cuda(), mixed_batch()
    v = direction(m)
    args = (b["input_ids"], b["attention_mask"], b["response_mask"])
    ref = score_one_at_a_time(m, *args)
    ts = score_tokens(m, *args, microbatch_size="auto")
    assert_rel(ts.S, ref.S, REL_TOL[dtype], "S cuda auto")
    assert_rel(ts.H, ref.H, REL_TOL[dtype], "H cuda auto")
    jr, js = jvp_one_at_a_time(m, *args, v), jvp_scores(m, *args, v, microbatch_size="auto")
    assert_rel(js.dS, jr.dS, REL_TOL[dtype], "dS cuda auto")


def _mm_calls(fn) -> int:
    from torch.profiler import profile
    with profile() as p:
        fn()
    return sum(e.count for e in p.key_averages() if e.key in ("aten::mm", "aten::addmm"))


def test_constant_weight_linears_keep_every_derivative_and_drop_the_zero_matmul():
    """The frozen-Linear JVP rule: value, first and nested derivatives (and vmapped tangents) equal to
    autograd's own rule in float64 to the last bit, with two matmuls for a JVP (primal, tangent) where
    autograd's rule adds more (it multiplies by a materialised zero tangent of the weight); the module's forward is restored after."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16, dtype=torch.float64).requires_grad_(False)
    A, vA = torch.randn(24, 24, dtype=torch.float64) / 5, torch.randn(24, 24, dtype=torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64)
    e0, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)

    def f(eta):                                            # a trainable A before and after a frozen Linear
        return torch.sin(lin(torch.tanh(x @ (A + eta * vA).T))).sum(-1)

    def derivatives():
        first = jvp(f, (e0,), (one,))
        nested = jvp(lambda e: jvp(f, (e,), (one,)), (e0,), (one,))
        batched = vmap(lambda t: jvp(f, (e0,), (t,))[1])(torch.tensor([1.0, -2.0], dtype=torch.float64))
        return torch.utils._pytree.tree_leaves((first, nested, batched))

    ref, plain_mm = derivatives(), _mm_calls(lambda: jvp(lin, (x,), (x,)))
    with constant_weight_linears(lin):
        new, patched_mm = derivatives(), _mm_calls(lambda: jvp(lin, (x,), (x,)))
    assert all(torch.equal(a, b) for a, b in zip(new, ref))
    assert patched_mm == 2 and plain_mm >= 3, (plain_mm, patched_mm)    # torch 2.13 with a bias: 4
    assert "forward" not in vars(lin)
