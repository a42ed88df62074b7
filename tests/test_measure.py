"""Tests for entropy_core/measure.py (EntropyMeasurements), entropy_core/stages.py and entropy_core/report.py
on a tiny local checkpoint (tests/pipeline_fixtures.py), without Prefect.

Truth here is structural and by independent recomputation: results.json holds every documented key
with finite numbers, its token and sequence counts equal those of the E artifact, a rerun reuses every
stage and reproduces the numbers bit for bit, a CUDA OOM (injected) halves the microbatch without
changing the scores, and a failing stage leaves no results.json.
"""
import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

from entropy_core import stages
from entropy_core.artifacts import ArtifactRef, hash_file, load_artifact
from entropy_core.config import config_from_dict
from entropy_core.measure import EntropyMeasurements
from entropy_core.precision import _rmsnorm_forward_in_dtype
from pipeline_fixtures import ETAS, build_setup, with_output

B_E = 8
REQUIRED = {
    "entropy": {"H_base", "H_base_se", "tokens", "sequences"},
    "linear": {"slope_exact", "slope_exact_se", "slope_fd", "slope_vr", "slope_vr_se", "slope_fd_se", "fd_step"},
    "quadratic": {"curvature", "curvature_se", "curvature_fd"},
    "update": {"norm", "num_tensors", "loss"},
    "artifacts": {"E", "U", "update_vector", "theta", "eta", "linear", "estimates", "per_sequence_csv", "plot"},
}
TRUE_KEYS = {"eta", "delta_h", "se", "ess", "logw_min", "logw_max", "H_eta", "logw_median", "clip_fraction"}
NUMBERS = ("entropy", "true", "linear", "quadratic", "update")
# v ≈ m/√s normalises g to O(1) per element, so float32 round-off of the per-microbatch gradients
# (~1e-7 relative) shows in v as ~1e-6 absolute when the microbatch changes.
V_ATOL_FP32_MICROBATCH = 2e-5
# Length bucketing packs each microbatch to its own width, so a different microbatch size changes
# float32 reductions at round-off level (seen: 5e-9 relative); issue 6 allows 1e-6.
FP32_REPACK_RTOL, FP32_REPACK_ATOL = 1e-6, 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("setup"))


@pytest.fixture(scope="module")
def first_run(setup, tmp_path_factory):
    """One complete run; returns (config, results dict)."""
    cfg = config_from_dict(with_output(setup, tmp_path_factory.mktemp("measure") / "run"))
    path = EntropyMeasurements(cfg).run()
    return cfg, json.loads(path.read_text())


def _leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def test_results_have_every_key_with_finite_numbers(first_run):
    cfg, r = first_run
    for section, keys in REQUIRED.items():
        assert keys <= set(r[section]), f"{section} lacks {sorted(keys - set(r[section]))}"
    assert {"config", "versions", "timing", "run"} <= set(r)
    assert [p["eta"] for p in r["true"]] == ETAS
    for p in r["true"]:
        assert TRUE_KEYS <= set(p), sorted(TRUE_KEYS - set(p))
    for path, value in _leaves({k: r[k] for k in NUMBERS}):
        if isinstance(value, float):
            assert math.isfinite(value), f"{path} = {value}"
    assert r["config"] == cfg.model_dump(mode="json")
    stage_names = {"checkpoint", "sample_E", "sample_U", "update_vector", "evaluate_theta", "linear", "estimate",
                   *(f"evaluate_eta[{eta:g}]" for eta in ETAS)}
    assert set(r["timing"]["stages"]) == stage_names


def test_token_and_sequence_counts_match_the_E_artifact(first_run):
    _, r = first_run
    E = stages.load_batch(ArtifactRef(kind="E", sha256=_sha_of(r["artifacts"]["E"]), path=r["artifacts"]["E"]))
    assert r["entropy"]["sequences"] == len(E) == B_E
    assert r["entropy"]["tokens"] == int(E.response_mask.sum()) > 0
    # Ĥ(θ) recomputed from the θ scores: Σ_i H_i / Σ_i T_i (DESIGN §1.2)
    theta = r["artifacts"]["theta"]
    t, _ = load_artifact(ArtifactRef(kind="scores", sha256=_sha_of(theta), path=theta))
    assert r["entropy"]["H_base"] == pytest.approx(float(t["H"].sum() / t["mask"].sum()), rel=1e-12)


def _sha_of(path: str) -> str:
    return hash_file(path)


