"""EntropyMeasurements: the whole measurement without Prefect, in one process or one per GPU.

    from entropy_core.config import load_config
    from entropy_core.measure import EntropyMeasurements
    results_json = EntropyMeasurements(load_config("configs/demo.yaml")).run()

    python -m entropy_core.measure --config configs/demo.yaml                        # the same, from a shell
    torchrun --standalone --nproc_per_node=4 -m entropy_core.measure --config C.yaml # 4 ranks, one per GPU
    python -m entropy_core.measure --config C.yaml --set gpus=4                      # starts that torchrun itself

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

Several processes (torch.distributed, DESIGN §1.5: every estimate is a function of sums over sequences):
* launched by torchrun (RANK / WORLD_SIZE in the environment), `run()` joins the process group
  (`init_distributed`: nccl with one GPU per rank, gloo on CPU) and every rank runs the same stage
  sequence; the stages shard their work (entropy_core.stages). Rank 0 prepares output_dir, decides
  which stages are reused, writes every artifact, the stage index and results.json; the other ranks
  receive the references. The world size is torchrun's, whatever `gpus` says.
* with `gpus: N > 1` and no torchrun around it, `run()` starts `torchrun --standalone
  --nproc_per_node=N -m entropy_core.measure --refs ...` (`run_torchrun`), whose rank 0 writes the
  stage references as JSON; this process then writes results.json from them. A failed child gives a
  TorchrunError with the children's first error line, and no results.json.
E and U are sampled by rank 0 alone, so they are the one-process batches of the same seed, and the
numbers equal the one-process run's up to float64 summation order (tests/test_distributed_pipeline.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from . import stages
from .allocator import keep_freed_memory
from .artifacts import ArtifactCorruptError, ArtifactRef, verify_artifact, write_bytes_atomic, write_json_atomic
from .config import ConfigError, MeasureConfig, dump_config, load_config
from .distributed import init_distributed, rank_and_world, run_on_rank0
from .logging import DetailedLogger
from .precision import apply_global_precision
from .report import write_report

__all__ = ["EntropyMeasurements", "StageRefs", "TorchrunError", "run_torchrun", "artifact_paths", "run_info", "main"]

TORCHRUN_DIR = ".torchrun"      # under output_dir: the config and the stage references a torchrun child reads/writes

_NOT_KEYED = ("root", "log", "progress")     # where a stage writes and reports, not what it computes


def artifact_paths(*, E: ArtifactRef, U: ArtifactRef, update_vector: ArtifactRef, theta: ArtifactRef,
                   etas: list[tuple[float, ArtifactRef]], linear: ArtifactRef | None) -> dict:
    """The `artifacts` section of results.json: where each stage's output lives."""
    return {"E": E.path, "U": U.path, "update_vector": update_vector.path, "theta": theta.path,
            "eta": {repr(float(eta)): ref.path for eta, ref in etas}, "linear": linear.path if linear else None}


@dataclasses.dataclass
class StageRefs:
    """What every stage of one measurement returned (results.json is written from these), and the
    stages' timing; JSON-able, so a torchrun child can hand it to the process that launched it."""
    checkpoint: stages.CheckpointRef
    E: ArtifactRef
    U: ArtifactRef
    update_vector: ArtifactRef
    theta: ArtifactRef
    etas: list[tuple[float, ArtifactRef]]
    linear: ArtifactRef | None
    attribution: ArtifactRef | None
    estimates: ArtifactRef
    fd_step: float | None
    timing: dict[str, dict]

    def artifact_paths(self) -> dict:
        return artifact_paths(E=self.E, U=self.U, update_vector=self.update_vector, theta=self.theta,
                              etas=self.etas, linear=self.linear)

    def to_json(self) -> dict:
        refs = {k: getattr(self, k) for k in ("E", "U", "update_vector", "theta", "linear", "attribution", "estimates")}
        return {"checkpoint": dataclasses.asdict(self.checkpoint), "fd_step": self.fd_step, "timing": self.timing,
                "etas": [[eta, ref.to_dict()] for eta, ref in self.etas],
                **{k: (ref.to_dict() if ref is not None else None) for k, ref in refs.items()}}

    @classmethod
    def from_json(cls, d: dict) -> StageRefs:
        """Raises: FileNotFoundError / ArtifactCorruptError when an artifact it names is missing or corrupt."""
        def ref(x):
            if x is None:
                return None
            r = ArtifactRef.from_dict(x)
            verify_artifact(r)
            return r
        return cls(checkpoint=stages.CheckpointRef(**d["checkpoint"]), fd_step=d["fd_step"], timing=d["timing"],
                   etas=[(float(eta), ref(r)) for eta, r in d["etas"]],
                   **{k: ref(d[k]) for k in ("E", "U", "update_vector", "theta", "linear", "attribution",
                                             "estimates")})


