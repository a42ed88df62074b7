"""EntropyMeasurements: the whole measurement in one process, without Prefect.

    from entropy_core.config import load_config
    from entropy_core.measure import EntropyMeasurements
    results_json = EntropyMeasurements(load_config("configs/demo.yaml")).run()

It calls the stages of `entropy_core.stages` in the order the Prefect flow does (flows/measure.py),
with the same arguments, so both runners give identical numbers for one config:

    checkpoint -> sample_E, sample_U -> update_vector -> evaluate θ -> evaluate θ+ηv for each η
               -> linear (if estimator.linear or .quadratic) -> estimate -> report (results.json last)

Reuse: each stage's result is indexed under `<output_dir>/.stage-index/<stage key>.json` (the key is
`stages.stage_key` of exactly the stage's inputs), so a rerun into the same output_dir recomputes
only what changed; an indexed artifact that is missing or corrupt (its bytes are hashed on every
lookup) is logged as `artifact_invalid`, recomputed, and noted in results.json's timing. Progress and stage
times go to a DetailedLogger (`<output_dir>/logs/`) and, when nothing else listens to the
`entropy_core` logger, to stderr.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import stages
from .artifacts import ArtifactCorruptError, ArtifactRef, verify_artifact, write_json_atomic
from .config import MeasureConfig, dump_config
from .logging import DetailedLogger
from .precision import apply_global_precision
from .report import write_report

__all__ = ["EntropyMeasurements", "artifact_paths", "run_info"]

_NOT_KEYED = ("root", "log", "progress")     # where a stage writes and reports, not what it computes


def artifact_paths(*, E: ArtifactRef, U: ArtifactRef, update_vector: ArtifactRef, theta: ArtifactRef,
                   etas: list[tuple[float, ArtifactRef]], linear: ArtifactRef | None) -> dict:
    """The `artifacts` section of results.json: where each stage's output lives."""
    return {"E": E.path, "U": U.path, "update_vector": update_vector.path, "theta": theta.path,
            "eta": {repr(float(eta)): ref.path for eta, ref in etas}, "linear": linear.path if linear else None}


def run_info(cfg: MeasureConfig, run: stages.RunDir, ckpt: stages.CheckpointRef, fd_step: float | None,
             runner: str, **extra: Any) -> dict:
    """The `run` section of results.json: what the config resolved to."""
    return {"runner": runner, "output_dir": str(run.output_dir), "checkpoint": dataclasses.asdict(ckpt),
            "dtype": cfg.precision.runtime_dtype, "device": stages.resolve_device(cfg.device), "fd_step": fd_step,
            "seeds": {"E": stages.derive_seed(cfg.seed, f"E/{cfg.data.split_E}"),
                      "U": stages.derive_seed(cfg.seed, f"U/{cfg.data.split_U}")}, **extra}


