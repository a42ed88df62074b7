"""ΔH(η) along a training run, or over seeds: each item is its own cached run of the `measure` flow.

    python flows/sweep.py --config configs/qwen2_5_1_5b.yaml --run-dir train_out/   # every checkpoint-N/ of a run
    python flows/sweep.py --config configs/demo.yaml --seeds 0 1 2 3                # one checkpoint, four seeds
    python flows/sweep.py --config c.yaml --checkpoints out/checkpoint-100 out/checkpoint-200 --seeds 0 1
    python flows/sweep.py ... --ray-address auto      # an existing Ray cluster (`ray start --head` first)
    python flows/sweep.py ... --ray off               # one after another in this process

Items are (checkpoint folder × seed): the folders of `--run-dir` (`checkpoint-N/` or `step_N/`, in step
order, entropy_core.checkpoints.list_run_checkpoints) or `--checkpoints`, else the config's own
checkpoint; the seeds of `--seeds`, else the config's seed. Every folder is checked on disk before
anything runs (each missing adapter file or optimizer.pt is named). Each item gets the config with
checkpoint.dir (or adapter + optimizer), seed and output_dir = <sweep dir>/<label> replaced, and is
measured by the `measure` flow of flows/measure.py, called as a subflow from one task per item:

* the task is cached on the item's whole config, the checkpoint files' sizes and mtimes, and the code
  (entropy_core, tasks/, flows/): a rerun of the same sweep is served from the cache (state Cached)
  without starting a measurement; an added checkpoint is the only one measured;
* with Ray and prefect-ray installed (`pip install -e ".[ray]"`) the tasks run in a subflow
  (`entropy-sweep-ray`) whose task runner is a RayTaskRunner, one GPU per measurement when the cluster
  has GPUs (Ray sets CUDA_VISIBLE_DEVICES), else one CPU; without them the items run one after another
  in this process, and the sweep says so once. `sweep(cfg, spec)` decides this from `spec` itself, so
  a deployment's parameter form (MeasureConfig + SweepConfig) controls it too.

Outputs in the sweep directory (default <config output_dir>/sweep): sweep.csv (one row per item: ΔĤ(η)
and se per η, Ĥ(θ), the exact / variance-reduced slopes, curvature, ESS per η, state, results path),
sweep.png (ΔĤ per step, the linear slope and the ESS across the run) and sweep.json; the table and the
plot are also Prefect artifacts. The last line printed is the path of sweep.csv.

Ray workers report to the Prefect API in PREFECT_API_URL, passed on to them. Without one, a local
instance's workers use this process's temporary server; for a cluster run `prefect server start` where
every node can reach it and export PREFECT_API_URL (else each worker starts a temporary server of its
own). On a cluster, every node needs this repository and its environment at the same path, and the
sweep directory on shared storage.
"""
# No `from __future__ import annotations`: Prefect reads the flow's real parameter annotations.
import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "entropy_core")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:              # `tasks` and `flows` are top-level folders of this repository
    sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
import base64  # noqa: E402
import csv  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Literal  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from entropy_core import report, stages  # noqa: E402
from entropy_core.artifacts import write_json_atomic  # noqa: E402
from entropy_core.checkpoints import list_run_checkpoints, resolve_trainer_checkpoint  # noqa: E402
from entropy_core.config import ConfigError, MeasureConfig, config_from_dict, dump_config, load_config  # noqa: E402
from flows.measure import DEFAULT_CONFIG, measure  # noqa: E402
from tasks.common import stage_cache_key  # noqa: E402

TABLE_NAME, PLOT_NAME, JSON_NAME = "sweep.csv", "sweep.png", "sweep.json"
_Z95 = 1.959963984540054
RAY_PIP = 'pip install -e ".[ray]"'


