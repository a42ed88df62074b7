"""Shared prompts (fastpaths.prompt_sharing; scoring.shared_prompt_passes in scoring, shared_prompt_logprobs
in the update pass) against the straightforward one-sequence-at-a-time path and the packed path, on
batches whose prompts begin with a common template and repeat (as E, drawn with replacement, does)."""
import sys
from pathlib import Path

import pytest
import torch

from entropy_core.fastpaths import SHARED_PROMPT_MIN_SAVING, plan_shared_prompts, prompt_sharing, worth_sharing
from entropy_core.params import get_trainable_named
from entropy_core.scoring import jvp_scores, score_tokens
from entropy_core.update import accumulate_gradient, drgrpo_coefficients
from test_fastpaths import REL_TOL, assert_rel, direction, models  # noqa: F401  (models: fixture)
from tiny import random_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.straightforward import jvp_one_at_a_time, score_one_at_a_time  # noqa: E402

TEMPLATE = [5, 6, 7, 8, 9]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def template_batch(template=TEMPLATE, repeats=((0, 4), (2, 7, 9)), n=10, seed=11):
    """Left-padded prompts of 6-14 tokens that begin with `template` (none when empty); the rows of each
    tuple in `repeats` hold the first one's prompt (its length too); responses of 1-9 tokens."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randint(6, 15, (n,), generator=g)
    for rows in repeats:
        P[list(rows)] = int(P[rows[0]])
    b = random_batch(64, n, P.tolist(), torch.randint(1, 10, (n,), generator=g).tolist(), seed=seed)
    ids, am, rm = b["input_ids"], b["attention_mask"], b["response_mask"]
    start = am.argmax(-1)
    for i in range(n):
        ids[i, start[i]:start[i] + len(template)] = torch.tensor(template, dtype=ids.dtype)
    prompt = am.bool() & ~rm.bool()
    for rows in repeats:
        for r in rows[1:]:
            ids[r][prompt[r]] = ids[rows[0]][prompt[rows[0]]]
    return b


def cols(b):
    return b["input_ids"], b["attention_mask"], b["response_mask"]


def test_sharing_finds_the_template_and_the_repeated_prompts():
    s = prompt_sharing(*cols(template_batch()))
    assert s.root >= len(TEMPLATE)           # ≥: a random next token may also agree everywhere
    assert [g.tolist() for g in s.groups if len(g) > 1] == [[0, 4], [2, 7, 9]]
    assert sum(len(g) for g in s.groups) == 10
    own = int((s.P - s.root).sum())          # prompt tokens the shared layout does not compute again
    saved = 9 * s.root + int((s.P[4] - s.root) + 2 * (s.P[2] - s.root))
    assert s.saved_tokens() == saved and s.saved_tokens() < own + 9 * s.root


def test_no_template_and_no_repeats_is_not_worth_sharing():
    b = template_batch(template=[], repeats=())
    s = prompt_sharing(*cols(b))
    assert s.root <= 1 and all(len(g) == 1 for g in s.groups)
    assert not worth_sharing(s, b["attention_mask"])
    assert worth_sharing(prompt_sharing(*cols(template_batch())), b["attention_mask"])
    assert SHARED_PROMPT_MIN_SAVING > 0


def test_a_row_with_a_hole_cannot_be_shared():
    b = template_batch()
    b["attention_mask"][3, int(b["attention_mask"][3].argmax()) + 1] = 0       # a masked token inside the prompt
    assert prompt_sharing(*cols(b)) is None


def test_root_leaves_every_prompt_a_token_of_its_own():
    b = template_batch(repeats=((0, 1, 2, 3, 4, 5, 6, 7, 8, 9),))              # one prompt for every row
    s = prompt_sharing(*cols(b))
    assert len(s.groups) == 1 and s.root == int(s.P[0]) - 1


@pytest.mark.parametrize("budget", [None, 30, 60])
def test_plan_covers_every_row_once(budget):
    s = prompt_sharing(*cols(template_batch()))
    for max_rows in (None, 1, 2, 4):
        if max_rows is None and budget is None:
            continue
        plan = plan_shared_prompts(s, max_rows=max_rows, token_budget=budget)
        rows = torch.cat([torch.cat(mb) for mb in plan])
        assert sorted(rows.tolist()) == list(range(10))
        for mb in plan:
            assert all(len({int(s.P[r]) for r in piece}) == 1 for piece in mb)   # a piece holds one prompt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("microbatch_size", [1, 3, "auto"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("template", [TEMPLATE, []])
def test_shared_scores_equal_one_at_a_time(models, dtype, microbatch_size, shift, template):  # noqa: F811
    """θ and θ + ηv passes: every prompt token once (root, own tokens, responses through the cache) gives
    the straightforward path's S and H; with no template only the repeated prompts are shared."""
    m, b = models[dtype], template_batch(template=template)
    ids, am, rm = cols(b)
    assert worth_sharing(prompt_sharing(ids, am, rm), am)
    kw = dict(v=direction(m), eta=0.3) if shift else {}
    ref = score_one_at_a_time(m, ids, am, rm, **kw)
    fast = score_tokens(m, ids, am, rm, microbatch_size=microbatch_size, **kw)
    packed = score_tokens(m, ids, am, rm, microbatch_size=microbatch_size, share_prompts=False, **kw)
    assert torch.equal(fast.mask, ref.mask)
    for name in ("S", "H"):
        assert_rel(getattr(fast, name), getattr(ref, name), REL_TOL[dtype], name)
        assert_rel(getattr(fast, name), getattr(packed, name), REL_TOL[dtype], f"{name} vs packed")
        assert (getattr(fast, name)[~fast.mask] == 0).all()


