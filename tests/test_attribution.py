"""Per-U-sequence attribution (DESIGN §1.6) against brute force: explicit per-sequence update
components, reverse-mode gradients of the SNIS ratio itself, and finite differences along v_i."""
import pytest
import torch

from entropy_core.estimators import linear_estimates
from entropy_core.estimators.attribution import _shares, attribute, surrogate_gradients
from entropy_core.params import dot_named, get_trainable_named
from entropy_core.scoring import position_ids_from_mask, score_tokens, token_logprobs_entropy
from entropy_core.update import compute_update_vector, drgrpo_coefficients
from test_update import stepped
from tiny import random_batch

EXACT_RTOL = 1e-9       # issue 7: sums and brute-force shares, float64
SAME_RTOL = 1e-12      # one shared pass vs columns computed alone: round-off of summation order
FD_RTOL = 1e-6          # issue 7: finite-difference slope along v_i alone
H = 3e-6                # central-difference step along the full v (see test_linear), scaled by |v| / |v_i|


def grad_of_snis(model, e):
    """∇_θ' Ĥ(θ') at θ' = θ by reverse mode through the ratio Σ w H / Σ w T, w = exp(S' − S)."""
    named = get_trainable_named(model)
    logits = model(e["input_ids"], attention_mask=e["attention_mask"],
                   position_ids=position_ids_from_mask(e["attention_mask"])).logits
    S, Ht = token_logprobs_entropy(logits[:, :-1], e["input_ids"][:, 1:])
    m = e["response_mask"][:, 1:].double()
    S, Hs, T = (S * m).sum(-1), (Ht * m).sum(-1), m.sum(-1)
    w = (S - S.detach()).exp()
    ratio = (w * Hs).sum() / (w * T).sum()
    return dict(zip(named, (g.double() for g in torch.autograd.grad(ratio, list(named.values())))))


@pytest.fixture(scope="module")
def setup():
    m, opt, u, _ = stepped(torch.float64, False)
    upd = compute_update_vector(m, opt, u, components=True, clip_norm=5e-3)
    e = random_batch(64, 12, [2, 3, 5], [3, 6, 4, 7, 1], seed=9)
    theta = score_tokens(m, e["input_ids"], e["attention_mask"], e["response_mask"])
    res = attribute(m, e, u, upd, theta, v_base=upd.base, groups=4, microbatch_size=5)
    return m, upd, u, e, theta, res


def test_shares_sum_to_the_exact_slope(setup):
    m, upd, u, e, theta, res = setup
    lin = linear_estimates(m, e, upd.vector, quadratic=False, variance_reduced=True)
    assert res.slope == pytest.approx(lin.slope_exact.value, rel=EXACT_RTOL)
    assert res.slope_vr == pytest.approx(lin.slope_vr.value, rel=EXACT_RTOL)
    assert abs(res.base) > 0 and (res.c != 0).all()


def test_each_share_equals_brute_force_per_sequence_gradient(setup):
    m, upd, u, e, theta, res = setup
    g = grad_of_snis(m, e)
    for i in range(len(res.c)):
        v_i = {n: upd.per_sequence[n][i] for n in upd.per_sequence}
        assert float(res.c[i]) == pytest.approx(float(dot_named(g, v_i)), rel=EXACT_RTOL)
    assert res.base == pytest.approx(float(dot_named(g, upd.base)), rel=EXACT_RTOL)


def test_share_equals_finite_difference_slope_along_v_i(setup):
    m, upd, u, e, theta, res = setup
    for i in torch.randperm(len(res.c), generator=torch.Generator().manual_seed(0))[:3].tolist():
        v_i = {n: upd.per_sequence[n][i] for n in upd.per_sequence}
        h = H * float(dot_named(upd.vector, upd.vector) / dot_named(v_i, v_i)) ** 0.5
        fd = linear_estimates(m, e, v_i, quadratic=False, variance_reduced=False, fd_step=h).slope_fd
        assert fd.value == pytest.approx(float(res.c[i]), rel=FD_RTOL), f"sequence {i}"