class SweepConfig(BaseModel):
    """What to sweep over and where it runs (the measurement itself is the MeasureConfig)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    run_dir: str | None = Field(None, description="A training run's output_dir: every checkpoint-N/ or step_N/ "
                                                  "folder in it is measured, in step order.")
    checkpoints: list[str] = Field(default_factory=list, description="Checkpoint folders to measure (HF Trainer "
                                   "checkpoint-N/ or adapter/ + optimizer.pt); with run_dir, added to its folders.")
    seeds: list[int] = Field(default_factory=list, description="Seeds for E and U; every checkpoint is measured "
                                                               "with each. Empty = the config's seed.")
    output_dir: str | None = Field(None, description="Sweep directory (table, plot, one folder per item); "
                                                     "null = <config output_dir>/sweep.")
    ray: Literal["auto", "on", "off"] = Field("auto", description="auto: Ray when ray and prefect-ray are "
                                              "installed, else sequential; on: Ray or fail; off: sequential.")
    ray_address: str | None = Field(None, description="Ray cluster to use ('auto', 'ray://head:10001'); null = "
                                                      "a local instance started for this sweep.")
    ray_num_cpus: int | None = Field(None, gt=0, description="CPUs of the local Ray instance; null = all.")
    gpus_per_measurement: float = Field(1.0, ge=0, description="GPUs Ray reserves per measurement when the "
                                                               "cluster has GPUs (0 = run on CPU).")
    cpus_per_measurement: float = Field(1.0, gt=0, description="CPUs Ray reserves per measurement.")


@dataclass
class SweepItem:
    """One measurement of the sweep: its label, where it came from, and its full config."""
    label: str
    step: int | None
    seed: int
    checkpoint: str | None
    cfg: MeasureConfig
    info: dict = field(default_factory=dict)       # resolve_trainer_checkpoint's info (step, learning rates)


# ------------------------------------------------------------------------------------------------ items
def sweep_dir(cfg: MeasureConfig, spec: SweepConfig) -> Path:
    return Path(spec.output_dir or Path(cfg.output_dir) / "sweep").expanduser().resolve()


def _checkpoint_section(base: MeasureConfig, folder: str) -> tuple[dict, dict]:
    """The checkpoint section measuring `folder` (checkpoint.dir for the Trainer layout, explicit paths
    otherwise) and the folder's info; raises CheckpointLayoutError naming what is missing."""
    adapter, optimizer, info = resolve_trainer_checkpoint(folder)
    section = base.checkpoint.model_dump(mode="json")
    if info["layout"] == "trainer":
        section.update(dir=str(Path(folder).expanduser().resolve()), adapter=None, optimizer=None)
    else:
        section.update(dir=None, adapter=str(adapter), optimizer=str(optimizer))
    return section, info


def sweep_items(cfg: MeasureConfig, spec: SweepConfig) -> list[SweepItem]:
    """Every (checkpoint, seed) of the sweep with its validated MeasureConfig, checked on disk.

    Raises: ValueError when the sweep has nothing to measure or two items share a label;
            FileNotFoundError / CheckpointLayoutError naming each unusable folder; ConfigError.
    """
    folders: list[tuple[int | None, str]] = []
    if spec.run_dir is not None:
        found = list_run_checkpoints(spec.run_dir)
        if not found:
            raise ValueError(f"{spec.run_dir} holds no checkpoint-N/ or step_N/ folder; nothing to sweep")
        folders += [(step, str(p)) for step, p in found]
    folders += [(None, str(Path(c).expanduser().resolve())) for c in spec.checkpoints]
    seeds = spec.seeds or [cfg.seed]
    if not folders and not spec.seeds:
        raise ValueError("nothing to sweep: give run_dir, checkpoints or seeds")
    root, base, items, problems = sweep_dir(cfg, spec), dump_config(cfg), [], []
    for step, folder in folders or [(None, None)]:
        section, info = base["checkpoint"], {}
        if folder is not None:
            try:
                section, info = _checkpoint_section(cfg, folder)
            except FileNotFoundError as e:
                problems.append(str(e))
                continue
            step = info["step"] if info["step"] is not None else step
        for seed in seeds:
            parts = ([f"step_{step}" if step is not None else Path(folder).name] if folder else []) + \
                    ([f"seed_{seed}"] if spec.seeds else [])
            label = "-".join(parts)
            data = {**base, "checkpoint": section, "seed": seed, "output_dir": str(root / label)}
            items.append(SweepItem(label=label, step=step, seed=seed, checkpoint=folder,
                                   cfg=config_from_dict(data, source=f"sweep item {label}"), info=info))
    if problems:
        raise FileNotFoundError(f"{len(problems)} checkpoint folder(s) cannot be measured:\n" + "\n".join(problems))
    labels = [it.label for it in items]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"several sweep items share the labels {dupes}; list each checkpoint once")
    return items


