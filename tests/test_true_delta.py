"""SNIS ΔĤ(η), its slopes and its error bars against the exact answer on the enumerable toy policy
(DESIGN §1.2–§1.5). The truth is computed by listing all 800 (prompt, response) pairs."""
import pytest
import torch

from entropy_core.estimators import (entropy_base, finite_difference, slope_exact, slope_variance_reduced,
                                     snis_delta, true_delta)
from entropy_core.scoring import jvp_scores
from toy import direction, enumerate_batch, exact_entropy, sample_indices, score_all, toy_model

ETAS = (0.1, 0.2, 0.4)
Z_MAX = 4.0            # an estimate further than 4 standard errors from the truth is a bug, not bad luck
COVERAGE = (0.90, 0.99)  # 95% intervals: binomial spread over 240 replicates is about ±1.4%


@pytest.fixture(scope="module")
def toy():
    model, batch = toy_model(), enumerate_batch()
    v = direction(model)
    s0 = score_all(model, batch)
    shifted = {eta: score_all(model, batch, v, eta) for eta in ETAS}
    jv = jvp_scores(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], v,
                    microbatch_size=400)
    truth = {eta: exact_entropy(s, batch["prompt"]) - exact_entropy(s0, batch["prompt"]) for eta, s in shifted.items()}
    h = 1e-5                      # float64 central difference of the exact functional: error ~h² ≈ 1e-10
    plus, minus = score_all(model, batch, v, h), score_all(model, batch, v, -h)
    slope = (exact_entropy(plus, batch["prompt"]) - exact_entropy(minus, batch["prompt"])) / (2 * h)
    return dict(model=model, batch=batch, v=v, s0=s0, shifted=shifted, jv=jv, truth=truth, slope=slope)


def test_enumeration_is_a_distribution(toy):
    p = toy["s0"].per_sequence().S.exp()
    for pi in range(2):
        assert abs(float(p[toy["batch"]["prompt"] == pi].sum()) - 1) < 1e-12


def test_exact_slope_on_the_whole_population_is_the_true_derivative(toy):
    """With every response listed and weighted by its probability (logq = 0 turns u into π), the
    exact-slope formula must reproduce the derivative of the exact functional."""
    st = toy["jv"].per_sequence()
    logq = torch.full_like(st.S, 0.0)      # u_i = exp(S_i − 0) = π(r_i | x_i)
    assert slope_exact(st, logq=logq).value == pytest.approx(toy["slope"], rel=1e-8)


def test_large_sample_snis_and_slopes_within_four_se_of_truth(toy):
    g = torch.Generator().manual_seed(11)
    idx = sample_indices(toy["s0"], toy["batch"]["prompt"], 6000, g)
    base = toy["s0"].index(idx).per_sequence()
    for eta in ETAS:
        pt = snis_delta(base, toy["shifted"][eta].index(idx).per_sequence(), eta)
        z = (pt.delta_h - toy["truth"][eta]) / pt.se
        assert abs(z) < Z_MAX, f"eta={eta}: ΔĤ={pt.delta_h:.5f} ± {pt.se:.5f}, truth {toy['truth'][eta]:.5f}"
        assert pt.ess > 0.5 * len(idx)
    jv = toy["jv"].index(idx)
    for name, est in (("exact", slope_exact(jv.per_sequence())), ("vr", slope_variance_reduced(jv))):
        z = (est.value - toy["slope"]) / est.se
        assert abs(z) < Z_MAX, f"{name} slope {est.value:.5f} ± {est.se:.5f}, truth {toy['slope']:.5f}"


def test_variance_reduced_slope_has_smaller_se(toy):
    g = torch.Generator().manual_seed(12)
    jv = toy["jv"].index(sample_indices(toy["s0"], toy["batch"]["prompt"], 4000, g))
    assert slope_variance_reduced(jv).se < slope_exact(jv.per_sequence()).se


