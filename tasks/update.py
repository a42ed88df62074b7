"""Task: the update vector v = Δθ/lr of one AdamW step on U (DESIGN §1.1).

The saved optimizer state is read inside this task, not by a task of its own: it is used only here,
an optimizer object cannot travel between tasks (never pickled, STYLE rule 8), and reading
optimizer.pt is cheap next to the gradient pass. Its content hash is already part of the
checkpoint's hash, so the cache key covers it.
"""
from __future__ import annotations

from prefect import get_run_logger, task

from entropy_core import stages
from entropy_core.artifacts import ArtifactRef
from entropy_core.config import UpdateConfig

from .common import (DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS, maybe_fault, retry_if_transient, stage_cache_key,
                     stage_log)


@task(name="compute-update-vector", tags=["gpu"], retries=DEFAULT_RETRIES,
      retry_delay_seconds=DEFAULT_RETRY_DELAY_SECONDS, retry_condition_fn=retry_if_transient,
      cache_key_fn=stage_cache_key("update_vector"), persist_result=True, result_serializer="json")
def compute_update_vector(ckpt: stages.CheckpointRef, u_ref: ArtifactRef, update: UpdateConfig, temperature: float,
                          dtype: str, device: str, root: str) -> ArtifactRef:
    """Load the optimizer state and U by reference, compute v, write one verified artifact."""
    maybe_fault("update")
    ref = stages.update_vector(ckpt, u_ref, update=update, temperature=temperature, dtype=dtype, device=device,
                               root=root, log=stage_log())
    get_run_logger().info(f"update vector -> {ref.path}")
    return ref
