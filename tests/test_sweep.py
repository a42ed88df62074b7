"""Tests for flows/sweep.py: a sweep over the checkpoints of a training run, each item a cached `measure` run.

The run: three checkpoints of one tiny Dr.GRPO + AdamW training (tests/pipeline_fixtures.py's model, prompts
and reward; steps 1, 2, 3 from the same init and seed), saved in the HF Trainer layout (checkpoint-N/ with
the adapter files, optimizer.pt and trainer_state.json side by side). The fast tests check the items, the
table and the plot without running Prefect. The slow test runs `python flows/sweep.py` in subprocesses
against one Prefect test server: through a local Ray instance (2 CPUs), again (every item Cached), and
with prefect-ray made unimportable (sequential, said once). Truth: EntropyMeasurements on each item's config
alone, in this process.
"""
import csv
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from entropy_core.checkpoints import CheckpointLayoutError
from entropy_core.config import config_from_dict
from entropy_core.demo import make_demo_checkpoint
from entropy_core.loading import load_peft_for_probe
from entropy_core.measure import EntropyMeasurements
from pipeline_fixtures import build_setup, toy_reward, with_output

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows import sweep as S  # noqa: E402

STEPS = (1, 2, 3)
NUMBERS = ("entropy", "true", "linear", "quadratic", "update")
RESULT_REL_TOL = 1e-9     # float64 measurement in a Ray worker (1 thread) vs this process (2 threads)
FLOW_TIMEOUT_S = 600


