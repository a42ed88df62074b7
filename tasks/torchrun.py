"""Task: the measurement's stages in `torchrun --nproc_per_node=gpus` child processes (config `gpus` > 1).

One GPU-tagged task for the whole stage sequence: the children load the model once per rank and keep
it for every stage, which a task per stage (each its own torchrun) could not. They write into the
run's artifact store; the task returns the references read back from it (entropy_core.measure.StageRefs).
Not cached by Prefect and not retried: the children index each finished stage in output_dir, so
running the flow again resumes after the last one.
"""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from entropy_core.config import MeasureConfig
from entropy_core.measure import StageRefs, run_torchrun


@task(name="torchrun-stages", tags=["gpu"], cache_policy=NO_CACHE, retries=0)
def measure_torchrun(cfg: MeasureConfig) -> StageRefs:
    """Every stage of cfg on cfg.gpus ranks; raises TorchrunError with the children's first error line."""
    refs = run_torchrun(cfg)
    get_run_logger().info(f"{cfg.gpus} ranks: {len(refs.timing)} stages -> {refs.estimates.path}")
    return refs
