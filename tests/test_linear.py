"""Exact derivatives of the SNIS estimator by forward-mode AD against finite differences of the
estimator itself, on the same sample, in float64 (DESIGN §1.3)."""
import pytest
import torch

from entropy_core.estimators import linear_estimates, true_delta
from entropy_core.scoring import forward_ad_attention
from entropy_core.update import compute_update_vector
from test_update import stepped
from tiny import random_batch

SLOPE_RTOL = 1e-7       # issue 2: JVP vs central difference, float64
CURV_RTOL = 1e-5        # issue 2: nested JVP vs second difference, float64
# Central-difference steps: truncation grows as h², round-off as 1e-16/h (slope) or 1e-16/h² (curvature);
# on this model they meet near 3e-6 for the slope (~2e-9 rel) and 3e-5 for the curvature (~2e-8 rel).
H_SLOPE, H_CURV = 3e-6, 3e-5


@pytest.fixture(scope="module")
def setup():
    m, opt, u, _ = stepped(torch.float64, False)
    v = compute_update_vector(m, opt, u).vector
    e = random_batch(64, 10, [2, 3, 5], [3, 6, 4, 7, 1], seed=9)
    return m, v, e


def test_jvp_slope_and_curvature_match_finite_differences(setup):
    m, v, e = setup
    lin = linear_estimates(m, e, v, quadratic=True, variance_reduced=True, fd_step=H_SLOPE, microbatch_size=4)
    assert abs(lin.slope_exact.value) > 1e-3 and abs(lin.curvature.value) > 1e-2   # real, non-zero derivatives
    assert lin.slope_fd.value == pytest.approx(lin.slope_exact.value, rel=SLOPE_RTOL)
    assert lin.slope_fd.se == pytest.approx(lin.slope_exact.se, rel=1e-5)
    curv_fd = linear_estimates(m, e, v, quadratic=False, variance_reduced=False, fd_step=H_CURV).curvature_fd
    assert curv_fd.value == pytest.approx(lin.curvature.value, rel=CURV_RTOL)


def test_slope_and_curvature_agree_with_true_delta(setup):
    """ΔĤ(η)/η → slope and (ΔĤ(η) − η·slope)/η² → curvature/2 as η → 0, on the same sample."""
    m, v, e = setup
    lin = linear_estimates(m, e, v, quadratic=True, variance_reduced=False, microbatch_size=5)
    eta = 1e-5                  # the curvature term is ≈ 2e-4 of the slope here
    d = true_delta(m, e, v, [eta]).points[0]
    assert d.delta_h / eta == pytest.approx(lin.slope_exact.value, rel=1e-3)
    eta = 1e-3                  # the cubic term is ≈ 1e-3 of the quadratic one here
    d = true_delta(m, e, v, [eta]).points[0]
    assert (d.delta_h - eta * lin.slope_exact.value) / eta ** 2 == pytest.approx(lin.curvature.value / 2, rel=1e-2)


def test_microbatching_does_not_change_jvp(setup):
    m, v, e = setup
    a = linear_estimates(m, e, v, quadratic=False, variance_reduced=True, microbatch_size=10)
    b = linear_estimates(m, e, v, quadratic=False, variance_reduced=True, microbatch_size=3)
    assert a.slope_exact.value == pytest.approx(b.slope_exact.value, rel=1e-12)
    assert a.slope_vr.value == pytest.approx(b.slope_vr.value, rel=1e-12)


def test_attention_implementation_restored(setup):
    m, v, e = setup
    base = m.get_base_model()
    base.set_attn_implementation("eager")
    try:
        with forward_ad_attention(m):
            assert base.config._attn_implementation == "sdpa"
        assert base.config._attn_implementation == "eager"
        linear_estimates(m, e, v, quadratic=False, variance_reduced=False)
        assert base.config._attn_implementation == "eager"
    finally:
        base.set_attn_implementation("sdpa")