def _training_run(setup: dict, root: Path) -> Path:
    """checkpoint-1..3/ of one tiny training run, HF Trainer layout, with trainer_state.json."""
    base, prompts = setup["checkpoint"]["base"], setup["data"]["dataset"]
    run = root / "run"
    for k in STEPS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)                                 # the same LoRA init for every k
            model, tok = load_peft_for_probe(base, new_adapter={"r": 4, "lora_alpha": 8,
                                                               "target_modules": ["q_proj", "v_proj"]}, device="cpu")
        out = make_demo_checkpoint(root / f"demo{k}", steps=k, seed=0, lr=1e-2, B_U=2, G=2, max_new_tokens=8,
                                   dataset=prompts, split="train", reward=toy_reward,
                                   model_and_tokenizer=(model, tok), log=lambda msg: None)
        folder = run / f"checkpoint-{k}"
        shutil.copytree(out / "adapter", folder)
        shutil.copy(out / "optimizer.pt", folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": k, "log_history": [{"step": k, "learning_rate": 1e-2, "loss": 0.0}]}))
    return run


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """(config dict of pipeline_fixtures, the run's output_dir): real checkpoints, for the end-to-end tests."""
    root = tmp_path_factory.mktemp("sweep")
    setup = build_setup(root / "setup")
    setup["precision"] = {"runtime_dtype": "float64"}
    setup["estimator"]["quadratic"] = False               # the nested JVP is most of a tiny measurement's time
    return setup, _training_run(setup, root)


@pytest.fixture
def layout(tmp_path):
    """(config dict, run dir) with the Trainer layout's file NAMES only (nothing is read to list items)."""
    run = tmp_path / "run"
    for k in STEPS:
        folder = run / f"checkpoint-{k}"
        folder.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
            (folder / name).write_bytes(b"")
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": k, "log_history": [{"step": k, "learning_rate": 1e-2}]}))
    setup = {"seed": 0, "device": "cpu", "checkpoint": {"base": str(tmp_path / "base"), "adapter": "a",
                                                         "optimizer": "a/optimizer.pt"},
             "batches": {"B_E": 8, "B_U": 2, "G": 2}, "estimator": {"eta_list": [1e-3, 2e-3]}}
    return setup, run


def _cfg(setup, output_dir):
    return config_from_dict(with_output(setup, output_dir))


# ------------------------------------------------------------------------------------------------ items
def test_items_are_the_run_checkpoints_in_step_order(layout, tmp_path):
    setup, run = layout
    cfg = _cfg(setup, tmp_path / "m")
    items = S.sweep_items(cfg, S.SweepConfig(run_dir=str(run)))
    assert [(it.label, it.step, it.seed) for it in items] == [("step_1", 1, 0), ("step_2", 2, 0), ("step_3", 3, 0)]
    for it in items:
        folder = str(run / f"checkpoint-{it.step}")
        assert (it.cfg.checkpoint.dir, it.cfg.checkpoint.adapter) == (folder, folder)
        assert it.cfg.output_dir == str(tmp_path / "m" / "sweep" / it.label)
        assert it.info["learning_rate"] == 1e-2
        assert it.cfg.model_dump(exclude={"checkpoint", "output_dir"}) == cfg.model_dump(exclude={"checkpoint",
                                                                                                   "output_dir"})
    crossed = S.sweep_items(cfg, S.SweepConfig(run_dir=str(run), seeds=[4, 5], output_dir=str(tmp_path / "s")))
    assert [it.label for it in crossed][:3] == ["step_1-seed_4", "step_1-seed_5", "step_2-seed_4"]
    assert [it.cfg.seed for it in crossed] == [4, 5] * 3
    seeds_only = S.sweep_items(cfg, S.SweepConfig(seeds=[7, 8]))
    assert [it.label for it in seeds_only] == ["seed_7", "seed_8"]
    assert seeds_only[0].cfg.checkpoint == cfg.checkpoint


def test_unusable_folders_are_named_before_anything_runs(layout, tmp_path):
    setup, run = layout
    cfg = _cfg(setup, tmp_path / "m")
    (run / "checkpoint-2" / "optimizer.pt").unlink()
    (run / "checkpoint-3" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        S.sweep_items(cfg, S.SweepConfig(run_dir=str(run)))
    assert "2 checkpoint folder(s)" in str(e.value)
    assert f"no optimizer.pt in {run / 'checkpoint-2'}" in str(e.value)
    assert f"adapter_config.json missing in {run / 'checkpoint-3'}" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint-N/"):
        S.sweep_items(cfg, S.SweepConfig(run_dir=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="nothing to sweep"):
        S.sweep_items(cfg, S.SweepConfig())
    assert issubclass(CheckpointLayoutError, FileNotFoundError)


def _needs_ray():
    pytest.importorskip("prefect_ray", reason='Ray is optional: pip install -e ".[ray]"')


def test_ray_runner_options():
    _needs_ray()
    runner = S.make_task_runner(S.SweepConfig(ray_num_cpus=2))
    assert type(runner).__name__ == "RayTaskRunner" and runner.init_kwargs["num_cpus"] == 2
    assert runner.init_kwargs["runtime_env"]["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    cluster = S.make_task_runner(S.SweepConfig(ray_address="ray://head:10001", ray_num_cpus=2))
    assert cluster.address == "ray://head:10001" and "num_cpus" not in cluster.init_kwargs
    assert "PREFECT_HOME" not in cluster.init_kwargs["runtime_env"]["env_vars"]     # this machine's only


def test_runner_without_ray(monkeypatch):
    assert S.make_task_runner(S.SweepConfig(ray="off")) is None
    monkeypatch.setitem(sys.modules, "prefect_ray", None)             # as if not installed
    assert S.make_task_runner(S.SweepConfig()) is None
    assert "not installed" in S._sequential_note(S.SweepConfig())
    with pytest.raises(ImportError, match=r"pip install -e \".\[ray\]\""):
        S.make_task_runner(S.SweepConfig(ray="on"))


def _fake_results(k: int) -> dict:
    return {"entropy": {"H_base": 4.0 + k, "H_base_se": 0.1, "sequences": 8, "tokens": 60},
            "true": [{"eta": 1e-3, "delta_h": 1e-4 * k, "se": 1e-5, "ess": 7.5},
                     {"eta": 2e-3, "delta_h": 2e-4 * k, "se": 2e-5, "ess": 7.0}],
            "linear": {"slope_exact": 0.1 * k, "slope_exact_se": 0.01, "slope_vr": 0.1, "slope_vr_se": 0.005,
                       "slope_fd": 0.1 * k},
            "quadratic": {"curvature": -1.0, "curvature_se": 0.3}}


def test_table_and_plot(tmp_path):
    items = [S.SweepItem(label=f"step_{k}", step=k, seed=0, checkpoint=f"c{k}", cfg=None,
                         info={"learning_rate": 1e-2}) for k in STEPS]
    rows = [S.row_from_results(it, _fake_results(it.step), state="Completed", results_path=f"r{it.step}")
            for it in items]
    path = S.write_table(rows, tmp_path / "sweep.csv")
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["label"] for r in back] == ["step_1", "step_2", "step_3"]
    assert float(back[2]["delta_h@0.002"]) == rows[2]["delta_h@0.002"] == 3 * 2e-4     # repr: exact round trip
    assert float(back[0]["ess@0.001"]) == 7.5
    assert float(back[1]["slope_exact"]) == 0.2 and back[0]["learning_rate"] == "0.01"
    for rs in (rows, [dict(r, step=None) for r in rows]):              # x = steps, or labels
        assert S.plot_png(rs).startswith(b"\x89PNG\r\n\x1a\n")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def api_url():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _run_sweep(api_url, config: Path, *args: str, block_ray: Path | None = None) -> tuple[dict, str]:
    """`python flows/sweep.py`; returns (sweep.json, combined output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    paths = ([str(block_ray)] if block_ray else []) + [str(ROOT / "tests"), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), PREFECT_API_URL=api_url, HF_HUB_OFFLINE="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", RAY_AUTH_MODE="disabled")
    p = subprocess.run([sys.executable, str(ROOT / "flows" / "sweep.py"), "--config", str(config), *args],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=FLOW_TIMEOUT_S)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"sweep failed ({p.returncode}):\n{out[-8000:]}"
    table = Path(p.stdout.strip().splitlines()[-1])
    return json.loads((table.parent / S.JSON_NAME).read_text()), out


def _close(a, b, path=""):
    if isinstance(b, dict):
        assert set(a) == set(b), path
        for k in b:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(b, float) and math.isfinite(b):
        assert a == pytest.approx(b, rel=RESULT_REL_TOL, abs=1e-15), f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _measure_run_spans(api_url: str, since: datetime.datetime) -> list[tuple[datetime.datetime, datetime.datetime]]:
    """(start, end) of every completed `entropy-measure` flow run that started after `since`, sorted."""
    import httpx
    runs = httpx.post(f"{api_url}/flow_runs/filter", json={"flows": {"name": {"any_": ["entropy-measure"]}},
                                                          "limit": 200}).json()
    spans = [(datetime.datetime.fromisoformat(r["start_time"]), datetime.datetime.fromisoformat(r["end_time"]))
             for r in runs if r["state_type"] == "COMPLETED" and r["start_time"] and r["end_time"]]
    return sorted(sp for sp in spans if sp[0] >= since)


def _alone(setup, item_cfg, output_dir) -> dict:
    cfg = item_cfg.model_copy(update={"output_dir": str(output_dir)})
    return json.loads(EntropyMeasurements(cfg).run().read_text())


@pytest.mark.slow
def test_sweep_through_ray_equals_each_checkpoint_alone_and_reruns_from_cache(training, api_url, tmp_path):
    _needs_ray()
    setup, run = training
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(with_output(setup, tmp_path / "m")))
    ray_args = ("--run-dir", str(run), "--ray", "on", "--ray-num-cpus", "2")
    t0 = datetime.datetime.now(datetime.timezone.utc)
    first, out = _run_sweep(api_url, config, *ray_args)
    assert "through Ray" in out
    spans = _measure_run_spans(api_url, since=t0)                     # the three `entropy-measure` subflows
    assert len(spans) == 3 and any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans   # two at once
    rows = first["rows"]
    assert [(r["label"], r["step"], r["state"]) for r in rows] == [(f"step_{k}", k, "Completed") for k in STEPS]
    items = S.sweep_items(config_from_dict(with_output(setup, tmp_path / "m")), S.SweepConfig(run_dir=str(run)))
    for row, it in zip(rows, items):
        got = json.loads(Path(row["results"]).read_text())
        assert got["config"]["checkpoint"]["dir"] == str(run / f"checkpoint-{it.step}")
        alone = _alone(setup, it.cfg, tmp_path / "alone" / it.label)
        _close({k: got[k] for k in NUMBERS}, {k: alone[k] for k in NUMBERS}, it.label)
        assert row["slope_exact"] == got["linear"]["slope_exact"]
    assert len({r["H_base"] for r in rows}) == 3                         # three different policies
    table = Path(rows[0]["results"]).parents[1]
    assert (table / S.PLOT_NAME).read_bytes().startswith(b"\x89PNG")
    # rerun: every item from the cache, same table
    again, _ = _run_sweep(api_url, config, *ray_args)
    assert [r["state"] for r in again["rows"]] == ["Cached"] * 3
    assert [{k: v for k, v in r.items() if k != "state"} for r in again["rows"]] == \
           [{k: v for k, v in r.items() if k != "state"} for r in rows]


@pytest.mark.slow
def test_sweep_without_ray_runs_sequentially_and_says_so_once(training, api_url, tmp_path):
    setup, run = training
    block = tmp_path / "block"
    (block / "prefect_ray").mkdir(parents=True)
    (block / "prefect_ray" / "__init__.py").write_text("raise ModuleNotFoundError('prefect_ray hidden by the test')\n")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(with_output(setup, tmp_path / "m")))
    result, out = _run_sweep(api_url, config, "--checkpoints", str(run / "checkpoint-2"), "--seeds", "1",
                             block_ray=block)
    assert out.count("ray / prefect-ray are not installed") == 1, out[-4000:]
    (row,) = result["rows"]
    assert (row["label"], row["step"], row["seed"], row["state"]) == ("step_2-seed_1", 2, 1, "Completed")
    (it,) = S.sweep_items(config_from_dict(with_output(setup, tmp_path / "m")),
                          S.SweepConfig(checkpoints=[str(run / "checkpoint-2")], seeds=[1]))
    got = json.loads(Path(row["results"]).read_text())
    _close({k: got[k] for k in NUMBERS}, {k: _alone(setup, it.cfg, tmp_path / "alone")[k] for k in NUMBERS})
