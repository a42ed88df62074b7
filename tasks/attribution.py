"""Task: which U sequences drive the slope, c_i = ⟨∇Ĥ, v_i⟩ with error bars over E (DESIGN §1.6)."""
from __future__ import annotations

from prefect import get_run_logger, task

from entropy_core import stages
from entropy_core.artifacts import ArtifactRef

from .common import (DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS, maybe_fault, retry_if_transient, stage_cache_key,
                     stage_log)


@task(name="attribution", tags=["gpu"], retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_SECONDS,
      retry_condition_fn=retry_if_transient, cache_key_fn=stage_cache_key("attribution"), persist_result=True,
      result_serializer="json")
def attribution(ckpt: stages.CheckpointRef, e_ref: ArtifactRef, u_ref: ArtifactRef, v_ref: ArtifactRef,
                theta_ref: ArtifactRef, groups: int, variance_reduced: bool, temperature: float, microbatch_size: int,
                dtype: str, device: str, root: str) -> ArtifactRef:
    """Backward passes over E, one pass over U; one verified artifact of per-U-sequence columns."""
    maybe_fault("attribution")
    ref = stages.attribution(ckpt, e_ref, u_ref, v_ref, theta_ref, groups=groups, variance_reduced=variance_reduced,
                             temperature=temperature, microbatch_size=microbatch_size, dtype=dtype, device=device,
                             root=root, log=stage_log())
    get_run_logger().info(f"attribution -> {ref.path}")
    return ref