class TorchrunError(RuntimeError):
    """The torchrun child processes of a multi-process measurement failed; the message is their first error."""


def run_info(cfg: MeasureConfig, run: stages.RunDir, ckpt: stages.CheckpointRef, fd_step: float | None,
             runner: str, **extra: Any) -> dict:
    """The `run` section of results.json: what the config resolved to."""
    return {"runner": runner, "output_dir": str(run.output_dir), "checkpoint": dataclasses.asdict(ckpt),
            "dtype": cfg.precision.runtime_dtype, "device": stages.resolve_device(cfg.device), "fd_step": fd_step,
            "seeds": {"E": stages.derive_seed(cfg.seed, f"E/{cfg.data.split_E}"),
                      "U": stages.derive_seed(cfg.seed, f"U/{cfg.data.split_U}")}, **extra}


class EntropyMeasurements:
    """Measure ΔH(η) for one config; `run()` returns the path of results.json.

    Args:   config: the validated MeasureConfig (its `pipeline` section is ignored here).
            reuse: reuse stage results indexed in output_dir by an earlier run (default True).
    """

    def __init__(self, config: MeasureConfig, *, reuse: bool = True):
        self.config = config
        self.reuse = reuse
        self.timing: dict[str, dict] = {}

    # -- one stage ----------------------------------------------------------------------------------
    def _stage(self, name: str, stage: str, fn: Callable[..., ArtifactRef], **kwargs) -> ArtifactRef:
        """fn(**kwargs), or the indexed result of an earlier run with the same inputs (rank 0 decides)."""
        key = stages.stage_key(stage, {k: v for k, v in kwargs.items() if k not in _NOT_KEYED})
        index = self._run.output_dir / ".stage-index" / f"{key}.json"
        with self._log.stage(name) as t:
            ref, why = run_on_rank0(lambda: self._lookup(name, index) if self.reuse else (None, None),
                                    encode=lambda rw: [rw[0] and rw[0].to_dict(), rw[1]],
                                    decode=lambda x: (x[0] and ArtifactRef.from_dict(x[0]), x[1]))
            state = "Reused" if ref is not None else "Completed"
            if ref is None:
                ref = fn(**kwargs)
                if self._rank == 0:
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
        """Run every stage in order and write results.json (last, by rank 0). Returns its path on every rank.

        With `gpus` > 1 outside torchrun, the stages run in `run_torchrun`'s child processes.
        Raises: RunDirectoryConflict for an output_dir made with another config; TorchrunError when the
                child processes fail; the first stage's error otherwise (no results.json is written then).
        """
        t_start = time.perf_counter()
        with self._session() as run:
            if self.config.gpus > 1 and "WORLD_SIZE" not in os.environ:      # not under torchrun: start it
                refs = run_torchrun(self.config, reuse=self.reuse)
                runner = f"EntropyMeasurements (torchrun, {self.config.gpus})"
            else:
                refs, runner = self._measure(run), "EntropyMeasurements"
            timing = {"stages": refs.timing, "total_seconds": round(time.perf_counter() - t_start, 4)}
            processes = self.config.gpus if self._world == 1 else self._world
            info = run_info(self.config, run, refs.checkpoint, refs.fd_step, runner,
                            **({"processes": processes} if processes > 1 else {}))

            def report() -> Path:
                with self._log.stage("report"):
                    return write_report(refs.estimates, output_dir=run.output_dir, config=dump_config(self.config),
                                        timing=timing, artifacts=refs.artifact_paths(), run=info,
                                        attribution_ref=refs.attribution)
            path = run_on_rank0(report, encode=str, decode=Path)
            self._log.log("results", "minimal", path=str(path), seconds=round(time.perf_counter() - t_start, 3))
            return path

    def run_stages(self) -> StageRefs:
        """Every stage but the report (the torchrun children of `run_torchrun` run this). Returns the
        references on every rank."""
        with self._session() as run:
            return self._measure(run)

    @contextlib.contextmanager
    def _session(self) -> Iterator[stages.RunDir]:
        """Precision, the process group when torchrun launched us, output_dir (prepared by rank 0) and the
        run log (files on rank 0 only), undone on exit."""
        cfg = self.config
        apply_global_precision(cfg.precision.allow_tf32, cfg.precision.matmul_precision)   # entry point: once
        if stages.resolve_device(cfg.device) == "cpu":
            keep_freed_memory()                                          # entry point: CPU passes reuse memory
        self._rank, self._world = init_distributed("gloo" if cfg.device == "cpu" else None)
        self._run = run = run_on_rank0(lambda: stages.prepare_run(cfg), encode=lambda r: str(r.output_dir),
                                       decode=stages.RunDir.at)
        handler, level = _stderr_handler() if self._rank == 0 else (None, None)
        self._log = DetailedLogger(run.output_dir / "logs" if self._rank == 0 else None, run_name="measure",
                                   level=cfg.logging.level, gzip=cfg.logging.gzip, max_files=cfg.logging.max_files)
        try:
            yield run
        finally:
            self._log.close()
            if handler is not None:
                logging.getLogger("entropy_core").removeHandler(handler)
                logging.getLogger("entropy_core").setLevel(level)

    def _measure(self, run: stages.RunDir) -> StageRefs:
        cfg, log, est = self.config, self._log, self.config.estimator
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
            fd_step = stages.resolve_fd_step(est.fd_step, v)
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
        return StageRefs(checkpoint=ckpt, E=E, U=U, update_vector=v, theta=theta, etas=etas, linear=lin,
                         attribution=attr, estimates=estimates, fd_step=fd_step, timing=dict(self.timing))