class EntropyMeasurements:
    """Measure ΔH(η) for one config in this process; `run()` returns the path of results.json.

    Args:   config: the validated MeasureConfig (its `pipeline` section is ignored here).
            reuse: reuse stage results indexed in output_dir by an earlier run (default True).
    """

    def __init__(self, config: MeasureConfig, *, reuse: bool = True):
        self.config = config
        self.reuse = reuse
        self.timing: dict[str, dict] = {}

    # -- one stage ----------------------------------------------------------------------------------
    def _stage(self, name: str, stage: str, fn: Callable[..., ArtifactRef], **kwargs) -> ArtifactRef:
        """fn(**kwargs), or the indexed result of an earlier run with the same inputs."""
        key = stages.stage_key(stage, {k: v for k, v in kwargs.items() if k not in _NOT_KEYED})
        index = self._run.output_dir / ".stage-index" / f"{key}.json"
        with self._log.stage(name) as t:
            ref, why = self._lookup(name, index) if self.reuse else (None, None)
            state = "Reused" if ref is not None else "Completed"
            if ref is None:
                ref = fn(**kwargs)
                write_json_atomic(index, {"stage": stage, "ref": ref.to_dict()})
        self.timing[name] = {"seconds": round(t.elapsed_s, 4), "state": state,
                             **({"recomputed_because": why} if why else {})}
        if state == "Reused":
            self._log.log("stage_reused", stage=name, artifact=ref.path)
        return ref

    def _lookup(self, name: str, index: Path) -> tuple[ArtifactRef | None, str | None]:
        """(the indexed artifact, None) if it verifies; (None, why) if it is missing or corrupt, which is
        logged and reported in results.json's timing; (None, None) if this stage was never indexed."""
        try:
            ref = ArtifactRef.from_dict(json.loads(index.read_text(encoding="utf-8"))["ref"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None, None
        try:
            verify_artifact(ref)                         # hashes the bytes: a flipped bit is caught here
        except FileNotFoundError:
            why = f"artifact missing: {ref.path}"
        except ArtifactCorruptError as e:
            why = f"artifact corrupt: {e}"
        else:
            return ref, None
        self._log.log("artifact_invalid", "minimal", stage=name, action="recomputing", reason=why)
        return None, why

    def _progress(self, desc: str):
        prog = {}

        def update(done: int, total: int) -> None:
            if "p" not in prog:
                prog["p"] = self._log.progress(desc, total, every_fraction=0.25)
            prog["p"].update(done - prog["p"].done)
            if done >= total:
                prog["p"].close()
        return update

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Run every stage in order and write results.json (last). Returns its path.

        Raises: RunDirectoryConflict for an output_dir made with another config; the first stage's
                error otherwise (no results.json is written then).
        """
        cfg = self.config
        t_start = time.perf_counter()
        apply_global_precision(cfg.precision.allow_tf32, cfg.precision.matmul_precision)   # entry point: once
        self._run = run = stages.prepare_run(cfg)
        handler, level = _stderr_handler()
        self._log = DetailedLogger(run.output_dir / "logs", run_name="measure", level=cfg.logging.level,
                                   gzip=cfg.logging.gzip, max_files=cfg.logging.max_files)
        try:
            return self._measure(cfg, run, t_start)
        finally:
            self._log.close()
            if handler is not None:
                logging.getLogger("entropy_core").removeHandler(handler)
                logging.getLogger("entropy_core").setLevel(level)

    def _measure(self, cfg: MeasureConfig, run: stages.RunDir, t_start: float) -> Path:
        log, est = self._log, cfg.estimator
        rt = dict(dtype=cfg.precision.runtime_dtype, device=stages.resolve_device(cfg.device), root=str(run.artifacts),
                  log=log)
        tau = cfg.generation.temperature
        with log.stage("checkpoint") as t:
            ckpt = stages.resolve_checkpoint(cfg.checkpoint, cfg.data, log=log)
        self.timing["checkpoint"] = {"seconds": round(t.elapsed_s, 4), "state": "Completed"}
        E = self._stage("sample_E", "sample_E", stages.sample_E, ckpt=ckpt, data=cfg.data,
                        generation=cfg.generation, B_E=cfg.batches.B_E, seed=cfg.seed, **rt)
        U = self._stage("sample_U", "sample_U", stages.sample_U, ckpt=ckpt, data=cfg.data,
                        generation=cfg.generation, B_U=cfg.batches.B_U, G=cfg.batches.G,
                        max_resample_attempts=cfg.batches.max_resample_attempts, seed=cfg.seed, **rt)
        v = self._stage("update_vector", "update_vector", stages.update_vector, ckpt=ckpt, u_ref=U,
                        update=cfg.update, temperature=tau, **rt)
        score = dict(temperature=tau, microbatch_size=est.microbatch_size, **rt)
        theta = self._stage("evaluate_theta", "score", stages.score, ckpt=ckpt, e_ref=E, v_ref=None, eta=0.0,
                            progress=self._progress("evaluate θ"), **score)
        etas = [(eta, self._stage(f"evaluate_eta[{eta:g}]", "score", stages.score, ckpt=ckpt, e_ref=E, v_ref=v,
                                  eta=float(eta), progress=self._progress(f"evaluate η={eta:g}"), **score))
                for eta in est.eta_list]
        lin, fd_step = None, None
        if est.linear or est.quadratic:
            fd_step = stages.resolve_fd_step(est.fd_step, est.eta_list)
            lin = self._stage("linear", "linear", stages.linear, ckpt=ckpt, e_ref=E, v_ref=v, theta_ref=theta,
                              quadratic=est.quadratic, variance_reduced=est.variance_reduced, fd_step=fd_step,
                              temperature=tau, microbatch_size=est.microbatch_size, **rt)
        attr = None
        if est.attribution:
            attr = self._stage("attribution", "attribution", stages.attribution, ckpt=ckpt, e_ref=E, u_ref=U, v_ref=v,
                               theta_ref=theta, groups=est.attribution_groups,
                               variance_reduced=est.variance_reduced, temperature=tau,
                               microbatch_size=est.microbatch_size, **rt)
        estimates = self._stage("estimate", "estimate", stages.estimate, e_ref=E, theta_ref=theta, eta_refs=etas,
                                v_ref=v, linear_ref=lin, logw_clip=est.logw_clip, report_linear=est.linear,
                                report_quadratic=est.quadratic, root=str(run.artifacts), log=log)
        with log.stage("report"):
            timing = {"stages": dict(self.timing), "total_seconds": round(time.perf_counter() - t_start, 4)}
            path = write_report(estimates, output_dir=run.output_dir, config=dump_config(cfg), timing=timing,
                                artifacts=artifact_paths(E=E, U=U, update_vector=v, theta=theta, etas=etas, linear=lin),
                                run=run_info(cfg, run, ckpt, fd_step, "EntropyMeasurements"), attribution_ref=attr)
        log.log("results", "minimal", path=str(path), seconds=round(time.perf_counter() - t_start, 3))
        return path


def _stderr_handler() -> tuple[logging.Handler | None, int]:
    """Show the run's progress on stderr while it runs, when nobody else listens to `entropy_core`.
    Returns the handler added (None if none) and the logger's previous level, to restore both."""
    logger = logging.getLogger("entropy_core")
    if any(not isinstance(h, logging.NullHandler) for h in logger.handlers) or logging.getLogger().handlers:
        return None, logger.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler, level
