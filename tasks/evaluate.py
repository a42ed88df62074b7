"""Tasks: teacher-force E at θ and at each θ+ηv (one task run per η), and the linear/quadratic terms.

The θ pass is keyed without η or the update vector, so it is computed once and reused by every η
and by a rerun with another eta_list. Each η is its own task run: visible, cached and retried alone.
"""
from __future__ import annotations

from prefect import get_run_logger, task

from entropy_core import stages
from entropy_core.artifacts import ArtifactRef

from .common import (DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS, maybe_fault, progress_artifact,
                     retry_if_transient, stage_cache_key, stage_log)

_POLICY = dict(tags=["gpu"], retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_SECONDS,
               retry_condition_fn=retry_if_transient, persist_result=True, result_serializer="json")


@task(name="evaluate", task_run_name="evaluate[eta={eta}]", cache_key_fn=stage_cache_key("score"), **_POLICY)
def evaluate(ckpt: stages.CheckpointRef, e_ref: ArtifactRef, v_ref: ArtifactRef | None, eta: float,
             temperature: float, microbatch_size: int, dtype: str, device: str, root: str) -> ArtifactRef:
    """Per-token S, H on E at θ (eta 0, no v) or θ+ηv; progress shown per microbatch."""
    maybe_fault("evaluate_theta" if eta == 0 else "evaluate_eta", eta)
    where = "θ" if eta == 0 else f"θ+ηv, η={eta:g}"
    ref = stages.score(ckpt, e_ref, v_ref, eta=eta, temperature=temperature, microbatch_size=microbatch_size,
                       dtype=dtype, device=device, root=root, log=stage_log(),
                       progress=progress_artifact(f"teacher forcing E at {where}"))
    get_run_logger().info(f"scores at {where} -> {ref.path}")
    return ref


@task(name="estimate-linear", cache_key_fn=stage_cache_key("linear"), **_POLICY)
def estimate_linear(ckpt: stages.CheckpointRef, e_ref: ArtifactRef, v_ref: ArtifactRef, theta_ref: ArtifactRef,
                    quadratic: bool, variance_reduced: bool, fd_step: float, temperature: float, microbatch_size: int,
                    dtype: str, device: str, root: str) -> ArtifactRef:
    """ΔĤ'(0) (JVP, finite differences at ±fd_step, variance-reduced) and ΔĤ''(0). Keyed on the resolved
    fd_step (by default a tenth of the learning rate), not on eta_list, so a new η grid reuses it."""
    maybe_fault("linear")
    ref = stages.linear(ckpt, e_ref, v_ref, theta_ref, quadratic=quadratic, variance_reduced=variance_reduced,
                        fd_step=fd_step, temperature=temperature, microbatch_size=microbatch_size, dtype=dtype,
                        device=device, root=root, log=stage_log())
    get_run_logger().info(f"linear estimates (h={fd_step:g}) -> {ref.path}")
    return ref
