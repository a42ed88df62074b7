"""The whole pipeline on 2 processes (torchrun, gloo, CPU) equals the one-process run on the same batches.

A tiny float64 checkpoint (pipeline_fixtures) is measured once in this process (EntropyMeasurements,
gpus 1), then on 2 ranks three ways, each a fresh process as a user starts it:
  * `python -m entropy_core.measure --config C` with `gpus: 2`: the launcher starts torchrun itself
    (run_torchrun), the children hand back stage references, the parent writes results.json;
  * `torchrun --standalone --nproc_per_node=2 -m entropy_core.measure --config C`: rank 0 writes it;
  * (slow) `python flows/measure.py --config C` with `gpus: 2`: the Prefect flow's torchrun task.
E and U are sampled by rank 0 with the run's seed, so they are the one-process batches (checked
token for token). Every number of results.json (ΔĤ(η), Ĥ(θ), ESS, log-weights, slopes, curvature and
all their standard errors, the update's stats) agrees to ≤ 1e-10 relative, except the finite-difference
slope and curvature: v is the same float64 gradient summed in another order (all-reduce), so θ+ηv
rounds differently in its last bits, and (ΔĤ(h) ± ΔĤ(−h)) divides that round-off of ΔĤ by 2h or h²
(h = 1e-3, a tenth of the fixtures' lr). Those are held to the round-off floor instead (as in test_distributed.py).

1e-10 relative is finer than ΔĤ's own float64 resolution here (ΔĤ(1e-3) ≈ 2e-6 is a difference of two
Ĥ ≈ 5.7, and one ulp of Ĥ is 4e-10 of ΔĤ), so it holds only when each row's arithmetic is the same in
a shard and in one process: one row per forward and per backward (microbatch_size 1) and one thread
per process. With the fixtures' microbatch of 4, rows are packed into other pairs and ΔĤ, its se and
the ESS agree to ~1e-9 relative instead (measured), i.e. to a few ulps of Ĥ.
The slow tests run the same measurement under a bare torchrun and through the Prefect flow.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from entropy_core.config import ConfigError, config_from_dict, dump_config
from entropy_core.measure import EntropyMeasurements
from pipeline_fixtures import build_setup, flatten, with_output

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-10
DELTA_H_FLOOR = 1e-14              # absolute float64 round-off of one ΔĤ(η) (Ĥ ≈ 5 nats: a few ulps, ×10)
NUMBERS = ("entropy", "true", "linear", "quadratic", "update")
TIMEOUT_S = 300


def raising_reward(response_text: str, gold: str) -> float:
    """A reward that fails when called (not when resolved), so only a torchrun child meets it."""
    raise RuntimeError("reward service unreachable")


def _env() -> dict:
    """tests/ importable in the children (the rewards), OMP at one thread per rank."""
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}


def _config(setup: dict, tmp: Path, name: str, **top) -> Path:
    cfg = with_output(setup, tmp / name, precision={"runtime_dtype": "float64"}, estimator={"microbatch_size": 1},
                      update={"microbatch_size": 1})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, **top}))
    return path


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def _results(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, f"exit {p.returncode}:\n{p.stderr[-6000:]}"
    path = Path(p.stdout.strip().splitlines()[-1])
    assert path.name == "results.json", p.stdout
    return json.loads(path.read_text())


def _tolerance(key: str, ref: float, h: float) -> float:
    if key.startswith("quadratic.curvature_fd"):
        return max(REL_TOL * abs(ref), DELTA_H_FLOOR / h ** 2)
    if key.startswith("linear.slope_fd"):
        return max(REL_TOL * abs(ref), DELTA_H_FLOOR / h)
    return REL_TOL * abs(ref)


def assert_same_measurement(got: dict, ref: dict) -> dict[str, float]:
    """Every number of the two results within tolerance, and the same E and U; returns the relative gaps."""
    a, b = ({k: v for k, v in flatten({k: r[k] for k in NUMBERS}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)} for r in (got, ref))
    assert set(a) == set(b)
    h = ref["linear"]["fd_step"]
    bad = {k: f"{a[k]!r} vs {b[k]!r}" for k in b if abs(a[k] - b[k]) > _tolerance(k, b[k], h)}
    assert not bad, f"{len(bad)} numbers differ from one process: {bad}"
    assert all(b[k] != 0 for k in b if k.endswith("_se") or k.endswith(".se"))     # error bars really compared
    for batch in ("E", "U"):                                                         # the same batches
        ta, tb = (safetensors.torch.load_file(r["artifacts"][batch]) for r in (got, ref))
        assert ta["input_ids"].equal(tb["input_ids"]) and ta["response_mask"].equal(tb["response_mask"]), batch
    return {k: abs(a[k] - b[k]) / abs(b[k]) for k in b if b[k] != 0}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("setup"))


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """results.json of the plain one-process run, on one thread like each rank (OMP_NUM_THREADS=1): a
    matmul's summation order depends on the thread count."""
    cfg = yaml.safe_load(_config(setup, tmp_path_factory.mktemp("one"), "run").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return json.loads(EntropyMeasurements(config_from_dict(cfg)).run().read_text())
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ tests
def test_gpus_2_launches_torchrun_and_matches_one_process(setup, one_process, tmp_path):
    config = _config(setup, tmp_path, "two", gpus=2)
    r = _results(_run([sys.executable, "-m", "entropy_core.measure", "--config", str(config)]))
    gaps = assert_same_measurement(r, one_process)
    assert r["run"]["processes"] == 2 and r["run"]["runner"] == "EntropyMeasurements (torchrun, 2)"
    assert r["config"]["gpus"] == 2 and "gpus" not in one_process["config"]
    assert set(r["timing"]["stages"]) == set(one_process["timing"]["stages"])
    print({k: f"{v:.1e}" for k, v in sorted(gaps.items(), key=lambda kv: -kv[1])[:6]})


@pytest.mark.slow
def test_under_torchrun_rank_0_writes_the_results(setup, one_process, tmp_path):
    config = _config(setup, tmp_path, "torchrun")
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "entropy_core.measure", "--config", str(config)])
    r = _results(p)
    assert_same_measurement(r, one_process)
    assert r["run"]["processes"] == 2 and r["run"]["runner"] == "EntropyMeasurements"
    assert p.stdout.count("results.json") == 1                         # printed by rank 0 only


