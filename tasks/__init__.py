"""Prefect tasks: one thin adapter per stage of `entropy_core.stages` (STYLE rule 7).

Each task resolves references, calls one stage function, logs one line and returns a reference;
retries, tags, cache key and name sit on its decorator. Tasks that touch the model carry
tags=["gpu"], so a tag concurrency limit caps them across every run of a Prefect server:

    prefect concurrency-limit create gpu 1

`bind_tasks` gives the flow the tasks configured for one run: results (and cache records) under
`<output_dir>/.prefect/results` and the retry settings of the config's `pipeline` section
(`measure_torchrun`, which runs every stage in torchrun children when `gpus` > 1, is never retried).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from entropy_core.config import PipelineConfig

from .attribution import attribution
from .checkpoint import load_checkpoint
from .estimate import estimate
from .evaluate import estimate_linear, evaluate
from .sampling import sample_E, sample_U
from .torchrun import measure_torchrun
from .update import compute_update_vector

__all__ = ["load_checkpoint", "sample_E", "sample_U", "compute_update_vector", "evaluate", "estimate_linear",
           "attribution", "estimate", "measure_torchrun", "bind_tasks"]

ALL_TASKS = {"load_checkpoint": load_checkpoint, "sample_E": sample_E, "sample_U": sample_U,
             "compute_update_vector": compute_update_vector, "evaluate": evaluate,
             "estimate_linear": estimate_linear, "attribution": attribution, "estimate": estimate}


def bind_tasks(output_dir: str | Path, pipeline: PipelineConfig) -> SimpleNamespace:
    """Every task with its result storage under this run's output_dir (a Path: a str would be read as a
    block slug) and the configured retries; cache keys do not depend on where results are stored."""
    storage = Path(output_dir) / ".prefect" / "results"
    opts = dict(result_storage=storage, retries=pipeline.retries,
                retry_delay_seconds=list(pipeline.retry_delay_seconds))
    return SimpleNamespace(**{name: t.with_options(**opts) for name, t in ALL_TASKS.items()},
                           measure_torchrun=measure_torchrun)
