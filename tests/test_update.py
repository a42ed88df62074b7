"""The update vector against a real torch.optim.AdamW step (DESIGN §1.1)."""
import pytest
import torch

from entropy_core.params import get_trainable_named
from entropy_core.scoring import position_ids_from_mask
from entropy_core.fastpaths import prompt_sharing, worth_sharing
from entropy_core.update import accumulate_gradient, compute_update_vector, drgrpo_coefficients
from tiny import make_lora_model, random_batch

REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}   # issue 2: real-step agreement per dtype
LR = {torch.float64: 1e-3, torch.float32: 1e-1}         # fp32: Δθ/lr must stay far above θ's round-off


def u_batch(shared_prompts: bool = False):
    """Two prompt groups of three; with `shared_prompts` the rows of a group hold the same prompt (as
    sampled U batches do: lengths 3 and 5), otherwise every row has its own."""
    b = random_batch(64, 6, [3, 3, 3, 5, 5, 5] if shared_prompts else [3, 5], [4, 6, 2], seed=3)
    if shared_prompts:
        prompt = b["attention_mask"].bool() & ~b["response_mask"].bool()                  # (6, L)
        for rows in ([0, 1, 2], [3, 4, 5]):
            b["input_ids"][rows] = torch.where(prompt[rows], b["input_ids"][rows[0]], b["input_ids"][rows])
    b["group"] = torch.tensor([0, 0, 0, 1, 1, 1])
    b["advantages"] = torch.tensor([1.0, -0.5, -0.5, 0.3, -0.6, 0.3], dtype=torch.float64)
    return b


def reference_loss(model, b):
    """Dr.GRPO written out independently: per group, −Σ_g A_g Σ_k log π / (G · L_max), mean over groups."""
    logits = model(b["input_ids"], attention_mask=b["attention_mask"],
                   position_ids=position_ids_from_mask(b["attention_mask"])).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    S = (logp * b["response_mask"][:, 1:]).sum(-1)
    T = b["response_mask"].sum(-1)
    groups = b["group"].unique()
    total = 0
    for gid in groups:
        idx = (b["group"] == gid).nonzero().flatten()
        total = total - (b["advantages"][idx] * S[idx]).sum() / (len(idx) * T[idx].max())
    return total / len(groups)


def stepped(dtype, amsgrad, wd=0.1, shared_prompts=False):
    m = make_lora_model(64, dtype=dtype)
    b = u_batch(shared_prompts)
    params = list(get_trainable_named(m).values())
    opt = torch.optim.AdamW(params, lr=LR[dtype], weight_decay=wd, amsgrad=amsgrad, betas=(0.9, 0.98), eps=1e-8)
    for k in range(3):                       # a few real steps so m, s, t₀ and amsgrad's max are all non-trivial
        opt.zero_grad()
        (reference_loss(m, b) * (1 + k) + sum(p.pow(2).sum() for p in params) * 0.1 * k).backward()
        opt.step()
    opt.zero_grad()
    return m, opt, b, params


def rel_err(a, b):
    num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
    return (num / sum(float(b[n].double().pow(2).sum()) for n in b)) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("clip", [None, 1e-3])
@pytest.mark.parametrize("shared", [False, True])
def test_update_vector_equals_real_adamw_step(dtype, amsgrad, clip, shared):
    """shared: the rows of a prompt group hold one prompt, so the gradient pass runs each prompt once
    and shares its keys/values with the group's responses (fastpaths.prompt_sharing)."""
    m, opt, b, params = stepped(dtype, amsgrad, shared_prompts=shared)
    assert worth_sharing(sharing(b), b["attention_mask"]) == shared
    res = compute_update_vector(m, opt, b, microbatch_size=4, clip_norm=clip)
    with torch.no_grad():
        assert res.stats["loss"] == pytest.approx(float(reference_loss(m, b)), rel=1e-5)
    if clip:
        assert res.stats["clip_scale"] < 1                  # the clip is really exercised
    before = {n: p.detach().clone() for n, p in get_trainable_named(m).items()}
    reference_loss(m, b).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    real = {n: (p.detach().double() - before[n].double()) / LR[dtype] for n, p in get_trainable_named(m).items()}
    assert rel_err(res.vector, real) <= REL_TOL[dtype]
    assert res.stats["num_tensors"] == len(real)


