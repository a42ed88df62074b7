"""SequenceProcessor: the scored policy is the sampled policy (DESIGN §2.2, §2.3), the stop rule, the
batch layout and its files, and reproducible U / E sampling. Tiny random Qwen2 + LoRA, CPU, float32."""
import pytest
import torch

from entropy_core.data import Example
from entropy_core.sequences import BatchedSequences, DegenerateGroupsError, PolicyMismatchError, SequenceProcessor
from tiny import add_lora, make_base_model, make_tokenizer

TF_ATOL = 1e-5   # teacher-forced vs generation-time log-prob in float32: KV-cache vs full pass round-off

PROMPTS = ["Question: Tom has 3 apples and buys 4 more. How many?", "Q", "Tom has",
           "Question: Tom has 12 apples", "<think> 3 + 4 = 7 </think>", "How many apples?"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return add_lora(make_base_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def examples(n: int) -> list[Example]:
    return [Example(question=f"Tom has {i} apples and buys {i + 1} more. How many?", answer=str(2 * i + 1),
                    prompt=f"Question: Tom has {i} apples{' and buys more' * (i % 3)}. How many? <think>",
                    index=i, source="test") for i in range(n)]


def check_layout_and_stop(proc: SequenceProcessor, batch: BatchedSequences):
    """Every row: prompt left-padded to P, response from P, padding after; the response ends at the first
    EOS (kept) or right after the first token completing the stop string, or at max_new_tokens."""
    tok, stop = proc.tokenizer, proc.stop
    P = int(batch.response_mask.float().argmax(-1).min())
    assert (batch.response_mask[:, :P] == 0).all()
    ends = {"eos": 0, "stop": 0, "length": 0}
    for i in range(len(batch)):
        rm, am = batch.response_mask[i].bool(), batch.attention_mask[i].bool()
        T = int(rm.sum())
        assert T >= 1
        assert rm[P:P + T].all() and not rm[P + T:].any(), f"row {i}: response not contiguous from P={P}"
        assert not am[P + T:].any() and (batch.input_ids[i, P + T:] == tok.pad_token_id).all(), f"row {i}"
        prompt = batch.input_ids[i, :P][am[:P]].tolist()
        assert prompt == tok(batch.prompts[i])["input_ids"], f"row {i}: prompt tokens changed"
        resp = batch.input_ids[i, P:P + T].tolist()
        text = lambda t: tok.decode(t, skip_special_tokens=False)  # noqa: E731
        assert not any(t in proc.eos_ids for t in resp[:-1]), f"row {i}: EOS inside the response"
        assert stop not in text(resp[:-1]), f"row {i}: tokens kept after the stop string"
        if resp[-1] in proc.eos_ids:
            ends["eos"] += 1
        elif stop in text(resp):
            ends["stop"] += 1
        else:
            assert T == proc.max_new_tokens, f"row {i}: ended after {T} tokens without EOS or stop"
            ends["length"] += 1
        assert batch.texts[i] == tok.decode(resp, skip_special_tokens=True)
    return ends


def test_scored_policy_is_the_sampled_policy(model, tok):
    # extra EOS ids make EOS frequent (an EOS is scored), "an" completes often across tokens
    eos = [tok.eos_token_id, *tok(" = ?")["input_ids"]]
    proc = SequenceProcessor(model, tok, max_new_tokens=20, temperature=0.7, stop="an", batch_size=4,
                             eos_token_id=eos)
    batch = proc.generate(PROMPTS * 2, seed=3)
    ends = check_layout_and_stop(proc, batch)
    assert ends["stop"] >= 2 and ends["eos"] >= 1, ends         # both rules exercised with this seed
    assert len({int(m.sum()) for m in batch.attention_mask}) > 3  # different prompt lengths: left padding used

    scores = proc.teacher_force(batch, microbatch_size=5)
    torch.testing.assert_close(scores.S, batch.token_logq, atol=TF_ATOL, rtol=0, msg="per-token log-prob")
    torch.testing.assert_close(batch.logq, batch.token_logq.sum(-1), atol=1e-12, rtol=0, msg="logq = Σ_k")
    torch.testing.assert_close(scores.per_sequence().S, batch.logq, atol=20 * TF_ATOL, rtol=0, msg="S_i")
    assert batch.num_tokens == int(scores.mask.sum())


def test_model_generation_config_does_not_leak(model, tok):
    """HF fills every unset field of an explicit GenerationConfig from model.generation_config: top_k=50,
    repetition_penalty and suppress_tokens there would change the sampled policy (DESIGN §2.2)."""
    gc = model.get_base_model().generation_config
    saved = gc.to_dict()
    gc.top_k, gc.repetition_penalty, gc.suppress_tokens, gc.min_new_tokens = 50, 1.3, [5, 6], 4
    try:
        proc = SequenceProcessor(model, tok, max_new_tokens=12, temperature=0.7, stop=None)
        batch = proc.generate(PROMPTS, seed=0)     # the guard raises if any of them leaked in
        scores = proc.teacher_force(batch)
        torch.testing.assert_close(scores.S, batch.token_logq, atol=TF_ATOL, rtol=0)
        assert model.get_base_model().generation_config.top_k == 50, "the model's own config is restored"
    finally:
        for k in ("top_k", "repetition_penalty", "suppress_tokens", "min_new_tokens"):
            setattr(gc, k, saved.get(k))


def test_guard_names_a_processor_that_changes_the_policy(model, tok, monkeypatch):
    proc = SequenceProcessor(model, tok, max_new_tokens=6, temperature=0.7, stop=None)
    cfg = proc._generation_config()
    cfg.repetition_penalty = 1.3
    monkeypatch.setattr(proc, "_generation_config", lambda: cfg)
    with pytest.raises(PolicyMismatchError, match="RepetitionPenaltyLogitsProcessor"):
        proc.generate(PROMPTS[:2], seed=0)


@pytest.mark.parametrize("kw", [{"top_k": 50}, {"top_p": 0.9}, {"temperature": 0.0}])
def test_truncated_sampling_is_refused(model, tok, kw):
    with pytest.raises(ValueError):
        SequenceProcessor(model, tok, max_new_tokens=4, **kw)


def test_generate_is_seeded_and_leaves_the_global_rng_alone(model, tok):
    proc = SequenceProcessor(model, tok, max_new_tokens=8, stop=None, batch_size=2)
    state = torch.get_rng_state()
    a, b = proc.generate(PROMPTS, seed=1), proc.generate(PROMPTS, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logq, b.logq)
    assert not torch.equal(a.input_ids, proc.generate(PROMPTS, seed=2).input_ids)


def test_batched_sequences_save_load_round_trip(model, tok, tmp_path):
    proc = SequenceProcessor(model, tok, max_new_tokens=8, stop="an")
    batch = proc.sample_U(examples(6), 2, 3, reward_fn=lambda t, g: float(len(t) % 3), seed=0)
    path = batch.save(tmp_path / "u.safetensors")
    back = BatchedSequences.load(path)
    for k, t in batch.to_tensors().items():
        assert torch.equal(back[k], t) and back[k].dtype == t.dtype, k
    assert back.keys() == batch.keys()
    assert (back.texts, back.prompts, back.golds) == (batch.texts, batch.prompts, batch.golds)
    assert len(back) == 6 and back.num_tokens == batch.num_tokens
    with pytest.raises(KeyError, match="not a tensor"):
        batch["texts"]


def test_sample_E_draws_with_replacement_and_is_reproducible(model, tok):
    ex = examples(4)
    proc = SequenceProcessor(model, tok, max_new_tokens=6, stop="an")
    E = proc.sample_E(ex, 10, seed=5)
    assert len(E.prompt_index.unique()) < 10                       # 10 draws from 4 prompts repeat
    assert E.prompts == [ex[i].prompt for i in E.prompt_index.tolist()]
    assert E.golds == [ex[i].answer for i in E.prompt_index.tolist()]
    assert torch.equal(E.group, torch.arange(10)) and E.rewards is None
    again, other = proc.sample_E(ex, 10, seed=5), proc.sample_E(ex, 10, seed=6)
    assert torch.equal(again.input_ids, E.input_ids) and torch.equal(again.prompt_index, E.prompt_index)
    assert not (torch.equal(other.prompt_index, E.prompt_index) and other.texts == E.texts)


def test_sample_U_groups_and_advantages(model, tok):
    ex = examples(12)
    proc = SequenceProcessor(model, tok, max_new_tokens=6, stop="an")
    reward = lambda text, gold: float(len(text) % 2)               # noqa: E731, degenerate half the time at G=2
    U = proc.sample_U(ex, 3, 2, reward_fn=reward, seed=0)
    assert torch.equal(U.group, torch.tensor([0, 0, 1, 1, 2, 2]))
    per_group = U.prompt_index.view(3, 2)
    assert (per_group == per_group[:, :1]).all() and len(per_group[:, 0].unique()) == 3   # distinct prompts
    r = U.rewards.view(3, 2)
    assert (r.max(-1).values > r.min(-1).values).all()              # no degenerate group survives
    assert U.rewards.tolist() == [reward(t, g) for t, g in zip(U.texts, U.golds)]
    torch.testing.assert_close(U.advantages.view(3, 2), r - r.mean(-1, keepdim=True), rtol=0, atol=0)
    assert U.advantages.view(3, 2).sum(-1).abs().max() < 1e-12
    again = proc.sample_U(ex, 3, 2, reward_fn=reward, seed=0)
    assert torch.equal(again.input_ids, U.input_ids) and torch.equal(again.prompt_index, U.prompt_index)
    other = proc.sample_U(ex, 3, 2, reward_fn=reward, seed=1)
    assert not (torch.equal(other.prompt_index, U.prompt_index) and other.texts == U.texts)


def test_degenerate_groups_are_an_error(model, tok):
    proc = SequenceProcessor(model, tok, max_new_tokens=4, stop=None)
    with pytest.raises(DegenerateGroupsError, match=r"2 of 2 update groups .* after 1 resampling rounds"):
        proc.sample_U(examples(8), 2, 2, reward_fn=lambda t, g: 0.5, seed=0, max_resample_attempts=1)
    with pytest.raises(DegenerateGroupsError, match="unused prompts"):
        proc.sample_U(examples(2), 2, 2, reward_fn=lambda t, g: 0.5, seed=0)
    U = proc.sample_U(examples(8), 2, 2, reward_fn=lambda t, g: float(len(t)), seed=0)
    assert len(U) == 4
