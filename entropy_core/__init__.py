"""entropy-core: exact, repeatable measurement of how one RL step changes a language model's entropy.

The public names below are imported on first use, so `import entropy_core` stays cheap and a
notebook can pull in only what it needs. The library never imports Prefect.
"""
from importlib import import_module

_EXPORTS = {
    "apply_global_precision": "precision", "str_to_dtype": "precision", "force_grads_fp32": "precision",
    "keep_norms_in_dtype": "precision",
    "get_trainable_named": "params", "get_optimizer_named_params": "params", "to_cpu_fp32_named": "params",
    "dot_named": "params", "build_functional_params_named": "params",
    "score_tokens": "scoring", "jvp_scores": "scoring", "TokenScores": "scoring",
    "compute_update_vector": "update", "UpdateResult": "update",
    "true_delta": "estimators", "linear_estimates": "estimators", "snis_delta": "estimators",
    "load_peft_for_probe": "loading", "load_adam_optimizer_from_path": "loading", "MODEL_REGISTRY": "loading",
    "SequenceProcessor": "sequences", "BatchedSequences": "sequences",
    "make_demo_checkpoint": "demo",
    "MeasureConfig": "config", "load_config": "config",
    "DetailedLogger": "logging",
    "EntropyMeasurements": "measure",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'entropy_core' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