# ------------------------------------------------------------------------------------------------ table, plot
def row_from_results(item: SweepItem, results: dict, *, state: str, results_path: str) -> dict[str, Any]:
    """One table row: the item, Ĥ(θ), ΔĤ ± se and ESS per η, slopes, curvature and the learning rates."""
    lin, quad, e = results.get("linear") or {}, results.get("quadratic") or {}, results["entropy"]
    row = {"label": item.label, "step": item.step, "seed": item.seed, "state": state,
           "H_base": e["H_base"], "H_base_se": e["H_base_se"], "sequences": e["sequences"], "tokens": e["tokens"],
           "slope_exact": lin.get("slope_exact"), "slope_exact_se": lin.get("slope_exact_se"),
           "slope_vr": lin.get("slope_vr"), "slope_vr_se": lin.get("slope_vr_se"), "slope_fd": lin.get("slope_fd"),
           "curvature": quad.get("curvature"), "curvature_se": quad.get("curvature_se"),
           "ess_min": min(p["ess"] for p in results["true"]),
           "learning_rate": item.info.get("learning_rate"), "next_learning_rate": item.info.get("next_learning_rate")}
    for p in results["true"]:
        eta = f"{p['eta']:g}"
        row.update({f"delta_h@{eta}": p["delta_h"], f"delta_h_se@{eta}": p["se"], f"ess@{eta}": p["ess"]})
    row.update(checkpoint=item.checkpoint, results=results_path)
    return row


def write_table(rows: list[dict], path: Path) -> Path:
    """sweep.csv: every column of every row (floats with repr, so they read back exactly)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)
    return path


def _etas(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k.split("@", 1)[1] for r in rows for k in r if k.startswith("delta_h@")))


def plot_png(rows: list[dict], *, dpi: int = 100) -> bytes:
    """Three panels across the sweep: ΔĤ(η) ± 1.96 se per η, the exact (and variance-reduced) slope
    ΔĤ'(0) ± 1.96 se, and the ESS per η. x = checkpoint step when every item has one and seeds do not
    repeat a step, else the item's position (labels as ticks)."""
    import matplotlib
    matplotlib.use("Agg")                       # no display; safe in worker threads and on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in rows]
    by_step = None not in steps and len(set(steps)) == len(steps)
    x = steps if by_step else list(range(len(rows)))
    fig, axes = plt.subplots(3, 1, figsize=(6.0, 7.0), dpi=dpi, sharex=True)
    try:
        ax = axes[0]
        for j, eta in enumerate(_etas(rows)):
            ax.errorbar(x, [r.get(f"delta_h@{eta}") for r in rows], fmt="o-", color=f"C{j}", capsize=3,
                        yerr=[_Z95 * (r.get(f"delta_h_se@{eta}") or 0.0) for r in rows], label=f"η = {eta}")
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.set_ylabel("ΔĤ(η) (nats / token)")
        ax.set_title("bars: ± 1.96 jackknife se", fontsize=8)
        ax.legend(fontsize=7)
        ax = axes[1]
        for key, style, color in (("slope_exact", "o-", "k"), ("slope_vr", "s--", "C3")):
            if any(r.get(key) is not None for r in rows):
                ax.errorbar(x, [r.get(key) if r.get(key) is not None else math.nan for r in rows], fmt=style,
                            color=color, capsize=3, label=key,
                            yerr=[_Z95 * (r.get(f"{key}_se") or 0.0) for r in rows])
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.set_ylabel("ΔĤ'(0)")
        ax.legend(fontsize=7)
        ax = axes[2]
        for j, eta in enumerate(_etas(rows)):
            ax.plot(x, [r.get(f"ess@{eta}") for r in rows], "o-", color=f"C{j}", label=f"η = {eta}")
        B_E = max(r["sequences"] for r in rows)
        ax.axhline(B_E, color="0.7", lw=0.8, ls=":", label="B_E")
        ax.set_ylabel("ESS (sequences)")
        ax.set_ylim(0, 1.08 * B_E)
        ax.legend(fontsize=7)
        if by_step:
            ax.set_xlabel("checkpoint step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right", fontsize=7)
        for a in axes:
            a.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        return report.figure_png(fig)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ tasks, flow
def _code_salt() -> str:
    h = hashlib.sha256()
    for p in (Path(__file__).resolve(), _ROOT / "flows" / "measure.py"):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _item_key_extra(parameters: dict) -> dict:
    # the checkpoint files (sizes + mtimes, nothing read) and the flows' source: an edited optimizer.pt or a
    # changed flow misses the cache; entropy_core and tasks/ are in stage_key already
    cfg = parameters["cfg"]
    return {"files": stages.checkpoint_fingerprint(cfg.checkpoint, cfg.data), "flows": _code_salt()}


@task(name="measure-item", persist_result=True, result_serializer="json",
      cache_key_fn=stage_cache_key("sweep_item", extra=_item_key_extra))