def test_csv_and_plot_are_written(first_run):
    _, r = first_run
    with open(r["artifacts"]["per_sequence_csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == B_E
    assert {"prompt_index", "T", "S", "H", "response", *(f"logw[eta={eta:g}]" for eta in ETAS)} <= set(rows[0])
    assert sum(int(row["T"]) for row in rows) == r["entropy"]["tokens"]
    with open(r["artifacts"]["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_every_stage_and_reproduces_the_numbers(first_run):
    cfg, r1 = first_run
    r2 = json.loads(EntropyMeasurements(cfg).run().read_text())
    states = {name: s["state"] for name, s in r2["timing"]["stages"].items()}
    assert all(state == "Reused" for name, state in states.items() if name != "checkpoint"), states
    assert {k: r2[k] for k in NUMBERS} == {k: r1[k] for k in NUMBERS}


def test_a_new_eta_grid_reruns_only_its_new_etas_and_the_estimate(first_run):
    """The default finite-difference step is a tenth of the learning rate, not a function of the grid:
    a grid with a new smallest |η| keeps the linear stage (and its h) as they were."""
    cfg, r1 = first_run
    new = cfg.model_copy(update={"estimator": cfg.estimator.model_copy(update={"eta_list": [ETAS[1], ETAS[0] / 4]})})
    r2 = json.loads(EntropyMeasurements(new).run().read_text())
    states = {name: s["state"] for name, s in r2["timing"]["stages"].items()}
    assert states.pop("evaluate_eta[0.00025]") == "Completed" and states.pop("estimate") == "Completed", states
    assert all(state == "Reused" for name, state in states.items() if name != "checkpoint"), states
    assert r2["linear"] == r1["linear"] and r1["linear"]["fd_step"] == pytest.approx(0.1 * r1["update"]["lr"][0])


def test_missing_artifact_is_recomputed(first_run):
    cfg, r1 = first_run
    os.unlink(r1["artifacts"]["theta"])
    r2 = json.loads(EntropyMeasurements(cfg).run().read_text())
    assert r2["timing"]["stages"]["evaluate_theta"]["state"] == "Completed"
    assert r2["timing"]["stages"]["evaluate_eta[0.001]"]["state"] == "Reused"
    assert r2["artifacts"]["theta"] == r1["artifacts"]["theta"]          # same content, same address
    assert {k: r2[k] for k in NUMBERS} == {k: r1[k] for k in NUMBERS}


def test_failed_run_leaves_no_results_json(first_run, monkeypatch):
    cfg, _ = first_run

    def broken(*args, **kwargs):
        raise RuntimeError("estimate failed")
    monkeypatch.setattr(stages, "estimate", broken)
    with pytest.raises(RuntimeError, match="estimate failed"):
        EntropyMeasurements(cfg, reuse=False).run()         # the earlier results.json is removed first
    out = Path(cfg.output_dir)
    assert not (out / "results.json").exists()
    assert not (out / "per_sequence.csv").exists()


def _refs(r):
    def ref(kind, path):
        return ArtifactRef(kind=kind, sha256=_sha_of(path), path=path)
    return ref("E", r["artifacts"]["E"]), ref("U", r["artifacts"]["U"]), ref("scores", r["artifacts"]["theta"])


def test_oom_in_teacher_forcing_halves_the_microbatch(first_run, monkeypatch, tmp_path):
    cfg, r = first_run
    E, _, theta = _refs(r)
    ckpt = stages.resolve_checkpoint(cfg.checkpoint, cfg.data)
    real, seen = stages.score_tokens, []

    def oom_above_2(*args, microbatch_size, **kwargs):
        seen.append(microbatch_size)
        if microbatch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, microbatch_size=microbatch_size, **kwargs)
    monkeypatch.setattr(stages, "score_tokens", oom_above_2)
    ref = stages.score(ckpt, E, None, eta=0.0, temperature=1.0, microbatch_size=8, dtype="float32", device="cpu",
                       root=tmp_path)
    tensors, meta = load_artifact(ref)
    assert meta["microbatch_used"] == 2 and seen[:3] == [8, 4, 2]
    expected, _ = load_artifact(theta)
    for k in ("S", "H", "mask"):      # other microbatches pack other widths: float32 round-off, no more
        torch.testing.assert_close(tensors[k], expected[k], rtol=FP32_REPACK_RTOL, atol=FP32_REPACK_ATOL,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_auto_microbatching_reproduces_the_row_capped_run(first_run, tmp_path):
    """`microbatch_size: auto` (a token budget; on CPU 1024 tokens) in every stage: the same numbers up to
    the float32 round-off of packing other widths."""
    cfg, r1 = first_run
    auto = cfg.model_copy(update={"output_dir": str(tmp_path / "run"),
                                  "estimator": cfg.estimator.model_copy(update={"microbatch_size": "auto"}),
                                  "update": cfg.update.model_copy(update={"microbatch_size": "auto"})})
    r2 = json.loads(EntropyMeasurements(auto).run().read_text())
    assert load_artifact(_refs(r2)[2])[1]["microbatch_used"].startswith("auto (")
    # float32 round-off of other packings: ~1e-7 relative; the finite differences divide it by h (slope,
    # 1e-4) or h² (curvature: not compared); the logq diagnostic is itself round-off.
    rel = {"slope_fd": 1e-4, "slope_fd_se": 1e-4, "curvature_fd": None, "curvature_fd_se": None,
           "proposal_logq_max_abs_diff": None}
    for section in ("entropy", "linear", "quadratic"):
        for k, x in r1[section].items():
            if isinstance(x, float) and rel.get(k, 1e-6) is not None:
                assert r2[section][k] == pytest.approx(x, rel=rel.get(k, 1e-6)), f"{section}.{k}"
    assert [p["delta_h"] for p in r2["true"]] == pytest.approx([p["delta_h"] for p in r1["true"]], rel=1e-4)


def test_oom_in_the_update_pass_halves_the_microbatch(first_run, monkeypatch, tmp_path):
    cfg, r = first_run
    _, U, _ = _refs(r)
    ckpt = stages.resolve_checkpoint(cfg.checkpoint, cfg.data)
    real, seen = stages.compute_update_vector, []

    def oom_above_1(*args, microbatch_size, **kwargs):
        seen.append(microbatch_size)
        if microbatch_size > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, microbatch_size=microbatch_size, **kwargs)
    monkeypatch.setattr(stages, "compute_update_vector", oom_above_1)
    ref = stages.update_vector(ckpt, U, update=cfg.update, temperature=1.0, dtype="float32", device="cpu",
                               root=tmp_path)
    v, meta = load_artifact(ref)
    assert meta["microbatch_used"] == 1 and seen == [4, 2, 1]
    expected, _ = load_artifact(ArtifactRef(kind="update_vector", sha256=_sha_of(r["artifacts"]["update_vector"]),
                                            path=r["artifacts"]["update_vector"]))
    assert set(v) == set(expected)
    for name in v:
        torch.testing.assert_close(v[name], expected[name], rtol=0, atol=V_ATOL_FP32_MICROBATCH,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_oom_at_microbatch_1_is_raised(first_run, monkeypatch, tmp_path):
    cfg, r = first_run
    E, _, _ = _refs(r)
    ckpt = stages.resolve_checkpoint(cfg.checkpoint, cfg.data)

    def always_oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
    monkeypatch.setattr(stages, "score_tokens", always_oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        stages.score(ckpt, E, None, eta=0.0, temperature=1.0, microbatch_size=4, dtype="float32", device="cpu",
                     root=tmp_path)


def test_float64_model_keeps_its_norms_in_float64(first_run):
    cfg, _ = first_run
    ckpt = stages.resolve_checkpoint(cfg.checkpoint, cfg.data)
    try:
        model, _ = stages.get_model(ckpt, dtype="float64", device="cpu")
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        assert norms and all(m.forward.__func__ is _rmsnorm_forward_in_dtype for m in norms)
        assert all(p.dtype == torch.float64 for p in model.parameters())
    finally:
        stages.clear_model_cache()


def test_stage_key_refuses_tensors_and_ignores_paths():
    ref = ArtifactRef(kind="E", sha256="a" * 64, path="/x/E.safetensors")
    moved = ArtifactRef(kind="E", sha256="a" * 64, path="/elsewhere/E.safetensors")
    assert stages.stage_key("s", {"e": ref, "eta": 1e-3}) == stages.stage_key("s", {"e": moved, "eta": 1e-3})
    assert stages.stage_key("s", {"e": ref, "eta": 1e-3}) != stages.stage_key("s", {"e": ref, "eta": 2e-3})
    with pytest.raises(TypeError, match="never tensors or models"):
        stages.stage_key("s", {"v": torch.zeros(3)})
