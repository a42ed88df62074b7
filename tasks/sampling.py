"""Tasks: sample the evaluation batch E and the update batch U from π_θ (one artifact each)."""
from __future__ import annotations

from prefect import get_run_logger, task

from entropy_core import stages
from entropy_core.artifacts import ArtifactRef
from entropy_core.config import DataConfig, GenerationConfig

from .common import (DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS, maybe_fault, progress_artifact,
                     retry_if_transient, stage_cache_key, stage_log)

_POLICY = dict(tags=["gpu"], retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_SECONDS,
               retry_condition_fn=retry_if_transient, persist_result=True, result_serializer="json")


@task(name="sample-E", cache_key_fn=stage_cache_key("sample_E"), **_POLICY)
def sample_E(ckpt: stages.CheckpointRef, data: DataConfig, generation: GenerationConfig, B_E: int, seed: int,
             dtype: str, device: str, root: str) -> ArtifactRef:
    """E: B_E prompts with replacement, one response each. Keyed without the estimator section."""
    maybe_fault("sample_E")
    done = progress_artifact(f"sampling E: {B_E} responses")    # generate has no progress hook: 0 -> 100 %
    ref = stages.sample_E(ckpt, data=data, generation=generation, B_E=B_E, seed=seed, dtype=dtype, device=device,
                          root=root, log=stage_log())
    done(1, 1)
    get_run_logger().info(f"E: {B_E} sequences -> {ref.path}")
    return ref


@task(name="sample-U", cache_key_fn=stage_cache_key("sample_U"), **_POLICY)
def sample_U(ckpt: stages.CheckpointRef, data: DataConfig, generation: GenerationConfig, B_U: int, G: int,
             max_resample_attempts: int, seed: int, dtype: str, device: str, root: str) -> ArtifactRef:
    """U: B_U prompts × G responses with rewards and Dr.GRPO advantages."""
    maybe_fault("sample_U")
    done = progress_artifact(f"sampling U: {B_U} × {G} responses")
    ref = stages.sample_U(ckpt, data=data, generation=generation, B_U=B_U, G=G,
                          max_resample_attempts=max_resample_attempts, seed=seed, dtype=dtype, device=device,
                          root=root, log=stage_log())
    done(1, 1)
    get_run_logger().info(f"U: {B_U}x{G} sequences -> {ref.path}")
    return ref
