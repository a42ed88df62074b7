"""Tests for entropy_core/distributed.py: a measurement split over torch.distributed ranks equals one process.

The main test runs tests/dist_worker.py under `torchrun --nproc_per_node=2` (gloo, CPU, OMP_NUM_THREADS=1)
and compares every number it produced, on every rank, with the plain single-process library calls
(`compute_update_vector`, `true_delta`, `linear_estimates`) on the same tiny float64 model and batches:
ΔĤ(η), Ĥ(θ), slopes, curvature and all their jackknife standard errors to ≤ 1e-10 relative, and the
update vector to ≤ 1e-12 relative. The rest are single-process checks of the sharding arithmetic.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import dist_worker as W
from entropy_core import distributed as D
from entropy_core.estimators import linear_estimates, true_delta
from entropy_core.scoring import score_tokens
from entropy_core.update import compute_update_vector
from test_update import rel_err

ROOT = Path(__file__).resolve().parents[1]
MEASURE_REL_TOL = 1e-10   # same v, same per-row arithmetic: the estimators see the same per-token numbers
V_REL_TOL = 1e-12         # the gradient is the same float64 sum in another order
# Absolute round-off floor of one float64 ΔĤ(η) (Ĥ ≈ 4 nats: a few ulps are ~1e-15; ×10 margin). When a
# shard packs other rows together, or v differs in its last bits, ΔĤ moves by about this much, and the
# finite differences divide it by 2h (slope) or h² (curvature).
DELTA_H_FLOOR = 1e-14
WORLD = 2


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _round_off(key: str) -> float:
    """What round-off of ΔĤ can move this number by (absolute)."""
    if key.startswith("curvature_fd"):
        return DELTA_H_FLOOR / W.FD_STEP ** 2
    if key.startswith("slope_fd"):
        return DELTA_H_FLOOR / W.FD_STEP
    return DELTA_H_FLOOR


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: v (also written to a file for the workers) and every number of `W.summary`, at
    microbatch 1 and at the packed microbatch."""
    torch.set_num_threads(1)
    model, opt = W.model_and_optimizer()
    U, E = W.batches()
    res = compute_update_vector(model, opt, U, microbatch_size=W.PACKED_MICROBATCH)
    path = tmp_path_factory.mktemp("v") / "v.safetensors"
    safetensors.torch.save_file(res.vector, str(path))
    numbers = {}
    for mb in (W.MICROBATCH, W.PACKED_MICROBATCH):
        td = true_delta(model, E, res.vector, W.ETAS, microbatch_size=mb)
        lin = linear_estimates(model, E, res.vector, quadratic=True, variance_reduced=True, fd_step=W.FD_STEP,
                               microbatch_size=mb)
        numbers[mb] = W.summary(td, lin)
    return res, path, numbers


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory, reference):
    """Outputs of the 2-rank run: ({rank: numbers}, {rank: tensors})."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(ROOT / "tests" / "dist_worker.py"), "--out", str(out), "--vector", str(reference[1])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    numbers = {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)}
    tensors = {r: safetensors.torch.load_file(str(out / f"rank{r}.safetensors")) for r in range(WORLD)}
    return numbers, tensors


def _v(tensors: dict, case: str) -> dict:
    prefix = f"v/{case}/"
    return {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.mark.parametrize("case", ["contiguous", "strided", "local"])
def test_distributed_update_vector_equals_one_process(torchrun, reference, case):
    numbers, tensors = torchrun
    res = reference[0]
    for r in range(WORLD):
        v = _v(tensors[r], case)
        assert set(v) == set(res.vector)
        assert rel_err(v, res.vector) <= V_REL_TOL, f"rank {r}, {case}: {rel_err(v, res.vector):.2e}"
        stats = numbers[r][f"update/{case}"]
        assert (stats["num_sequences"], stats["tokens"]) == (res.stats["num_sequences"], res.stats["tokens"])
        assert _rel(stats["loss"], res.stats["loss"]) <= V_REL_TOL
    for n, t in _v(tensors[0], case).items():                        # every rank holds the same v, bit for bit
        assert torch.equal(t, _v(tensors[1], case)[n]), n


@pytest.mark.parametrize("case", ["contiguous", "strided", "local"])
def test_distributed_measurement_equals_one_process(torchrun, reference, case):
    """Along the same v, one row per forward: ΔĤ(η), Ĥ(θ), ESS, log-weights, every slope and curvature,
    and all their standard errors agree with one process to MEASURE_REL_TOL."""
    numbers, _ = torchrun
    ref = reference[2][W.MICROBATCH]
    got = numbers[0][f"measure/{case}"]
    assert set(got) == set(ref)
    bad = {k: f"{got[k]!r} vs {ref[k]!r} ({_rel(got[k], ref[k]):.1e})" for k in ref
           if _rel(got[k], ref[k]) > MEASURE_REL_TOL}
    assert not bad, f"{case}: {len(bad)} numbers differ from one process: {bad}"
    assert numbers[1][f"measure/{case}"] == got                       # every rank has the whole result
    assert all(v != 0 for k, v in ref.items() if k.endswith("se"))    # error bars really compared


@pytest.mark.parametrize("case", ["packed", "end_to_end"])
def test_packed_and_end_to_end_agree_to_round_off(torchrun, reference, case):
    """Packed microbatches (shards pack other rows together) and the distributed v (last bits differ):
    every number within MEASURE_REL_TOL or within what float64 round-off of ΔĤ can move it by."""
    numbers, _ = torchrun
    ref = reference[2][W.PACKED_MICROBATCH]
    got = numbers[0][f"measure/{case}"]
    bad = {k: f"{got[k]!r} vs {ref[k]!r} ({abs(got[k] - ref[k]):.1e} > {_round_off(k):.1e})" for k in ref
           if abs(got[k] - ref[k]) > max(MEASURE_REL_TOL * abs(ref[k]), _round_off(k))}
    assert not bad, f"{case}: {bad}"
    assert numbers[1][f"measure/{case}"] == got


def test_sampled_shards_are_reproducible_per_rank(torchrun):
    """The union of the ranks' samples is each rank's sample_E with rank_seed, redrawn here alone."""
    numbers, tensors = torchrun
    proc, examples = W.sampling_setup()
    rows = []
    for r in range(WORLD):
        n_r = len(D.shard_rows(W.SAMPLE_B_E, r, WORLD))
        alone = proc.sample_E(examples, n_r, seed=D.rank_seed(W.SAMPLE_SEED, r))
        assert numbers[r]["sample"] == {"n": W.SAMPLE_B_E, "rank_seed": D.rank_seed(W.SAMPLE_SEED, r)}
        assert torch.equal(tensors[r]["sample/input_ids"], alone.input_ids), f"rank {r}"
        rows += tensors[r]["sample/index"].tolist()
    assert rows == list(range(W.SAMPLE_B_E))
    assert [numbers[r]["broadcast"] for r in range(WORLD)] == ["ΔĤ from rank 0"] * WORLD


def test_run_on_rank0_shares_the_result_or_the_error(torchrun):
    """Rank 0 alone runs the work; the others get its result, or its error instead of waiting forever."""
    numbers, _ = torchrun
    assert [numbers[r]["rank0"] for r in range(WORLD)] == [{"computed_by": 0}] * WORLD
    assert numbers[0]["rank0_error"] == "ZeroDivisionError: division by zero"
    assert numbers[1]["rank0_error"] == "RankZeroError: rank 0 failed: ZeroDivisionError: division by zero"
    assert D.run_on_rank0(lambda: 7, encode=int, decode=int) == 7          # one process: just fn()


# ------------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("mode", ["contiguous", "strided"])
def test_shards_partition_the_rows(mode):
    for n in (0, 1, 5, 7, 16):
        for world in (1, 2, 3, 8):
            parts = [D.shard_rows(n, r, world, mode=mode) for r in range(world)]
            assert sorted(torch.cat(parts).tolist()) == list(range(n)), (n, world)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            if mode == "contiguous":
                assert torch.cat(parts).tolist() == list(range(n))
    with pytest.raises(ValueError, match="shard mode"):
        D.shard_rows(4, 0, 2, mode="random")


def test_groups_stay_whole():
    group = torch.tensor([4, 4, 9, 9, 9, 1, 1, 7])
    parts = [D.shard_groups(group, r, 3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(8))
    for p in parts:                       # no group is split between ranks
        assert all(set((group == g).nonzero().flatten().tolist()) <= set(p.tolist()) for g in group[p].tolist())


def test_rank_seed_is_stable_and_distinct():
    assert D.rank_seed(5, 0) == D.rank_seed(5, 0) != D.rank_seed(5, 1) != D.rank_seed(6, 1)
    assert 0 <= D.rank_seed(123, 7) < 2 ** 31


def test_one_process_is_the_plain_library():
    """Without torch.distributed the wrappers are the single-process calls (world of 1)."""
    model, opt = W.model_and_optimizer()
    U, E = W.batches()
    assert D.rank_and_world() == (0, 1)
    v = D.distributed_update_vector(model, opt, U, microbatch_size=W.MICROBATCH).vector
    assert rel_err(v, compute_update_vector(model, opt, U, microbatch_size=W.MICROBATCH).vector) == 0
    full = score_tokens(model, E["input_ids"], E["attention_mask"], E["response_mask"], microbatch_size=2)
    got = D.distributed_score_tokens(model, E, microbatch_size=2)
    assert torch.equal(got.S, full.S) and torch.equal(got.H, full.H) and torch.equal(got.mask, full.mask)
    rows = torch.tensor([3, 0, 6, 1, 5, 2, 4])                            # local mode, any order of rows
    got = D.distributed_score_tokens(model, D.take_rows(E, rows), microbatch_size=2, index=rows)
    torch.testing.assert_close(got.S, full.S, rtol=1e-13, atol=1e-13)


def test_rows_held_twice_or_by_nobody_are_errors():
    x = torch.arange(3.0)
    with pytest.raises(D.ShardError, match=r"missing \[3\]"):
        D.all_gather_rows(x, torch.tensor([0, 1, 2]), 4)
    with pytest.raises(D.ShardError, match=r"held by several ranks \[1\]"):
        D.all_gather_rows(x, torch.tensor([0, 1, 1]), 3)
