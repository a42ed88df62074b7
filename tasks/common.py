"""What every stage task shares: the retry policy, the cache key, fault injection for tests.

Retry policy (STYLE rule 9): only transient failures are retried. `retry_if_transient` returns False
for configuration and validation errors (ConfigError and every other ValueError subclass: ScoringError,
NonFiniteResultError, DatasetError, RewardError, OptimizerStateError, a corrupt artifact), missing
files, type errors and other bugs; True for RuntimeError (CUDA faults, an OOM that survived the
library's microbatch halving) and OSErrors such as a full disk or a dropped network filesystem.

Cache key (STYLE rule 8): `stage_cache_key(stage)` hashes, through `entropy_core.stages.stage_key`,
the task's parameters — input references by content hash, config sections as JSON, plain values —
plus the entropy_core code version and this package's source hash. Never tensors or models. A cached
result whose artifact is missing or corrupt (artifact_exists False) is dropped from the result store
while the key is computed, so the task runs again and rewrites it.

Fault injection (tests only): ENTROPY_CORE_FAULT="stage:N" raises a transient InjectedFault the first
N times this process reaches `stage`; "stage:sleep=S" sleeps S seconds there (after touching the file
named by ENTROPY_CORE_FAULT_SIGNAL, if set). Several entries are comma-separated. Stage names:
checkpoint, sample_E, sample_U, update, evaluate_theta, evaluate_eta (or evaluate_eta@<η>), linear,
estimate.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from entropy_core import stages
from entropy_core.logging import DetailedLogger

DEFAULT_RETRIES = 2                      # = PipelineConfig defaults; the flow applies cfg.pipeline
DEFAULT_RETRY_DELAY_SECONDS = [5, 30]
NOT_KEYED = ("root",)                    # where a stage writes, not what it computes
_NOT_TRANSIENT = (ValueError, TypeError, KeyError, AttributeError, NotImplementedError, AssertionError,
                  FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ImportError)


class InjectedFault(RuntimeError):
    """A transient failure injected by ENTROPY_CORE_FAULT (tests)."""


# ------------------------------------------------------------------------------------------------ retries
def is_transient(exc: BaseException) -> bool:
    """Whether retrying could help: runtime faults and I/O hiccups yes, wrong inputs and bugs never."""
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    return isinstance(exc, (RuntimeError, OSError, TimeoutError, ConnectionError, MemoryError))


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only when the failure is transient (see module docstring)."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


# ------------------------------------------------------------------------------------------------ cache
def _source_version() -> str:
    h = hashlib.sha256()
    for p in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


_TASKS_VERSION = _source_version()


def _drop_stale_record(store, key: str) -> None:
    """Delete the cached record under `key` if its result no longer points at sound files."""
    try:
        if not store.exists(key):
            return
        valid = stages.ref_is_valid(store.read(key).result)
    except Exception:          # an unreadable record is as good as none
        valid = False
    if valid:
        return
    get_run_logger().warning(f"cached result {key} points at a missing or corrupt artifact; recomputing")
    for storage in (store.metadata_storage, store.result_storage):
        resolve = getattr(storage, "_resolve_path", None)
        if resolve is not None:
            Path(resolve(key)).unlink(missing_ok=True)
    store.cache.pop(store._resolved_key_path(key), None)


def stage_cache_key(stage: str, extra: Callable[[dict], Any] | None = None):
    """A Prefect cache_key_fn for `stage`: stage_key over the task's parameters (minus NOT_KEYED), plus
    `extra(parameters)` when given (e.g. the checkpoint files' fingerprint)."""
    def key_fn(ctx, parameters: dict) -> str:
        inputs = {k: v for k, v in parameters.items() if k not in NOT_KEYED}
        if extra is not None:
            inputs["_extra"] = extra(parameters)
        key = stages.stage_key(stage, inputs, salt=_TASKS_VERSION)
        _drop_stale_record(ctx.result_store, key)
        return key
    return key_fn


# ------------------------------------------------------------------------------------------------ helpers
_LOG = DetailedLogger(None)              # mirrors to the `entropy_core` logger, which the flow shows


def stage_log() -> DetailedLogger:
    return _LOG


def progress_artifact(description: str) -> Callable[[int, int], None]:
    """A Prefect progress artifact (0-100 %) and the progress(done, total) callback that moves it."""
    artifact_id = create_progress_artifact(progress=0.0, description=description)

    def update(done: int, total: int) -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1))
    return update


_FAULT_LOCK = threading.Lock()
_FAULT_COUNTS: dict[str, int] = {}


def maybe_fault(stage: str, eta: float | None = None) -> None:
    """Apply ENTROPY_CORE_FAULT entries that name this stage (see the module docstring)."""
    spec = os.environ.get("ENTROPY_CORE_FAULT", "").strip()
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        target, _, action = entry.rpartition(":")
        name, _, at = target.partition("@")
        if name != stage or (at and (eta is None or float(at) != eta)):
            continue
        if action.startswith("sleep="):
            signal = os.environ.get("ENTROPY_CORE_FAULT_SIGNAL")
            if signal:
                Path(signal).touch()
            time.sleep(float(action.removeprefix("sleep=")))
            continue
        with _FAULT_LOCK:
            done = _FAULT_COUNTS.get(entry, 0)
            if done < int(action):
                _FAULT_COUNTS[entry] = done + 1
                raise InjectedFault(f"injected transient fault {done + 1}/{action} in {target} (ENTROPY_CORE_FAULT)")
