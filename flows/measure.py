"""Measure how one Dr.GRPO + AdamW step changes a policy's entropy, as a Prefect flow.

    python flows/measure.py                                   # configs/demo.yaml; ephemeral Prefect server
    python flows/measure.py --config configs/qwen2_5_1_5b.yaml --set estimator.eta_list=[1e-6,2e-6]
    python flows/measure.py --no-prefect                      # the same stages in plain Python
    python flows/measure.py --set gpus=4                      # the stages on 4 GPUs, in torchrun children
    python flows/measure.py --serve --cron "0 3 * * *"        # a deployment, run from the UI form
    prefect server start --host 127.0.0.1                     # the UI, http://127.0.0.1:4200 (local only)
    prefect concurrency-limit create gpu 1                    # at most one GPU stage at a time, server-wide

The last line printed is the path of results.json. A bad config, checkpoint file (base dir, adapter folder,
optimizer.pt read weights_only and checked against the adapter), data set, reward or output_dir prints one
`error:` message naming the key or file and exits with status 2 before anything runs
(`entropy_core.stages.check_inputs`); a failed stage (e.g. an adapter made for another base, which only
loading the model reveals; a reward that raises; NaN logits) exits with status 1 and leaves no results.json.

The flow is the order of the stages and nothing else (no tensors here); each stage is one task in
tasks/ around one function of entropy_core.stages, which EntropyMeasurements (--no-prefect) calls in
the same order with the same arguments. Tasks are called directly: they share the flow's process and
so its in-memory model, loaded once. Caching: a second run of the same config is served entirely
from the cache; a run that changes only estimator.eta_list recomputes only the new η passes and the
estimates; a killed run resumes after its last completed stage (rerun the same command).

With `gpus: N > 1` one GPU-tagged task (tasks/torchrun.py) runs every stage in `torchrun
--nproc_per_node=N -m entropy_core.measure` children, which shard E and U over the ranks and write
into the same artifact store; the flow writes results.json from the references they hand back. Reuse
then comes from the children's stage index in output_dir, not from Prefect's cache.
"""
# No `from __future__ import annotations` here: Prefect builds the parameter model of a served flow from the
# real annotation, and a string "MeasureConfig" cannot be resolved when the runner loads this file.
import os
import sys

# Before prefect is imported: no telemetry, and the library's `entropy_core` log lines in the run logs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "entropy_core")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")     # --no-prefect logs to the console only
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")   # slow first start on 2 cores

from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:                  # `tasks` is a top-level package of this repository
    sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,  # noqa: E402
                               update_progress_artifact)
from prefect.runtime import flow_run  # noqa: E402

from entropy_core import report, stages  # noqa: E402
from entropy_core.allocator import keep_freed_memory  # noqa: E402
from entropy_core.config import ConfigError, MeasureConfig, dump_config, load_config  # noqa: E402
from entropy_core.measure import EntropyMeasurements, StageRefs, run_info  # noqa: E402
from entropy_core.precision import apply_global_precision  # noqa: E402
from tasks import bind_tasks  # noqa: E402

DEFAULT_CONFIG = _ROOT / "configs" / "demo.yaml"


class _Stages:
    """Calls one task, records its wall time and final state (Completed / Cached) for results.json and
    moves the flow's progress artifact. A failed task's exception propagates: the flow fails with it."""

    def __init__(self, total: int):
        self.timing: dict[str, dict] = {}
        self.total = total
        self.progress_id = create_progress_artifact(progress=0.0, description="stages of the measurement")

    def __call__(self, name: str, task, **kwargs):
        t0 = time.perf_counter()
        state = task(return_state=True, **kwargs)
        result = state.result()                      # raises the task's own exception if it failed
        self.timing[name] = {"seconds": round(time.perf_counter() - t0, 4), "state": state.name}
        update_progress_artifact(self.progress_id, progress=100.0 * len(self.timing) / self.total)
        return result