@pytest.mark.parametrize("dtype,order", [(torch.float64, 1), (torch.float64, 2), (torch.float32, 1)])
def test_shared_jvp_equals_one_at_a_time(models, dtype, order):  # noqa: F811
    """The JVPs share prompt tokens per microbatch (root and repeated prompts inside the JVP): the
    straightforward path's derivatives."""
    m, b = models[dtype], template_batch()
    v = direction(m)
    ref = jvp_one_at_a_time(m, *cols(b), v, order=order)
    for mb in ([1, 4, "auto"] if order == 1 else [3]):                         # nested JVPs are slow on CPU
        js = jvp_scores(m, *cols(b), v, order=order, microbatch_size=mb)
        for name in ("S", "H", "dS", "dH") + (("d2S", "d2H") if order == 2 else ()):
            assert_rel(getattr(js, name), getattr(ref, name), REL_TOL[dtype], f"{name} mb={mb}")


def test_token_budget_splits_the_prompt_and_response_passes(models):  # noqa: F811
    m, b = models[torch.float64], template_batch()
    ids, am, rm = cols(b)
    ref = score_one_at_a_time(m, ids, am, rm)
    seen = []
    fast = score_tokens(m, ids, am, rm, microbatch_size="auto", token_budget=20,
                        progress=lambda done, total: seen.append(done))
    assert len(seen) > 2 and seen[-1] == 10
    for name in ("S", "H"):
        assert_rel(getattr(fast, name), getattr(ref, name), REL_TOL[torch.float64], name)


@pytest.mark.parametrize("microbatch_size,token_budget", [(1, None), (4, None), ("auto", None), (10, 25)])
def test_update_gradient_with_repeated_prompts_equals_the_packed_path(models, microbatch_size,  # noqa: F811
                                                                       token_budget):
    """The gradient pass runs each repeated prompt once per microbatch (no root: a row's gradient must not
    depend on the other rows of a shard): the packed row-by-row gradient, float64."""
    m, b = models[torch.float64], template_batch()
    sharing = prompt_sharing(*cols(b), max_root=0)
    assert sharing.root == 0 and worth_sharing(sharing, b["attention_mask"])
    b["group"] = torch.tensor([0, 1, 2, 3, 0, 4, 5, 2, 6, 2])
    b["advantages"] = torch.linspace(-1, 1, 10, dtype=torch.float64)
    params = get_trainable_named(m)
    coef = drgrpo_coefficients(b["advantages"], b["group"], b["response_mask"].sum(-1))
    ref, _, loss_ref = accumulate_gradient(m, params, b, coef, microbatch_size=3, share_prompts=False)
    g, _, loss = accumulate_gradient(m, params, b, coef, microbatch_size=microbatch_size, token_budget=token_budget)
    num = sum(float((g[n] - ref[n]).pow(2).sum()) for n in ref)
    assert (num / sum(float(ref[n].pow(2).sum()) for n in ref)) ** 0.5 <= 1e-12
    assert loss == pytest.approx(loss_ref, rel=1e-12)
