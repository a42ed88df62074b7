"""Task: SNIS ΔĤ(η) for every η, Ĥ(θ), and the body of results.json, from the score artifacts (CPU only)."""
from __future__ import annotations

from prefect import get_run_logger, task

from entropy_core import stages
from entropy_core.artifacts import ArtifactRef

from .common import (DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS, maybe_fault, retry_if_transient, stage_cache_key,
                     stage_log)


@task(name="estimate", retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_SECONDS,
      retry_condition_fn=retry_if_transient, cache_key_fn=stage_cache_key("estimate"), persist_result=True,
      result_serializer="json")
def estimate(e_ref: ArtifactRef, theta_ref: ArtifactRef, eta_refs: list[tuple[float, ArtifactRef]], v_ref: ArtifactRef,
             linear_ref: ArtifactRef | None, logw_clip: float | None, report_linear: bool, report_quadratic: bool,
             root: str) -> ArtifactRef:
    """One "estimates" artifact; a NaN/inf estimate fails at once (never retried)."""
    maybe_fault("estimate")
    ref = stages.estimate(e_ref, theta_ref, eta_refs, v_ref=v_ref, linear_ref=linear_ref, logw_clip=logw_clip,
                          report_linear=report_linear, report_quadratic=report_quadratic, root=root, log=stage_log())
    get_run_logger().info(f"estimates for {len(eta_refs)} step sizes -> {ref.path}")
    return ref
