"""Task: resolve the checkpoint (adapter dir, optimizer.pt, content hash); build the demo one if asked.

The model itself is not passed anywhere: every GPU task loads it on first use into the process-local
cache of `entropy_core.stages.get_model`, keyed by this task's content hash.
"""
from __future__ import annotations

from prefect import get_run_logger, task

from entropy_core import stages
from entropy_core.config import CheckpointConfig, DataConfig

from .common import (DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS, maybe_fault, retry_if_transient, stage_cache_key,
                     stage_log)


def _files(parameters: dict) -> dict:
    # sizes + mtimes of the checkpoint files: an edited adapter or optimizer.pt misses the cache
    return stages.checkpoint_fingerprint(parameters["checkpoint"], parameters["data"])


@task(name="load-checkpoint", tags=["gpu"], retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_SECONDS,
      retry_condition_fn=retry_if_transient, cache_key_fn=stage_cache_key("checkpoint", extra=_files),
      persist_result=True, result_serializer="json")
def load_checkpoint(checkpoint: CheckpointConfig, data: DataConfig) -> stages.CheckpointRef:
    """CheckpointRef of the configured (or demo) checkpoint; tagged gpu because the demo build trains."""
    maybe_fault("checkpoint")
    ref = stages.resolve_checkpoint(checkpoint, data, log=stage_log())
    get_run_logger().info(f"checkpoint {ref.adapter} (+ {ref.optimizer}), content hash {ref.sha256[:12]}")
    return ref
