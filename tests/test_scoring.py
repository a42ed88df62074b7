"""Teacher forcing against a plain full-logits reference, and the guards of DESIGN §2.7 and §2.9."""
import pytest
import torch

from entropy_core.params import get_trainable_named
from entropy_core.scoring import (ScoringError, head_gradients, jvp_scores, position_ids_from_mask, score_tokens,
                                  scored_token_logprobs)
from tiny import make_lora_model, random_batch


def reference(model, b, temperature=1.0):
    """log π and entropy from the full (N, L, V) logits, position by position."""
    with torch.no_grad():
        logits = model(b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=position_ids_from_mask(b["attention_mask"])).logits.double() / temperature
    N, L = b["input_ids"].shape
    S, H = torch.zeros(N, L, dtype=torch.float64), torch.zeros(N, L, dtype=torch.float64)
    for i in range(N):
        for t in range(1, L):
            if b["response_mask"][i, t]:
                p = torch.softmax(logits[i, t - 1], -1)
                S[i, t] = p[b["input_ids"][i, t]].log()
                H[i, t] = -(p * p.log()).sum()
    return S, H


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scores_match_full_logits_reference(temperature):
    m = make_lora_model(50)
    b = random_batch(50, 5, [2, 6, 3], [5, 1, 3, 4], seed=2)
    ts = score_tokens(m, b["input_ids"], b["attention_mask"], b["response_mask"], temperature=temperature,
                      microbatch_size=2)
    S, H = reference(m, b, temperature)
    torch.testing.assert_close(ts.S, S, rtol=0, atol=1e-12)
    torch.testing.assert_close(ts.H, H, rtol=0, atol=1e-12)
    st = ts.per_sequence()
    assert st.T.tolist() == b["response_mask"].sum(-1).double().tolist()


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_closed_form_head_gradients_equal_autograd(dtype, rtol, temperature):
    """A surrogate Σ α S + β H backpropagated from the decoder output with the closed-form head
    gradients gives the parameter gradient of autograd through the scored log-softmax."""
    m = make_lora_model(50, dtype=dtype)
    b = random_batch(50, 4, [2, 5], [4, 1, 6], seed=3)
    args = (b["input_ids"], b["attention_mask"], b["response_mask"])
    params = list(get_trainable_named(m).values())
    hg = head_gradients(m, *args, temperature=temperature, chunk_elements=3 * 50)   # 3 positions a chunk
    S, H = scored_token_logprobs(m, *args, temperature=temperature)
    torch.testing.assert_close(hg.S, S, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    torch.testing.assert_close(hg.H, H, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    g = torch.Generator().manual_seed(0)
    alpha, beta = torch.randn(len(S), generator=g, dtype=torch.float64), torch.randn(len(S), generator=g,
                                                                                    dtype=torch.float64)
    ref = torch.autograd.grad((alpha * S + beta * H).sum(), params)
    seed = (alpha[:, None] * hg.dS_dx + beta[:, None] * hg.dH_dx).to(hg.x.dtype)
    got = torch.autograd.grad(hg.x, params, seed)
    for r, x in zip(ref, got):
        assert float((x - r).abs().max() / r.abs().max()) <= rtol


def test_closed_form_head_gradients_refuse_a_trainable_head():
    m = make_lora_model(50)
    m.get_base_model().lm_head.weight.requires_grad_(True)
    b = random_batch(50, 2, [2], [3], seed=3)
    assert head_gradients(m, b["input_ids"], b["attention_mask"], b["response_mask"]) is None


def test_position_ids_follow_generate():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids_from_mask(am).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 1]]


def test_zero_token_pass_is_an_error():
    m = make_lora_model(50)
    b = random_batch(50, 3, [2], [3], seed=2)
    b["response_mask"][1] = 0
    with pytest.raises(ScoringError, match="score zero tokens .first: index 1"):
        score_tokens(m, b["input_ids"], b["attention_mask"], b["response_mask"])


def test_nonfinite_logits_name_the_sequence():
    m = make_lora_model(50)
    b = random_batch(50, 4, [2, 3], [3, 2], seed=2)
    calls = []

    def poison_second_microbatch(mod, inp, out):
        calls.append(1)
        return out.index_fill(0, torch.tensor([1]), float("nan")) if len(calls) == 2 else out

    hook = m.get_base_model().lm_head.register_forward_hook(poison_second_microbatch)
    try:   # row 1 of the second 2-row microbatch is sequence 3
        with pytest.raises(ScoringError, match=r"non-finite log-prob in 1 sequences \(first: index 3\)"):
            score_tokens(m, b["input_ids"], b["attention_mask"], b["response_mask"], microbatch_size=2)
    finally:
        hook.remove()


def test_non_finite_update_direction_refused():
    m = make_lora_model(50)
    b = random_batch(50, 2, [2], [3], seed=2)
    v = {n: torch.full_like(p, float("inf")) for n, p in get_trainable_named(m).items()}
    with pytest.raises(ValueError, match="non-finite entries"):
        jvp_scores(m, b["input_ids"], b["attention_mask"], b["response_mask"], v)


def test_padding_marked_as_scored_is_refused():
    m = make_lora_model(50)
    b = random_batch(50, 2, [2, 4], [3], seed=2)
    b["response_mask"][0, 0] = 0
    b["response_mask"][0, 1] = 1          # a left-pad position of the shorter prompt
    with pytest.raises(ScoringError, match="marks padding as scored in sequences \\[0\\]"):
        score_tokens(m, b["input_ids"], b["attention_mask"], b["response_mask"])