def test_error_bars_match_a_brute_force_group_jackknife(setup):
    """The delta-method se equals, to first order, the delete-a-group jackknife that recomputes ∇Ĥ
    on E without each group (4 groups of 3 sequences)."""
    m, upd, u, e, theta, res = setup
    loo = []
    for idx in torch.arange(12).tensor_split(4):
        keep = torch.ones(12, dtype=torch.bool)
        keep[idx] = False
        g = grad_of_snis(m, {k: t[keep] for k, t in e.items()})
        loo.append(torch.tensor([float(dot_named(g, {n: upd.per_sequence[n][i] for n in upd.per_sequence}))
                                 for i in range(len(res.c))]))
    loo = torch.stack(loo)
    se = (3 / 4 * (loo - loo.mean(0)).pow(2).sum(0)).sqrt()
    ratio = res.c_se / se
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio    # first-order agreement (seen: within 6%)
    assert torch.isfinite(res.c_vr_se).all() and (res.c_vr_se > 0).all()


def test_error_bar_Y_is_the_first_groups_ratio_estimate(setup):
    """Y = ∇ Σ ω T S / D (the denominator's derivative, for the ratio correction) is estimated from the
    first group of E: Σ_{j∈G1} ω_j T_j ∇S_j / D_1, against reverse mode through those rows' S_j."""
    m, upd, u, e, theta, res = setup
    *_, y, idx, _, Dk, _ = surrogate_gradients(m, e, theta, groups=4, microbatch_size=5)
    named = get_trainable_named(m)
    rows = {k: t[idx[0]] for k, t in e.items()}
    logits = m(rows["input_ids"], attention_mask=rows["attention_mask"],
               position_ids=position_ids_from_mask(rows["attention_mask"])).logits
    S, _ = token_logprobs_entropy(logits[:, :-1], rows["input_ids"][:, 1:])
    mask = rows["response_mask"][:, 1:].double()
    wT = theta.per_sequence().T[idx[0]]                             # ω ≡ 1: E was drawn from π itself
    ref = torch.autograd.grad((wT * (S * mask).sum(-1)).sum() / wT.sum(), list(named.values()))
    for n, r in zip(named, ref):
        assert float((y[n] - r).abs().max() / r.abs().max()) <= SAME_RTOL, n
    assert len(idx[0]) == 3 and float(Dk.sum()) == pytest.approx(1.0, rel=1e-12)


def test_point_estimates_without_error_bars_are_the_same(setup):
    m, upd, u, e, theta, res = setup
    cheap = attribute(m, e, u, upd, theta, v_base=upd.base, groups=0, variance_reduced=False)
    torch.testing.assert_close(cheap.c, res.c, rtol=1e-10, atol=0)
    assert torch.isnan(cheap.c_se).all()
    assert cheap.passes == {"e_forward": 1, "e_backward": 1, "e_backward_Y_rows": 0, "u_pass": "reverse",
                            "u_directions": 1}


def test_one_pass_equals_each_column_computed_separately(setup):
    """Both columns from one forward over E (a backward per surrogate) and one pass over U (all
    directions at once) equal each column computed alone; the error-bar run (9 directions in one pass)
    gives the same point estimates; and the reverse U pass (Linear weights) equals the forward-mode one
    (both tangents vmapped on one primal), computed independently."""
    m, upd, u, e, theta, res = setup
    both = attribute(m, e, u, upd, theta, v_base=upd.base, groups=0, microbatch_size=5)
    exact = attribute(m, e, u, upd, theta, v_base=upd.base, groups=0, variance_reduced=False, microbatch_size=5)
    uk, zk, *_ = surrogate_gradients(m, e, theta, groups=0, microbatch_size=5)
    a = drgrpo_coefficients(u["advantages"], u["group"], u["response_mask"].sum(-1))
    vr = _shares(m, u, upd, zk, a, 1.0, 5)[0][0]                    # the vr direction in a pass of its own
    fwd, fwd_scores = _shares(m, u, upd, uk + zk, a, 1.0, 5, mode="forward")   # (2, N_U), one jvp, two tangents

    def rel(x, ref):
        return float((x - ref).abs().max() / ref.abs().max())

    for name, x, ref in (("c", both.c, exact.c), ("c_vr", both.c_vr, vr), ("c, groups", res.c, both.c),
                         ("c_vr, groups", res.c_vr, both.c_vr), ("c, forward mode", fwd[0], both.c),
                         ("c_vr, forward mode", fwd[1], both.c_vr)):
        assert rel(x, ref) <= SAME_RTOL, f"{name}: {rel(x, ref):.1e}"
    assert both.passes == {"e_forward": 1, "e_backward": 2, "e_backward_Y_rows": 0, "u_pass": "reverse",
                           "u_directions": 2}
    assert res.passes == {"e_forward": 1, "e_backward": 2, "e_backward_Y_rows": 3, "u_pass": "reverse",
                          "u_directions": 9}
    ref = score_tokens(m, u["input_ids"], u["attention_mask"], u["response_mask"])     # U's own θ pass
    for scores in (both.u_scores, fwd_scores):                      # from the reverse and forward U passes
        assert torch.equal(scores.mask, ref.mask)
        torch.testing.assert_close(scores.S, ref.S, rtol=0, atol=1e-12)
        torch.testing.assert_close(scores.H, ref.H, rtol=0, atol=1e-12)