def measure_item(cfg: MeasureConfig, label: str) -> str:
    """Run the `measure` flow for one sweep item (a subflow run); returns the path of its results.json.
    A cached result whose results.json is gone is recomputed (tasks.common drops the stale record)."""
    get_run_logger().info(f"{label}: measuring into {cfg.output_dir}")
    return str(measure(cfg))


def _ray_runner():
    """prefect-ray's RayTaskRunner class, or None when ray / prefect-ray cannot be imported."""
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        return None
    return RayTaskRunner


def make_task_runner(spec: SweepConfig):
    """A RayTaskRunner for spec.ray auto / on when prefect-ray imports, else None: the items then run one
    after another in the flow's process (the flow says why, once).
    Raises: ImportError for ray: on without prefect-ray installed."""
    runner = None if spec.ray == "off" else _ray_runner()
    if runner is None:
        if spec.ray == "on":
            raise ImportError(f"ray: on, but ray / prefect-ray cannot be imported; install them with: {RAY_PIP}")
        return None
    local = spec.ray_address is None
    init = {"include_dashboard": False, "runtime_env": {"env_vars": _worker_env(local)}}
    if local and spec.ray_num_cpus is not None:
        init["num_cpus"] = spec.ray_num_cpus
    return runner(address=spec.ray_address, init_kwargs=init)


def _sequential_note(spec: SweepConfig) -> str:
    if spec.ray == "off":
        return "ray: off, so the items run one after another in this process"
    return (f"ray / prefect-ray are not installed, so the items run one after another in this process "
            f"({RAY_PIP} to fan them out, one GPU per measurement)")


def _worker_env(local: bool) -> dict[str, str]:
    # what a worker needs to import this repository and reach the same Prefect API (PREFECT_HOME and the model
    # cache only make sense on this machine)
    keep = ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "HF_HUB_OFFLINE",
            "PREFECT_LOGGING_EXTRA_LOGGERS") + (("PREFECT_HOME", "ENTROPY_CORE_CACHE") if local else ())
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(_ROOT), os.environ.get("PYTHONPATH", "")] if p)
    return env