def test_a_failed_child_is_one_error_line_and_no_results(setup, tmp_path):
    cfg = with_output(setup, tmp_path / "bad", data={"reward": "test_distributed_pipeline:raising_reward"})
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**cfg, "gpus": 2}))
    p = _run([sys.executable, str(ROOT / "flows" / "measure.py"), "--no-prefect", "--config", str(config)])
    assert p.returncode == 1, p.stderr[-4000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the measurement failed: TorchrunError: torchrun --nproc_per_node=2 exited"), last
    assert "reward service unreachable" in last, last
    assert not (tmp_path / "bad" / "results.json").exists()


@pytest.mark.slow
def test_prefect_flow_with_gpus_2_matches_one_process(setup, one_process, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    config = _config(setup, tmp_path, "flow", gpus=2)
    r = _results(_run([sys.executable, str(ROOT / "flows" / "measure.py"), "--config", str(config)]))
    assert_same_measurement(r, one_process)
    assert r["run"]["runner"] == "prefect" and r["run"]["processes"] == 2
    assert r["timing"]["torchrun"]["state"] == "Completed"


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("value", [0, -1, 2.0, "2", True, None])
def test_gpus_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match=r"gpus: must be an integer ≥ 1"):
        config_from_dict({"gpus": value})


def test_gpus_above_1_take_one_gpu_per_rank():
    with pytest.raises(ConfigError, match=r"device: gpus=2 gives each process its own GPU"):
        config_from_dict({"gpus": 2, "device": "cuda:1"})
    assert config_from_dict({"gpus": 2, "device": "cuda"}).gpus == 2


def test_one_gpu_configs_dump_as_before():
    """`gpus` appears in a dumped config only above 1, so existing manifests and cache keys stay valid."""
    assert "gpus" not in dump_config(config_from_dict({}))
    assert config_from_dict(dump_config(config_from_dict({"gpus": 3}))).gpus == 3