def run_torchrun(cfg: MeasureConfig, *, reuse: bool = True) -> StageRefs:
    """Every stage of `cfg` in `torchrun --standalone --nproc_per_node=cfg.gpus` child processes (gloo on
    CPU, nccl with one GPU per rank), writing into cfg.output_dir's artifact store; returns the stage
    references their rank 0 wrote, each artifact verified. The children's output is passed on to stderr.

    The config travels as YAML in `<output_dir>/.torchrun/config.yaml`, the references come back in
    `.torchrun/refs.json`. reuse False: the children recompute every stage (EntropyMeasurements(reuse=False)).
    Raises: TorchrunError with the exit status and the children's first error line.
    """
    work = stages.RunDir.at(cfg.output_dir).output_dir / TORCHRUN_DIR
    config_path, refs_path = work / "config.yaml", work / "refs.json"
    write_bytes_atomic(config_path, yaml.safe_dump(dump_config(cfg), sort_keys=False).encode("utf-8"))
    refs_path.unlink(missing_ok=True)
    src = str(Path(__file__).resolve().parents[1])                 # entropy_core importable in the children
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.gpus}",
           "-m", "entropy_core.measure", "--config", str(config_path), "--refs", str(refs_path)] + \
        ([] if reuse else ["--no-reuse"])
    errors, last = {}, ""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            m = re.match(r"error: rank (\d+): (?:the measurement failed: )?(.*)", line)
            if m:
                errors.setdefault(int(m.group(1)), m.group(2).strip())
            last = line.strip() or last
    if proc.returncode != 0 or not refs_path.is_file():
        why = errors[min(errors)] if errors else last       # rank 0 holds the cause; the others echo it
        raise TorchrunError(f"torchrun --nproc_per_node={cfg.gpus} exited with status {proc.returncode}: {why}")
    return StageRefs.from_json(json.loads(refs_path.read_text(encoding="utf-8")))


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


def main(argv: list[str] | None = None) -> int:
    """`python -m entropy_core.measure --config C.yaml [--set key=value ...]`, alone or under torchrun.

    Prints the path of results.json (rank 0). Exit status 2 for a bad config or input file, 1 for a
    failed measurement, each with one `error:` line (`error: rank <r>: ...` under torchrun).
    """
    ap = argparse.ArgumentParser(prog="python -m entropy_core.measure", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="experiment YAML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one key, value parsed as YAML (repeatable)")
    ap.add_argument("--refs", default=None, help="write the stage references (JSON) here instead of results.json "
                                                 "(run_torchrun's children)")
    ap.add_argument("--no-reuse", action="store_true", help="recompute every stage, even if indexed in output_dir")
    args = ap.parse_args(argv)
    where = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
    try:
        cfg = load_config(args.config, overrides=args.set)
        if args.refs is None:                    # run_torchrun's parent has checked the inputs already
            stages.check_inputs(cfg)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {where}{e}", file=sys.stderr)
        return 2
    try:
        m = EntropyMeasurements(cfg, reuse=not args.no_reuse)
        if args.refs is not None:
            refs = m.run_stages()
            if rank_and_world()[0] == 0:
                write_json_atomic(args.refs, refs.to_json())
        else:
            path = m.run()
            if rank_and_world()[0] == 0:
                print(path, flush=True)
    except Exception as e:  # the stage already logged its traceback; end with one clear line
        print(f"error: {where}the measurement failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
