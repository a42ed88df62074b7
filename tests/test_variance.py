"""The jackknife against a brute-force delete-one loop that re-runs the estimator."""
import torch

from entropy_core.estimators.variance import jackknife, leave_one_out_sums


def brute(parts, f, groups):
    labels = groups.unique()
    loo = torch.stack([f(parts[groups != g].sum(0)) for g in labels])
    G = len(labels)
    return ((G - 1) / G * (loo - loo.mean(0)).pow(2).sum(0)).sqrt()


def test_jackknife_matches_brute_force_by_sequence_and_by_group():
    g = torch.Generator().manual_seed(0)
    parts = torch.rand(40, 2, generator=g, dtype=torch.float64) + 0.1

    def ratio(s):
        return s[..., 0] / s[..., 1]

    value, se = jackknife(parts, ratio)
    torch.testing.assert_close(value, ratio(parts.sum(0)))
    torch.testing.assert_close(se, brute(parts, ratio, torch.arange(40)), rtol=1e-12, atol=0)
    groups = torch.arange(40) // 4
    _, se_g = jackknife(parts, ratio, groups)
    torch.testing.assert_close(se_g, brute(parts, ratio, groups), rtol=1e-12, atol=0)


def test_leave_one_out_sums_survive_one_dominant_row():
    rows = torch.tensor([[1e17], [1.0], [2.0]], dtype=torch.float64)
    loo = leave_one_out_sums(rows)
    assert loo[0, 0] == 3.0                      # total − 1e17 would give 0 or 4 here
    assert loo[1, 0] == 1e17 + 2 and loo[2, 0] == 1e17 + 1


def test_single_group_has_no_standard_error():
    _, se = jackknife(torch.ones(3, 2, dtype=torch.float64), lambda s: s[..., 0] / s[..., 1], torch.zeros(3))
    assert torch.isnan(se)