@flow(name="entropy-measure")
def measure(cfg: MeasureConfig = MeasureConfig()) -> str:
    """Measure ΔH(η) for one MeasureConfig; returns the path of results.json (written last)."""
    t_start = time.perf_counter()
    logging.getLogger("entropy_core").setLevel(logging.INFO)
    apply_global_precision(cfg.precision.allow_tf32, cfg.precision.matmul_precision)   # entry point: once
    if stages.resolve_device(cfg.device) == "cpu":
        keep_freed_memory()                                            # entry point: CPU passes reuse memory
    run = stages.prepare_run(cfg)                                      # manifest; old results.json removed
    t = bind_tasks(run.output_dir, cfg.pipeline)
    if cfg.gpus > 1:                                                    # every stage on cfg.gpus ranks
        st = _Stages(total=1)
        refs = st("torchrun", t.measure_torchrun, cfg=cfg)
        timing, extra = {"stages": refs.timing, "torchrun": st.timing["torchrun"]}, {"processes": cfg.gpus}
    else:
        st = _Stages(total=6 + len(cfg.estimator.eta_list) + int(cfg.estimator.linear or cfg.estimator.quadratic))
        refs = _measure_stages(cfg, run, t, st)
        timing, extra = {"stages": st.timing}, {}
    timing["total_seconds"] = round(time.perf_counter() - t_start, 4)
    path = report.write_report(                                                                         # report
        refs.estimates, output_dir=run.output_dir, config=dump_config(cfg), timing=timing,
        artifacts=refs.artifact_paths(), attribution_ref=refs.attribution,
        run=run_info(cfg, run, refs.checkpoint, refs.fd_step, "prefect", flow_run_id=str(flow_run.id), **extra))
    _publish(path)
    update_progress_artifact(st.progress_id, progress=100.0)
    get_run_logger().info(f"results: {path}")
    return str(path)


def _measure_stages(cfg: MeasureConfig, run: stages.RunDir, t, st: _Stages) -> StageRefs:
    """The stages in this process, one task each, in order."""
    est, tau = cfg.estimator, cfg.generation.temperature
    rt = dict(dtype=cfg.precision.runtime_dtype, device=stages.resolve_device(cfg.device), root=str(run.artifacts))
    score = dict(temperature=tau, microbatch_size=est.microbatch_size, **rt)
    linear = est.linear or est.quadratic

    ckpt = st("checkpoint", t.load_checkpoint, checkpoint=cfg.checkpoint, data=cfg.data)                 # resolve
    E = st("sample_E", t.sample_E, ckpt=ckpt, data=cfg.data, generation=cfg.generation,                  # sample
           B_E=cfg.batches.B_E, seed=cfg.seed, **rt)
    U = st("sample_U", t.sample_U, ckpt=ckpt, data=cfg.data, generation=cfg.generation, B_U=cfg.batches.B_U,
           G=cfg.batches.G, max_resample_attempts=cfg.batches.max_resample_attempts, seed=cfg.seed, **rt)
    v = st("update_vector", t.compute_update_vector, ckpt=ckpt, u_ref=U, update=cfg.update,            # AdamW
           temperature=tau, **rt)
    theta = st("evaluate_theta", t.evaluate, ckpt=ckpt, e_ref=E, v_ref=None, eta=0.0, **score)          # θ
    etas = [(eta, st(f"evaluate_eta[{eta:g}]", t.evaluate, ckpt=ckpt, e_ref=E, v_ref=v, eta=float(eta),  # θ+ηv
                     **score)) for eta in est.eta_list]
    lin, fd_step = None, None
    if linear:
        fd_step = stages.resolve_fd_step(est.fd_step, v)
        lin = st("linear", t.estimate_linear, ckpt=ckpt, e_ref=E, v_ref=v, theta_ref=theta,             # slope
                 quadratic=est.quadratic, variance_reduced=est.variance_reduced, fd_step=fd_step, **score)
    attr = None
    if est.attribution:
        attr = st("attribution", t.attribution, ckpt=ckpt, e_ref=E, u_ref=U, v_ref=v, theta_ref=theta,         # who
                  groups=est.attribution_groups, variance_reduced=est.variance_reduced, **score)
    estimates = st("estimate", t.estimate, e_ref=E, theta_ref=theta, eta_refs=etas, v_ref=v, linear_ref=lin,  # SNIS
                   logw_clip=est.logw_clip, report_linear=est.linear, report_quadratic=est.quadratic,
                   root=rt["root"])
    return StageRefs(checkpoint=ckpt, E=E, U=U, update_vector=v, theta=theta, etas=etas, linear=lin,
                     attribution=attr, estimates=estimates, fd_step=fd_step, timing=st.timing)