def test_jackknife_interval_coverage(toy):
    """Over 240 independent samples of 150 sequences, the 95% jackknife interval of ΔĤ(η) and of
    Ĥ(θ) covers the exact value between 90% and 99% of the time."""
    g = torch.Generator().manual_seed(13)
    eta = 0.2
    H_true = exact_entropy(toy["s0"], toy["batch"]["prompt"])
    hits_d = hits_h = 0
    reps = 240
    for _ in range(reps):
        idx = sample_indices(toy["s0"], toy["batch"]["prompt"], 150, g)
        base = toy["s0"].index(idx).per_sequence()
        pt = snis_delta(base, toy["shifted"][eta].index(idx).per_sequence(), eta)
        hits_d += abs(pt.delta_h - toy["truth"][eta]) <= 1.96 * pt.se
        h = entropy_base(base)
        hits_h += abs(h.value - H_true) <= 1.96 * h.se
    for name, hits in (("ΔĤ", hits_d), ("Ĥ", hits_h)):
        assert COVERAGE[0] <= hits / reps <= COVERAGE[1], f"{name} coverage {hits / reps:.3f}"


def test_true_delta_runs_the_passes_the_same_way(toy):
    """true_delta (which scores the batch itself) equals snis_delta on the enumerated scores."""
    g = torch.Generator().manual_seed(14)
    idx = sample_indices(toy["s0"], toy["batch"]["prompt"], 64, g)
    sub = {k: t[idx] for k, t in toy["batch"].items()}
    res = true_delta(toy["model"], sub, toy["v"], list(ETAS), microbatch_size=16)
    base = toy["s0"].index(idx).per_sequence()
    for pt, eta in zip(res.points, ETAS):
        ref = snis_delta(base, toy["shifted"][eta].index(idx).per_sequence(), eta)
        assert pt.delta_h == pytest.approx(ref.delta_h, rel=1e-12, abs=1e-15)
        assert pt.se == pytest.approx(ref.se, rel=1e-10)
    assert res.tokens == int(sub["response_mask"].sum()) and res.sequences == 64


def test_proposal_weights_correct_a_tempered_proposal(toy):
    """E drawn from a different proposal q (here: π at temperature 1.5) and reweighted by
    u = π/q estimates the same ΔH as sampling from π (DESIGN §1.2, cheaper sampling)."""
    b = toy["batch"]
    from entropy_core.scoring import score_tokens
    q = score_tokens(toy["model"], b["input_ids"], b["attention_mask"], b["response_mask"], temperature=1.5,
                     microbatch_size=400)
    g = torch.Generator().manual_seed(15)
    idx = sample_indices(q, b["prompt"], 8000, g)
    logq = q.index(idx).per_sequence().S
    base = toy["s0"].index(idx).per_sequence()
    pt = snis_delta(base, toy["shifted"][0.4].index(idx).per_sequence(), 0.4, logq=logq)
    assert abs(pt.delta_h - toy["truth"][0.4]) < Z_MAX * pt.se
    H = entropy_base(base, logq=logq)
    assert abs(H.value - exact_entropy(toy["s0"], b["prompt"])) < Z_MAX * H.se


def test_finite_difference_matches_jvp_on_the_same_sample(toy):
    g = torch.Generator().manual_seed(16)
    idx = sample_indices(toy["s0"], toy["batch"]["prompt"], 500, g)
    h = 1e-5
    m, b, v = toy["model"], toy["batch"], toy["v"]
    plus, minus = score_all(m, b, v, h).index(idx), score_all(m, b, v, -h).index(idx)
    fd, _ = finite_difference(toy["s0"].index(idx).per_sequence(), plus.per_sequence(), minus.per_sequence(), h)
    ex = slope_exact(toy["jv"].index(idx).per_sequence())
    assert fd.value == pytest.approx(ex.value, rel=1e-7)
    assert fd.se == pytest.approx(ex.se, rel=1e-5)