@pytest.mark.parametrize("microbatch_size,token_budget", [(1, None), (3, None), (6, None), ("auto", None),
                                                          (6, 12)])
def test_shared_prompt_gradient_equals_the_packed_path(microbatch_size, token_budget):
    """Each prompt run once for its group (whole groups per microbatch, or a group split into row chunks
    when the budget is smaller: (1, None) and (6, 12)) gives the packed row-by-row gradient, float64."""
    m, _, b, _ = stepped(torch.float64, False, shared_prompts=True)
    params = get_trainable_named(m)
    coef = drgrpo_coefficients(b["advantages"], b["group"], b["response_mask"].sum(-1))
    ref, _, loss_ref = accumulate_gradient(m, params, b, coef, microbatch_size=4, share_prompts=False)
    g, _, loss = accumulate_gradient(m, params, b, coef, microbatch_size=microbatch_size, token_budget=token_budget)
    assert rel_err(g, ref) <= 1e-12 and loss == pytest.approx(loss_ref, rel=1e-12)


def sharing(b):
    return prompt_sharing(b["input_ids"], b["attention_mask"], b["response_mask"])


def test_a_row_whose_prompt_differs_gets_a_group_of_its_own():
    b = u_batch(shared_prompts=True)
    assert [g.tolist() for g in sharing(b).groups] == [[0, 1, 2], [3, 4, 5]]
    b["input_ids"][4, 0] = 3 if int(b["input_ids"][3, 0]) != 3 else 4   # one prompt token of one row
    assert [g.tolist() for g in sharing(b).groups] == [[0, 1, 2], [3, 5], [4]]


def test_update_vector_uses_saved_weight_decay_not_defaults():
    m, opt, b, _ = stepped(torch.float64, False, wd=0.3)
    v_saved = compute_update_vector(m, opt, b).vector
    opt.param_groups[0]["weight_decay"] = 0.0
    v_zero = compute_update_vector(m, opt, b).vector
    for n, p in get_trainable_named(m).items():
        torch.testing.assert_close(v_zero[n] - v_saved[n], 0.3 * p.detach().double(), rtol=1e-12, atol=1e-14)


def test_components_sum_to_the_vector():
    m, opt, b, _ = stepped(torch.float64, True)
    res = compute_update_vector(m, opt, b, components=True, clip_norm=1e-3)
    total = {n: res.base[n] + res.per_sequence[n].sum(0) for n in res.vector}
    assert rel_err(total, res.vector) <= 1e-12
    assert all(res.per_sequence[n].shape[0] == 6 for n in res.vector)


def test_microbatch_invariance():
    m, opt, b, _ = stepped(torch.float64, False)
    ref = compute_update_vector(m, opt, b, microbatch_size=6).vector
    for mb in (1, 2):
        assert rel_err(compute_update_vector(m, opt, b, microbatch_size=mb).vector, ref) <= 1e-12


def test_model_left_as_found():
    m, opt, b, _ = stepped(torch.float64, False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    state = {k: v.clone() for k, v in opt.state[next(iter(opt.state))].items()}
    compute_update_vector(m, opt, b, dropout=False)
    assert not m.training
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in m.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in opt.state[next(iter(opt.state))].items())


def test_drgrpo_coefficients_scale():
    c = drgrpo_coefficients(torch.tensor([1.0, -1.0, 2.0]), torch.tensor([5, 5, 9]), torch.tensor([3, 4, 2]))
    # B_U = 2 groups; group 5: G=2, L_max=4; group 9: G=1, L_max=2
    torch.testing.assert_close(c, torch.tensor([-1 / (2 * 2 * 4), 1 / (2 * 2 * 4), -2 / (2 * 1 * 2)],
                                               dtype=torch.float64))


def test_missing_state_names_the_parameters():
    m = make_lora_model(64)
    opt = torch.optim.AdamW(list(get_trainable_named(m).values()))
    with pytest.raises(ValueError, match="8 parameters have no AdamW state"):
        compute_update_vector(m, opt, u_batch())