def _publish(results_path: Path) -> None:
    """The results in the UI: a markdown summary with the plot inline (a data URI renders offline) and a
    table of ΔĤ(η)."""
    results = json.loads(Path(results_path).read_text(encoding="utf-8"))
    png = base64.b64encode(report.plot_png(results, width=4.0, height=2.5, dpi=80)).decode("ascii")
    create_markdown_artifact(markdown=report.summary_markdown(results) + f"\n![ΔĤ(η)](data:image/png;base64,{png})\n"
                             f"\nresults: `{results_path}`\n", key="entropy-summary",
                             description="ΔĤ(η) of one simulated Dr.GRPO step")
    create_table_artifact(table=report.eta_table(results), key="entropy-delta-table",
                          description="SNIS ΔĤ(η) per step size, with the linear and quadratic predictions")
    attr = results.get("attribution")
    if attr:
        png = base64.b64encode(Path(attr["plot"]).read_bytes()).decode("ascii")
        create_markdown_artifact(markdown=f"# Which U sequences drive the slope\n\n{report.attribution_markdown(attr)}"
                                 f"\n![attribution](data:image/png;base64,{png})\n", key="entropy-attribution",
                                 description="c_i = ⟨∇Ĥ, v_i⟩ per U sequence (DESIGN §1.6)")


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Measure ΔH(η) of one simulated Dr.GRPO + AdamW step.")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: configs/demo.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one key, value parsed as YAML, e.g. --set estimator.eta_list=[1e-5] (repeatable)")
    ap.add_argument("--no-prefect", action="store_true", help="run the stages in plain Python (EntropyMeasurements)")
    ap.add_argument("--serve", action="store_true", help="serve a deployment whose parameter form is the config")
    ap.add_argument("--cron", default=None, help="with --serve: a cron schedule, e.g. '0 3 * * *'")
    ap.add_argument("--name", default="entropy-measure", help="with --serve: the deployment name")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cron and not args.serve:
        print("error: --cron needs --serve", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, overrides=args.set)
        if not args.serve:
            stages.check_inputs(cfg)         # checkpoint files, data set, reward: before any work
            stages.prepare_run(cfg)          # refuses an output_dir made with another config, before any work
    except (ConfigError, ValueError, OSError) as e:   # OSError: a missing file, an unwritable output_dir
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.serve:
        if not os.environ.get("PREFECT_API_URL"):
            print("note: schedules need a Prefect server: run `prefect server start --host 127.0.0.1` and export "
                  "PREFECT_API_URL=http://127.0.0.1:4200/api first", file=sys.stderr)
        measure.serve(name=args.name, cron=args.cron, parameters={"cfg": cfg.model_dump(mode="json")},
                      description="ΔH(η) of one simulated Dr.GRPO + AdamW step; the form is MeasureConfig.")
        return 0
    logging.getLogger("entropy_core").setLevel(logging.INFO)        # stage and progress lines on the console
    try:
        path = EntropyMeasurements(cfg).run() if args.no_prefect else measure(cfg)
    except Exception as e:  # the stage already logged its traceback; end with one clear line
        print(f"error: the measurement failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