def test_attribution_stage_in_a_measurement(tmp_path):
    """estimator.attribution adds a stage whose shares sum (with the base) to the reported exact slope,
    and leaves attribution.csv / attribution.png and a results.json section behind."""
    import csv
    import json

    from entropy_core.config import config_from_dict
    from entropy_core.measure import EntropyMeasurements
    from pipeline_fixtures import build_setup, with_output

    cfg = with_output(build_setup(tmp_path / "setup"), tmp_path / "run",
                      estimator={"attribution": True, "attribution_groups": 2, "quadratic": False},
                      precision={"runtime_dtype": "float64"})
    res = json.loads(EntropyMeasurements(config_from_dict(cfg)).run().read_text())
    attr = res["attribution"]
    assert attr["slope"] == pytest.approx(res["linear"]["slope_exact"], rel=1e-9)
    assert attr["slope_vr"] == pytest.approx(res["linear"]["slope_vr"], rel=1e-9)
    assert -1 <= attr["spearman_proxy_c"] <= 1 and len(attr["top"]) == min(5, res["update"]["sequences"])
    rows = list(csv.DictReader(open(attr["csv"], encoding="utf-8")))
    assert len(rows) == res["update"]["sequences"]
    assert sum(float(r["c"]) for r in rows) == pytest.approx(attr["sum_c"], rel=1e-9)
    assert {"c_se", "c_vr", "advantage", "reward", "logp_mean", "logp_min", "entropy_mean", "proxy",
            "response"} <= set(rows[0])
    assert open(attr["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("plain", ["head_gradients", "_linear_weights"])
def test_fast_passes_equal_the_plain_ones(setup, monkeypatch, plain):
    """The E and U passes backpropagate from the decoder output with closed-form head gradients, and
    the E pass takes each row's gradient at every LoRA Linear output so groups share microbatches.
    Without the first ("head_gradients": autograd through the scored log-softmax, as for every other
    model) or without the second ("_linear_weights": one forward per group, and U by forward mode),
    the surrogates' gradients, the U shares and U's scores are the same."""
    m, upd, u, e, theta, res = setup
    a = drgrpo_coefficients(u["advantages"], u["group"], u["response_mask"].sum(-1))
    fast = surrogate_gradients(m, e, theta, groups=4, microbatch_size=5)
    fast_u, fast_scores = _shares(m, u, upd, fast[0], a, 1.0, 5)          # (4, N_U) by the reverse U pass
    monkeypatch.setattr(f"entropy_core.estimators.attribution.{plain}", lambda *a, **k: None)
    slow = surrogate_gradients(m, e, theta, groups=4, microbatch_size=5)
    slow_u, slow_scores = _shares(m, u, upd, fast[0], a, 1.0, 5)
    assert float((fast_u - slow_u).abs().max() / slow_u.abs().max()) <= SAME_RTOL
    torch.testing.assert_close(fast_scores.S, slow_scores.S, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_scores.H, slow_scores.H, rtol=0, atol=1e-12)
    for name, f, p in (("u_k", fast[0], slow[0]), ("z_k", fast[1], slow[1]), ("y", [fast[2]], [slow[2]])):
        for gf, gp in zip(f, p):
            for n in gp:
                assert float((gf[n] - gp[n]).abs().max() / gp[n].abs().max()) <= SAME_RTOL, f"{name} {n}"