def _share_api_server_with_local_workers() -> None:
    """Without PREFECT_API_URL every process starts its own temporary Prefect server (~5-10 s each). Start
    this process's one now and export its URL, so local Ray workers (which inherit it through
    `_worker_env`) report to it: one server, every measurement in one run graph."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()          # the same instance this process's flow run will use
    server.start()                           # stopped at exit (atexit), as Prefect's own ephemeral start
    os.environ["PREFECT_API_URL"] = server.api_url


def _outcome(state) -> dict[str, Any]:
    # plain dicts, not State objects: a flow that returns states takes its own final state from them
    done = state.is_completed()
    return {"state": state.name, "completed": done, "path": state.result() if done else None,
            "message": None if done else (state.message or state.name)}


@flow(name="entropy-sweep-ray")
def through_ray(cfgs: list[MeasureConfig], labels: list[str], result_storage: str, gpus_per_measurement: float,
                cpus_per_measurement: float) -> list[dict]:
    """The items as Ray tasks (run with a RayTaskRunner, see `make_task_runner`): one GPU each when the
    cluster has GPUs (Ray sets CUDA_VISIBLE_DEVICES), else CPUs only. Returns one outcome per item."""
    import ray
    from prefect_ray.context import remote_options

    gpus = gpus_per_measurement if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    get_run_logger().info(f"{len(cfgs)} measurements through Ray, {gpus:g} GPU and {cpus_per_measurement:g} CPU "
                          "each")
    item_task = measure_item.with_options(result_storage=Path(result_storage))
    with remote_options(num_gpus=gpus, num_cpus=cpus_per_measurement):
        futures = [item_task.submit(cfg=cfg, label=label) for cfg, label in zip(cfgs, labels)]
    for f in futures:
        f.wait()
    return [_outcome(f.state) for f in futures]


@flow(name="entropy-sweep")
def sweep(cfg: MeasureConfig = MeasureConfig(), spec: SweepConfig = SweepConfig()) -> str:
    """Measure every item of the sweep (each a cached `measure` subflow); returns the path of sweep.csv.

    Through Ray (a subflow with a RayTaskRunner) when spec.ray allows it and prefect-ray imports, else one
    item after another in this process. Raises RuntimeError naming every failed item (after writing the
    table of the others); ImportError for spec.ray = "on" without prefect-ray.
    """
    logger = get_run_logger()
    items = sweep_items(cfg, spec)
    root = sweep_dir(cfg, spec)
    root.mkdir(parents=True, exist_ok=True)
    storage = root / ".prefect" / "results"
    if spec.ray != "off" and spec.ray_address is None and _ray_runner() is not None:
        _share_api_server_with_local_workers()
    runner = make_task_runner(spec)
    if runner is not None:
        outcomes = through_ray.with_options(task_runner=runner)(
            [it.cfg for it in items], [it.label for it in items], str(storage), spec.gpus_per_measurement,
            spec.cpus_per_measurement)
    else:
        logger.warning(f"{len(items)} measurements: {_sequential_note(spec)}")       # said once
        item_task = measure_item.with_options(result_storage=storage)
        outcomes = [_outcome(item_task(cfg=it.cfg, label=it.label, return_state=True)) for it in items]
    rows, failed = [], []
    for it, out in zip(items, outcomes):
        if not out["completed"]:
            failed.append(f"{it.label}: {out['message']}")
            continue
        results = json.loads(Path(out["path"]).read_text(encoding="utf-8"))
        rows.append(row_from_results(it, results, state=out["state"], results_path=out["path"]))
    if rows:
        _write_outputs(rows, root)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(items)} sweep measurements failed (the table holds the others):\n"
                           + "\n".join(failed))
    logger.info(f"sweep table: {root / TABLE_NAME}")
    return str(root / TABLE_NAME)


def _write_outputs(rows: list[dict], root: Path) -> None:
    """sweep.csv, sweep.png, sweep.json, and the table and the plot as Prefect artifacts."""
    write_table(rows, root / TABLE_NAME)
    png = plot_png(rows)
    tmp = root / f".{PLOT_NAME}.tmp"
    tmp.write_bytes(png)
    os.replace(tmp, root / PLOT_NAME)
    write_json_atomic(root / JSON_NAME, {"rows": rows})
    small = base64.b64encode(plot_png(rows, dpi=60)).decode("ascii")
    create_markdown_artifact(markdown=f"# Entropy change across the sweep ({len(rows)} measurements)\n\n"
                             f"![sweep](data:image/png;base64,{small})\n\ntable: `{root / TABLE_NAME}`\n",
                             key="entropy-sweep-plot", description="ΔĤ(η), ΔĤ'(0) and ESS per checkpoint / seed")
    create_table_artifact(table=[{k: v for k, v in r.items() if k not in ("checkpoint", "results")} for r in rows],
                          key="entropy-sweep-table", description="one row per sweep item")


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Measure ΔH(η) for every checkpoint of a training run or every seed.")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="measurement YAML (default: configs/demo.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one key of the measurement config (repeatable)")
    ap.add_argument("--run-dir", default=None, help="training output_dir: measure every checkpoint-N/ or step_N/")
    ap.add_argument("--checkpoints", nargs="*", default=[], help="checkpoint folders to measure")
    ap.add_argument("--seeds", nargs="*", type=int, default=[], help="seeds (each checkpoint with each seed)")
    ap.add_argument("--output-dir", default=None, help="sweep directory (default: <output_dir>/sweep)")
    ap.add_argument("--ray", choices=("auto", "on", "off"), default="auto",
                    help="auto: Ray when installed, else sequential (default)")
    ap.add_argument("--ray-address", default=None, help="Ray cluster address ('auto', 'ray://head:10001')")
    ap.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    ap.add_argument("--gpus-per-measurement", type=float, default=1.0, help="Ray GPUs per measurement (GPU clusters)")
    ap.add_argument("--cpus-per-measurement", type=float, default=1.0, help="Ray CPUs per measurement")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, overrides=args.set)
        spec = SweepConfig(run_dir=args.run_dir, checkpoints=args.checkpoints, seeds=args.seeds,
                           output_dir=args.output_dir, ray=args.ray, ray_address=args.ray_address,
                           ray_num_cpus=args.ray_num_cpus, gpus_per_measurement=args.gpus_per_measurement,
                           cpus_per_measurement=args.cpus_per_measurement)
        items = sweep_items(cfg, spec)                    # every folder checked before anything runs
        make_task_runner(spec)                            # ray: on without prefect-ray fails here
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(items)} measurements: {', '.join(it.label for it in items)}", file=sys.stderr)
    try:
        path = sweep(cfg, spec)
    except Exception as e:  # the failing items already logged their tracebacks; end with one clear line
        print(f"error: the sweep failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
