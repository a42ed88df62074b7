"""The measurement's stages as plain functions: config sections and references in, one reference out.

Both runners call exactly these functions in the same order, so they give identical numbers:
`EntropyMeasurements` (entropy_core/measure.py, no Prefect) and the Prefect tasks in `tasks/`
(one thin adapter per stage). Stage by stage, with the artifact each one writes (DESIGN §1, §3):

    resolve_checkpoint   checkpoint section -> CheckpointRef (adapter dir, optimizer.pt, content hash);
                         builds the demo checkpoint once when checkpoint.adapter is null
    sample_E / sample_U  π_θ samples E (B_E prompts, one response each) and U (B_U × G, rewards)
                         -> artifact "E" / "U" (a BatchedSequences)
    update_vector        v = Δθ/lr of one AdamW step on U (DESIGN §1.1) -> "update_vector",
                         keys = the model's parameter names, stats in meta
    score                teacher-forced S, H per token at θ (eta = 0) or θ+ηv -> "scores"
    linear               exact / finite-difference / variance-reduced slope and curvature -> "linear"
    estimate             SNIS ΔĤ(η) for every η, Ĥ(θ), and the per-sequence table -> "estimates"

Artifacts live under `<output_dir>/artifacts/<kind>/` (content-addressed, entropy_core.artifacts).
`stage_key` is the cache key of a stage: its input references' content hashes, the JSON of its config
values, the resolved device and the code version (this module and what it imports), never a tensor or
a model (STYLE rule 8). The model is loaded once per
process into `_MODELS`, keyed by (checkpoint content hash, dtype, device), and never pickled.

A CUDA out-of-memory error in teacher forcing or in the gradient pass halves the microbatch and
retries (down to 1); the microbatch actually used is recorded in the artifact's meta.

Under torch.distributed (world > 1, e.g. `torchrun -m entropy_core.measure`), every rank calls every
stage in the same order, and each stage is rank-aware (entropy_core.distributed):
    resolve_checkpoint, sample_E, sample_U, attribution, estimate
                 rank 0 alone (E and U are then exactly the one-process batches of this seed);
    update_vector  each rank backpropagates its U prompt groups, the float64 gradient is all-reduced;
    score, linear  each rank scores its contiguous rows of E, the per-token scores are all-gathered.
Rank 0 writes every artifact and broadcasts its reference, which also orders the other ranks after
the write. `stage_key` of the sharded stages (SHARDED_STAGES) includes the world size: sharding
changes the length buckets, hence the round-off. No OOM halving there: ranks must stay in step.
"""
from __future__ import annotations

import ast
import dataclasses
import gc
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from .artifacts import (ArtifactRef, ArtifactWriteError, artifact_exists, hash_directory, hash_file, load_artifact,
                        read_sidecar, save_artifact, write_run_manifest)
from .checkpoints import resolve_checkpoint_section
from .config import DEMO_BASE, CheckpointConfig, DataConfig, GenerationConfig, MeasureConfig, UpdateConfig, \
    dump_config
from .data import get_reward_fn, load_dataset_split
from .distributed import (distributed_linear_estimates, distributed_score_tokens, distributed_update_vector,
                          rank_and_world, run_on_rank0)
from .estimators import default_fd_step, entropy_base, ess, linear_estimates, snis_delta
from .estimators.attribution import attribute, covariance_proxy, spearman
from .fastpaths import auto_token_budget
from .loading import check_checkpoint_files, load_adam_optimizer_from_path, load_peft_for_probe, resolve_base_model
from .logging import DetailedLogger
from .report import ATTR_CSV_NAME, ATTR_PLOT_NAME, CSV_NAME, PLOT_NAME, RESULTS_NAME
from .scoring import ScoringError, TokenScores, score_tokens
from .sequences import BatchedSequences, SequenceProcessor
from .update import UpdateResult, compute_update_vector

__all__ = [
    "CheckpointRef", "RunDir", "NonFiniteResultError", "prepare_run", "check_inputs", "stage_key", "code_version",
    "derive_seed", "SHARDED_STAGES", "on_rank0",
    "resolve_device", "ref_is_valid", "checkpoint_fingerprint", "demo_checkpoint_dir", "resolve_checkpoint",
    "get_model", "clear_model_cache", "resolve_fd_step", "load_batch", "load_scores", "sample_E", "sample_U",
    "update_vector", "score", "linear", "attribution", "estimate", "RESULTS_NAME", "CSV_NAME", "PLOT_NAME",
]

# Keys of the config a run directory may be reused with: none of them changes E, U, v or the θ pass.
RERUN_MAY_CHANGE = ("output_dir", "estimator", "pipeline", "logging", "gpus")
# Stages whose work is split across torch.distributed ranks: their keys include the world size.
SHARDED_STAGES = ("update_vector", "score", "linear")
_NULL_LOG = DetailedLogger(None)
T = TypeVar("T")
AUTO_OOM_ROWS = 8          # rows per microbatch after an "auto" microbatch ran out of device memory
Progress = Callable[[int, int], None]          # progress(done, total)


class NonFiniteResultError(ValueError):
    """An estimate came out NaN or inf: never a result (DESIGN §2.9). Not retried."""


# ------------------------------------------------------------------------------------------------ run dir
@dataclass(frozen=True)
class RunDir:
    """Absolute paths of one run: output_dir, its artifact store and its results.json."""
    output_dir: Path
    artifacts: Path
    results: Path

    @classmethod
    def at(cls, output_dir: str | os.PathLike) -> RunDir:
        """The paths of the run in output_dir (absolute; nothing is created)."""
        out = Path(output_dir).expanduser().resolve()
        return cls(output_dir=out, artifacts=out / "artifacts", results=out / RESULTS_NAME)


def prepare_run(cfg: MeasureConfig) -> RunDir:
    """Create output_dir, record the config in its manifest, and remove a previous run's outputs.

    Removing results.json / the CSV / the plot first means a run that fails leaves no results.json
    (artifacts and caches stay: they are content-addressed and reused).
    Raises: RunDirectoryConflict (a ValueError) when output_dir was made with a config that differs
            outside RERUN_MAY_CHANGE (both values listed); ArtifactWriteError (an OSError) naming output_dir
            when it cannot be created or written.
    """
    out = Path(cfg.output_dir).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:                   # under a file, read-only, no space: one message naming the folder
        raise ArtifactWriteError(out, e) from e
    write_run_manifest(out, dump_config(cfg), allow_changes=RERUN_MAY_CHANGE)
    for name in (RESULTS_NAME, CSV_NAME, PLOT_NAME, ATTR_CSV_NAME, ATTR_PLOT_NAME):
        (out / name).unlink(missing_ok=True)
    return RunDir.at(out)


# ------------------------------------------------------------------------------------------------ keys
@dataclass(frozen=True)
class CheckpointRef:
    """A resolved checkpoint: what to load, and its content hash (the model cache and stage keys use it).

    sha256 covers the base (registry name / Hub id, plus hash_directory for a local dir), the adapter
    directory (hash_directory) and optimizer.pt (hash_file).
    """
    base: str
    adapter: str
    optimizer: str
    qlora: bool
    sha256: str

    def __hash__(self) -> int:
        return int(self.sha256[:16], 16)


_CODE_VERSION: str | None = None


def _code_files() -> list[Path]:
    """This module and every entropy_core module it imports, directly or not (read from the source with
    ast, so the set does not depend on what else a process happened to import)."""
    pkg = Path(__file__).resolve().parent
    todo, seen = [Path(__file__).resolve()], set()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        here = path.parent.relative_to(pkg.parent).parts             # ("entropy_core", ...) of this file
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                parts = list(here[:len(here) - node.level + 1]) if node.level else []
                base = parts + (node.module.split(".") if node.module else [])
                names = [base + [a.name] for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".") for a in node.names]
            else:
                continue
            for mod in names:
                if mod and mod[0] == pkg.name:
                    rel = pkg.parent.joinpath(*mod)
                    todo += [rel.with_suffix(".py"), rel / "__init__.py"]
    return sorted(seen)


def code_version() -> str:
    """sha256 of the source of entropy_core.stages and every entropy_core module it imports (path + bytes):
    a change to the code that computes a stage invalidates its cache; other modules do not."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        root = Path(__file__).resolve().parent
        h = hashlib.sha256(b"entropy_core.code_version/v2\n")
        for p in _code_files():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
        _CODE_VERSION = h.hexdigest()
    return _CODE_VERSION


def _versions() -> dict[str, str | None]:
    out = {}
    for dist in ("torch", "transformers", "peft"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _keyable(x: Any, where: str) -> Any:
    """JSON form of a stage input for its cache key: references by content hash, sections as JSON."""
    if isinstance(x, ArtifactRef):
        return {"artifact": x.kind, "sha256": x.sha256}            # no path: same content elsewhere is equal
    if isinstance(x, CheckpointRef):
        return {"checkpoint": x.sha256}
    if isinstance(x, BaseModel):
        return x.model_dump(mode="json")
    if isinstance(x, Mapping):
        return {str(k): _keyable(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_keyable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, float):
        return repr(x)                                               # exact, and 1e-3 != 0.001000001
    if x is None or isinstance(x, (str, int, bool)):
        return x
    raise TypeError(f"stage_key: {where} is a {type(x).__name__}; a cache key holds references, config "
                    "sections and plain values only, never tensors or models (STYLE rule 8)")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda:<i>' when CUDA is available, else 'cpu'; 'cuda' -> 'cuda:<current device>'.

    The runners pass the resolved device to every stage, so a cache key says where a result was
    computed: a θ pass scored on CPU is never mixed with an η pass scored on a GPU (their round-off
    differs, and SNIS at small η would see it). Across torch.distributed ranks a CUDA device is always
    the rank's own (init_distributed set it from LOCAL_RANK).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" or (device.startswith("cuda") and rank_and_world()[1] > 1):
        device = f"cuda:{torch.cuda.current_device()}"
    return device


def _accelerator(device: Any) -> str | None:
    if isinstance(device, str) and device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))      # another GPU model: other kernels
    return None


def stage_key(stage: str, inputs: Mapping[str, Any], *, salt: str = "") -> str:
    """Cache key of one stage: '<stage>-<sha256[:32]>' of its inputs (see `_keyable`), the entropy_core
    code version, the torch/transformers/peft versions, the GPU model when inputs['device'] is a CUDA
    device, the world size for a sharded stage run across ranks, and `salt` (e.g. the task adapter's
    source hash)."""
    doc = {"stage": stage, "inputs": _keyable(dict(inputs), stage), "code": code_version(),
           "versions": _versions(), "accelerator": _accelerator(inputs.get("device")), "salt": salt}
    world = rank_and_world()[1]
    if stage in SHARDED_STAGES and world > 1:          # absent for one process: its keys stay as they were
        doc["world"] = world
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return f"{stage}-{hashlib.sha256(blob).hexdigest()[:32]}"


def ref_is_valid(x: Any) -> bool:
    """Whether a cached stage result still points at sound files (a missing/corrupt one is recomputed)."""
    if isinstance(x, ArtifactRef):
        return artifact_exists(x)
    if isinstance(x, CheckpointRef):
        return Path(x.adapter).is_dir() and Path(x.optimizer).is_file()
    if isinstance(x, (str, os.PathLike)):
        return Path(x).exists()
    return True


def on_rank0(fn: Callable[[], T]) -> T:
    """fn() on rank 0 only and its ArtifactRef / CheckpointRef on every rank (one process: fn())."""
    def decode(d: dict):
        return CheckpointRef(**d["checkpoint"]) if "checkpoint" in d else ArtifactRef.from_dict(d)

    def encode(x):
        return {"checkpoint": dataclasses.asdict(x)} if isinstance(x, CheckpointRef) else x.to_dict()
    return run_on_rank0(fn, encode=encode, decode=decode)


def derive_seed(seed: int, tag: str) -> int:
    """A 31-bit seed for one purpose (e.g. 'E/test'), so E and U never share a random stream."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{tag}".encode()).digest()[:4], "little") >> 1


# ------------------------------------------------------------------------------------------------ checkpoint
def _cache_root() -> Path:
    return Path(os.environ.get("ENTROPY_CORE_CACHE") or "~/.cache/entropy_core").expanduser()


def _demo_recipe(checkpoint: CheckpointConfig, data: DataConfig) -> dict:
    # the demo trains with make_demo_checkpoint's own (shaped) reward, given data.format_weight
    return {"base": checkpoint.base, "demo": checkpoint.demo.model_dump(mode="json"), "dataset": data.dataset,
            "split": data.split_U, "format_weight": data.format_weight}


def demo_checkpoint_dir(checkpoint: CheckpointConfig, data: DataConfig) -> Path:
    """Where the demo checkpoint for this recipe lives: $ENTROPY_CORE_CACHE/demo/<hash of the recipe>."""
    blob = json.dumps(_demo_recipe(checkpoint, data), sort_keys=True).encode()
    return _cache_root() / "demo" / hashlib.sha256(blob).hexdigest()[:16]


def _checkpoint_paths(checkpoint: CheckpointConfig, data: DataConfig) -> tuple[Path, Path]:
    if checkpoint.adapter is None:                     # config guarantees base == DEMO_BASE here
        d = demo_checkpoint_dir(checkpoint, data)
        return d / "adapter", d / "optimizer.pt"
    return Path(checkpoint.adapter).expanduser().resolve(), Path(checkpoint.optimizer).expanduser().resolve()


def _stat(p: Path) -> list | None:
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def checkpoint_fingerprint(checkpoint: CheckpointConfig, data: DataConfig) -> dict:
    """Cheap stand-in for the content hash (sizes and mtimes of the checkpoint's files), for cache keys:
    editing or replacing any file changes it, and nothing is read."""
    adapter, optimizer = _checkpoint_paths(checkpoint, data)
    files = {"optimizer": _stat(optimizer)}
    for root, name in ((adapter, "adapter"), (Path(checkpoint.base).expanduser(), "base")):
        if root.is_dir():
            files[name] = {p.relative_to(root).as_posix(): _stat(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return files


def resolve_checkpoint(checkpoint: CheckpointConfig, data: DataConfig, *, log: DetailedLogger | None = None
                       ) -> CheckpointRef:
    """Adapter + optimizer paths and the checkpoint's content hash; builds the demo checkpoint if needed.

    With checkpoint.adapter null (demo base only) the demo checkpoint is built once with
    `make_demo_checkpoint` into `demo_checkpoint_dir(...)` and reused afterwards.
    Raises: FileNotFoundError naming a missing adapter directory, optimizer file or base directory.
    Under torch.distributed, rank 0 resolves (and builds) it and the other ranks get its reference.
    """
    log = log or _NULL_LOG

    def resolve() -> CheckpointRef:
        ck = resolve_checkpoint_section(checkpoint)   # checkpoint.dir checked on disk, Trainer/nested layouts
        adapter, optimizer = _checkpoint_paths(ck, data)
        if ck.adapter is None and not (adapter.parent / "demo.json").is_file():
            from .demo import make_demo_checkpoint          # trains a few steps: only when it is missing
            d = ck.demo
            make_demo_checkpoint(adapter.parent, steps=d.steps, seed=d.seed, base=DEMO_BASE, lora_r=d.lora_r,
                                 lora_alpha=d.lora_alpha, target_modules=d.target_modules, lr=d.lr,
                                 weight_decay=d.weight_decay, B_U=d.B_U, G=d.G, max_new_tokens=d.max_new_tokens,
                                 dataset=data.dataset, split=data.split_U, format_weight=data.format_weight,
                                 log=lambda msg: log.log("demo_checkpoint", message=msg))
        missing = [f"{what} {p}" for what, p, ok in (("adapter directory", adapter, adapter.is_dir()),
                                                      ("optimizer file", optimizer, optimizer.is_file())) if not ok]
        if missing:
            raise FileNotFoundError(f"checkpoint not found: {'; '.join(missing)}. Set checkpoint.adapter and "
                                    "checkpoint.optimizer to a trained checkpoint")
        base_dir = Path(ck.base).expanduser()
        base = str(base_dir.resolve()) if base_dir.is_dir() else ck.base
        parts = {"base": base, "base_hash": hash_directory(base_dir) if base_dir.is_dir() else None,
                 "adapter": hash_directory(adapter), "optimizer": hash_file(optimizer), "qlora": ck.qlora}
        sha = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        ref = CheckpointRef(base=base, adapter=str(adapter), optimizer=str(optimizer), qlora=ck.qlora, sha256=sha)
        log.log("checkpoint", adapter=ref.adapter, optimizer=ref.optimizer, sha256=sha[:12])
        return ref
    return on_rank0(resolve)


def check_inputs(cfg: MeasureConfig) -> None:
    """Everything about the inputs that can be checked before any work, so that a bad checkpoint or data set
    stops the CLI at once (exit 2) with one message naming the file:

    * checkpoint: the base model directory (a local path needs config.json; a Hub id must be cached when
      offline; the demo name is not resolved, which would convert it), the adapter folder, and optimizer.pt
      read with torch.load(weights_only=True) and checked against the adapter's tensor count and shapes
      (`loading.check_checkpoint_files`). A demo checkpoint (adapter null) is built by the first stage.
    * data: both splits load (file, JSON per line, question/answer per record), split_U holds at least
      B_U prompts, and the reward resolves (its module imports, the function takes (response_text, gold)).
    * gpus: on CUDA, at least that many devices are visible.

    What needs the model loaded is checked when a stage loads it: an adapter made for a different base
    (shape mismatch) and the optimizer's name-by-name mapping fail the first stage that loads the model.
    Raises: FileNotFoundError, HubUnreachableError (an OSError), CheckpointLayoutError, OptimizerStateError,
            DatasetError, RewardError, ValueError, each naming the file, split or key.
    """
    ck = resolve_checkpoint_section(cfg.checkpoint)       # checkpoint.dir: its layout checked on disk
    if ck.adapter is not None:
        if ck.base != DEMO_BASE:
            resolve_base_model(ck.base)
        adapter, optimizer = _checkpoint_paths(ck, cfg.data)
        check_checkpoint_files(adapter, optimizer)
    data = cfg.data
    for split in dict.fromkeys((data.split_E, data.split_U)):
        n = len(_examples(data, split))
        if split == data.split_U and n < cfg.batches.B_U:
            raise ValueError(f"batches.B_U={cfg.batches.B_U} distinct prompts are needed, but data.split_U "
                             f"{split!r} of {data.dataset} has only {n}; lower batches.B_U or use a larger split")
    _reward_fn(data)
    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.gpus > 1 and on_gpu and cfg.gpus > torch.cuda.device_count():
        raise ValueError(f"gpus={cfg.gpus} processes need one GPU each, but {torch.cuda.device_count()} are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); lower gpus")


# ------------------------------------------------------------------------------------------------ model cache
_MODELS: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_VECTORS: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
_LOCK = threading.Lock()


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def get_model(ckpt: CheckpointRef, *, dtype: str, device: str = "auto"):
    """(model, tokenizer) for this checkpoint, loaded once per process and held in memory.

    One model is held at a time (a new key evicts the old one, so GPU memory holds one copy). In
    float64 every RMSNorm computes in float64: load_peft_for_probe applies `keep_norms_in_dtype`
    (HF's RMSNorm casts to float32), and tests/test_measure.py checks it.
    """
    key = (ckpt.sha256, dtype, device)
    with _LOCK:
        if key not in _MODELS:
            _MODELS.clear()
            _VECTORS.clear()
            _free_device_memory()
            model, tok = load_peft_for_probe(ckpt.base, ckpt.adapter, qlora=ckpt.qlora, dtype=dtype, device=device)
            _MODELS[key] = (model, tok)
        return _MODELS[key]


def clear_model_cache() -> None:
    """Drop the process-local model and update-vector caches."""
    with _LOCK:
        _MODELS.clear()
        _VECTORS.clear()
    _free_device_memory()


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _load_vector(v_ref: ArtifactRef, device: torch.device) -> dict[str, torch.Tensor]:
    """The update vector on `device`, read and verified once per process (every η pass reuses it)."""
    key = (v_ref.sha256, str(device))
    with _LOCK:
        if key not in _VECTORS:
            _VECTORS.clear()
            tensors, _ = load_artifact(v_ref)
            _VECTORS[key] = {n: t.to(device) for n, t in tensors.items()}
        return _VECTORS[key]


def _halving_on_oom(fn: Callable[[int | str], T], microbatch_size: int | str, *, what: str, log: DetailedLogger
                    ) -> tuple[T, int | str]:
    """fn(microbatch_size), halving the microbatch after each CUDA out-of-memory error, down to 1; an
    "auto" microbatch that ran out of memory goes on at AUTO_OOM_ROWS rows. Returns (result, the
    microbatch size that worked)."""
    mb = microbatch_size
    while True:
        try:
            return fn(mb), mb
        except torch.cuda.OutOfMemoryError:
            if mb == 1:
                raise
        # outside the except block: the traceback and the tensors its frames hold are released first
        _free_device_memory()
        smaller = AUTO_OOM_ROWS if mb == "auto" else mb // 2
        log.log("oom_retry", "minimal", stage=what, microbatch_size=mb, retry_with=smaller)
        mb = smaller


# ------------------------------------------------------------------------------------------------ data
def load_batch(ref: ArtifactRef) -> BatchedSequences:
    """The BatchedSequences stored by sample_E / sample_U (hash verified on read)."""
    tensors, meta = load_artifact(ref)
    return BatchedSequences.from_tensors(tensors, meta["batch"])


def load_scores(ref: ArtifactRef) -> TokenScores:
    """Per-token S, H (N, L) float64 and the mask stored by `score`."""
    t, _ = load_artifact(ref)
    return TokenScores(S=t["S"], H=t["H"], mask=t["mask"])


def _examples(data: DataConfig, split: str):
    return load_dataset_split(data.dataset, split, prompt_template=data.prompt_template, path=data.path,
                              limit=data.limit)


def _processor(model, tok, generation: GenerationConfig) -> SequenceProcessor:
    return SequenceProcessor(model, tok, max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
                             top_k=generation.top_k, top_p=generation.top_p, stop=generation.stop,
                             batch_size=generation.batch_size)


def _reward_fn(data: DataConfig):
    """The configured reward; data.format_weight is passed to it when it takes that keyword (gsm8k_tag,
    gsm8k_tag_shaped), since a user's (response_text, gold) function need not."""
    fn = get_reward_fn(data.reward)
    try:
        params = inspect.signature(fn.fn).parameters.values()
    except (TypeError, ValueError):      # no introspectable signature: call it as (response_text, gold)
        return fn
    if any(p.name == "format_weight" or p.kind is p.VAR_KEYWORD for p in params):
        return get_reward_fn(data.reward, format_weight=data.format_weight)
    return fn


def sample_E(ckpt: CheckpointRef, *, data: DataConfig, generation: GenerationConfig, B_E: int, seed: int,
             dtype: str, device: str, root: str | os.PathLike, log: DetailedLogger | None = None) -> ArtifactRef:
    """Evaluation batch E: B_E prompts of data.split_E drawn with replacement, one response each, from π_θ.
    The seed is derived from `seed` and the split name. Returns artifact "E". Under torch.distributed
    rank 0 samples alone: E is the one-process E of this seed."""
    log = log or _NULL_LOG

    def sample() -> ArtifactRef:
        examples = _examples(data, data.split_E)
        model, tok = get_model(ckpt, dtype=dtype, device=device)
        s = derive_seed(seed, f"E/{data.split_E}")
        batch = _processor(model, tok, generation).sample_E(examples, B_E, seed=s)
        meta = {"batch": batch.meta(), "split": data.split_E, "seed": s, "data": data, "generation": generation,
                "dtype": dtype, "tokens": batch.num_tokens}
        ref = save_artifact(root, "E", batch.to_tensors(), meta, inputs={"checkpoint": ckpt.sha256})
        log.log("sample_E", sequences=len(batch), tokens=batch.num_tokens, artifact=ref.sha256[:12])
        return ref
    return on_rank0(sample)


def sample_U(ckpt: CheckpointRef, *, data: DataConfig, generation: GenerationConfig, B_U: int, G: int,
             max_resample_attempts: int, seed: int, dtype: str, device: str, root: str | os.PathLike,
             log: DetailedLogger | None = None) -> ArtifactRef:
    """Update batch U: B_U distinct prompts of data.split_U, G responses each, rewards and Dr.GRPO
    advantages A = r − mean_group(r). Returns artifact "U". Under torch.distributed rank 0 samples alone."""
    log = log or _NULL_LOG

    def sample() -> ArtifactRef:
        examples = _examples(data, data.split_U)
        model, tok = get_model(ckpt, dtype=dtype, device=device)
        s = derive_seed(seed, f"U/{data.split_U}")
        batch = _processor(model, tok, generation).sample_U(examples, B_U, G, reward_fn=_reward_fn(data), seed=s,
                                                            max_resample_attempts=max_resample_attempts)
        r = batch.rewards
        meta = {"batch": batch.meta(), "split": data.split_U, "seed": s, "data": data, "generation": generation,
                "dtype": dtype, "tokens": batch.num_tokens, "rewards_mean": float(r.mean()),
                "rewards": [float(x) for x in r]}
        ref = save_artifact(root, "U", batch.to_tensors(), meta, inputs={"checkpoint": ckpt.sha256})
        log.log("sample_U", sequences=len(batch), tokens=batch.num_tokens, rewards_mean=float(r.mean()),
                artifact=ref.sha256[:12])
        return ref
    return on_rank0(sample)


# ------------------------------------------------------------------------------------------------ update
def update_vector(ckpt: CheckpointRef, u_ref: ArtifactRef, *, update: UpdateConfig, temperature: float, dtype: str,
                  device: str, root: str | os.PathLike, log: DetailedLogger | None = None) -> ArtifactRef:
    """v = Δθ/lr of one AdamW step for the Dr.GRPO loss on U, from the saved optimizer state (DESIGN §1.1).

    The optimizer is read here, the only stage that needs it, and freed when the stage returns.
    Returns artifact "update_vector": name -> float64 tensor (parameter names of the model), with the
    stats (norm, loss, grad_norm, clip_scale, ...), lr, the microbatch used and, under "parts", the
    reference of the "update_parts" artifact (preconditioner P and v_base, for attribution) in meta.
    Under torch.distributed each rank backpropagates its U prompt groups and the gradient is all-reduced
    (`distributed_update_vector`); v is then the same on every rank and rank 0 writes it.
    """
    log = log or _NULL_LOG
    model, _ = get_model(ckpt, dtype=dtype, device=device)
    optimizer = load_adam_optimizer_from_path(model, ckpt.optimizer)
    U = load_batch(u_ref)
    kw = dict(clip_norm=update.clip_norm, temperature=temperature, dropout=update.dropout)
    if rank_and_world()[1] > 1:
        res, mb = distributed_update_vector(model, optimizer, U, microbatch_size=update.microbatch_size, **kw), \
            update.microbatch_size
    else:
        res, mb = _halving_on_oom(lambda m: compute_update_vector(model, optimizer, U, microbatch_size=m, **kw),
                                  update.microbatch_size, what="update_vector", log=log)
    lrs = sorted({float(g["lr"]) for g in optimizer.param_groups if g["params"]})

    def write() -> ArtifactRef:
        parts = save_artifact(root, "update_parts", {**{f"precond/{n}": t for n, t in res.precond.items()},
                                                     **{f"base/{n}": t for n, t in res.base.items()}},
                              {"what": "P = −(1−β₁)/((1−β₁ᵗ)den) and v_base, DESIGN §1.6"},
                              inputs={"checkpoint": ckpt.sha256, "U": u_ref})
        meta = {"stats": res.stats, "lr": lrs, "update": update, "temperature": temperature, "dtype": dtype,
                "microbatch_used": mb, "rewards_mean": float(U.rewards.mean()), "parts": parts.to_dict()}
        return save_artifact(root, "update_vector", res.vector, meta, inputs={"checkpoint": ckpt.sha256, "U": u_ref})
    ref = on_rank0(write)
    log.log("update_vector", norm=res.stats["norm"], tensors=res.stats["num_tensors"], loss=res.stats["loss"],
            artifact=ref.sha256[:12])
    return ref


# ------------------------------------------------------------------------------------------------ scoring
def _teacher_force(model, batch: BatchedSequences, v, eta: float, *, temperature: float, microbatch_size: int | str,
                   log: DetailedLogger, progress: Progress | None) -> tuple[TokenScores, int | str]:
    """score_tokens over all of E in one call, so that rows sharing prompts (or a template's beginning)
    share their computation (`scoring.shared_prompt_passes`); progress after each forward; the
    microbatch halved on CUDA OOM (`_halving_on_oom`: the pass starts over). Returns the scores and the
    microbatch that worked: rows, or "auto (B tokens)"."""
    ids, am, rm = batch.input_ids, batch.attention_mask, batch.response_mask

    def run(mb: int | str) -> TokenScores:
        try:
            return score_tokens(model, ids, am, rm, v=v, eta=eta, temperature=temperature, microbatch_size=mb,
                                progress=progress)
        except ScoringError as e:
            raise ScoringError(f"{'θ pass' if v is None else f'θ+ηv pass at η={eta:g}'}: {e}") from e
    ts, mb = _halving_on_oom(run, microbatch_size, what="score", log=log)
    if mb == "auto":
        mb = f"auto ({auto_token_budget(model, width=int(am.sum(-1).max()), mode='score')} tokens)"
    return ts, mb


def score(ckpt: CheckpointRef, e_ref: ArtifactRef, v_ref: ArtifactRef | None = None, *, eta: float = 0.0,
          temperature: float, microbatch_size: int | str, dtype: str, device: str, root: str | os.PathLike,
          log: DetailedLogger | None = None, progress: Progress | None = None) -> ArtifactRef:
    """Teacher-forced S_{i,k}, H_{i,k} on E at θ (v_ref None, eta 0) or at θ+ηv (DESIGN §1.2).

    Returns artifact "scores": S, H (N, L) float64 and mask (N, L) bool, aligned with E's input_ids.
    Raises: ScoringError for an empty pass or a non-finite value; ValueError for eta != 0 without v.
    Under torch.distributed each rank scores its rows of E (`distributed_score_tokens`, gathered on
    every rank) and rank 0 writes the artifact; progress is then reported once, at the end.
    """
    log = log or _NULL_LOG
    if (v_ref is None) != (eta == 0):
        raise ValueError(f"score: the θ pass has eta=0 and no update vector, a θ+ηv pass both; got eta={eta}, "
                         f"v_ref={'set' if v_ref is not None else None}")
    model, _ = get_model(ckpt, dtype=dtype, device=device)
    E = load_batch(e_ref)
    v = _load_vector(v_ref, _model_device(model)) if v_ref is not None else None
    if rank_and_world()[1] > 1:
        ts, mb = distributed_score_tokens(model, E, v=v, eta=eta, temperature=temperature,
                                          microbatch_size=microbatch_size), microbatch_size
        if progress is not None:
            progress(len(E), len(E))
    else:
        ts, mb = _teacher_force(model, E, v, eta, temperature=temperature, microbatch_size=microbatch_size,
                                log=log, progress=progress)
    st = ts.per_sequence()
    H_hat = float(st.H.sum() / st.T.sum())
    meta = {"eta": eta, "temperature": temperature, "dtype": dtype, "microbatch_used": mb,
            "tokens": int(st.T.sum()), "sequences": len(E), "H_mean": H_hat}
    inputs = {"checkpoint": ckpt.sha256, "E": e_ref, **({"update_vector": v_ref} if v_ref is not None else {})}
    ref = on_rank0(lambda: save_artifact(root, "scores", {"S": ts.S, "H": ts.H, "mask": ts.mask}, meta,
                                         inputs=inputs))
    log.log("score", eta=eta, H=H_hat, tokens=meta["tokens"], artifact=ref.sha256[:12])
    return ref


def resolve_fd_step(fd_step: float | None, v_ref: ArtifactRef) -> float:
    """The finite-difference step h: the configured one, else `default_fd_step` of the checkpoint's
    learning rate (the largest of its param groups, read from the update vector's metadata). Not a
    function of the η grid, so changing only the grid leaves the linear stage cached."""
    if fd_step is not None:
        return float(fd_step)
    return default_fd_step(max(read_sidecar(v_ref)["meta"]["lr"]))


def _est(e) -> dict[str, float] | None:
    return None if e is None else {"value": e.value, "se": e.se}


def linear(ckpt: CheckpointRef, e_ref: ArtifactRef, v_ref: ArtifactRef, theta_ref: ArtifactRef, *, quadratic: bool,
           variance_reduced: bool, fd_step: float, temperature: float, microbatch_size: int | str, dtype: str,
           device: str, root: str | os.PathLike, log: DetailedLogger | None = None) -> ArtifactRef:
    """ΔĤ'(0) exactly (forward-mode JVP) and by central differences at ±fd_step, the variance-reduced
    slope, and with `quadratic` ΔĤ''(0) both ways (DESIGN §1.3, §1.4), on E, reusing the θ pass.

    Returns artifact "linear": per-sequence dS, dH (and d2S, d2H) (N,) float64; estimates in meta.
    Under torch.distributed the JVP and ±fd_step passes are sharded by rows of E and gathered
    (`distributed_linear_estimates`), the estimators run on the whole E, and rank 0 writes the artifact.
    """
    log = log or _NULL_LOG
    model, _ = get_model(ckpt, dtype=dtype, device=device)
    E = load_batch(e_ref)
    v = _load_vector(v_ref, _model_device(model))
    theta = load_scores(theta_ref)
    kw = dict(quadratic=quadratic, variance_reduced=variance_reduced, fd_step=fd_step, temperature=temperature,
              base_scores=theta)
    if rank_and_world()[1] > 1:
        res, mb = distributed_linear_estimates(model, E, v, microbatch_size=microbatch_size, **kw), microbatch_size
    else:
        res, mb = _halving_on_oom(lambda m: linear_estimates(model, E, v, microbatch_size=m, **kw),
                                  microbatch_size, what="linear", log=log)
    est = {"slope_exact": _est(res.slope_exact), "slope_fd": _est(res.slope_fd), "slope_vr": _est(res.slope_vr),
           "curvature": _est(res.curvature), "curvature_fd": _est(res.curvature_fd), "fd_step": res.fd_step}
    _check_finite(est, "linear estimates")
    st = res.scores.per_sequence()
    tensors = {k: getattr(st, k) for k in ("dS", "dH", "d2S", "d2H") if getattr(st, k) is not None}
    meta = {"estimates": est, "quadratic": quadratic, "variance_reduced": variance_reduced, "temperature": temperature,
            "dtype": dtype, "microbatch_used": mb}
    ref = on_rank0(lambda: save_artifact(root, "linear", tensors, meta, inputs={
        "checkpoint": ckpt.sha256, "E": e_ref, "update_vector": v_ref, "theta": theta_ref}))
    log.log("linear", slope=res.slope_exact.value, slope_fd=est["slope_fd"]["value"], artifact=ref.sha256[:12])
    return ref


# ------------------------------------------------------------------------------------------------ attribution
def attribution(ckpt: CheckpointRef, e_ref: ArtifactRef, u_ref: ArtifactRef, v_ref: ArtifactRef,
                theta_ref: ArtifactRef, *, groups: int, variance_reduced: bool, temperature: float,
                microbatch_size: int | str, dtype: str, device: str, root: str | os.PathLike,
                log: DetailedLogger | None = None) -> ArtifactRef:
    """Which U sequences drive the slope: c_i = ⟨∇Ĥ, v_i⟩ with its se over E (DESIGN §1.6), the
    variance-reduced column, and per sequence the covariance proxy −Cov(log π, A) beside it.

    Uses P and v_base stored by `update_vector`; one forward over E with a backward per surrogate, and
    one pass over U for every direction (which also gives U's per-token log-probs and entropies).
    Returns artifact "attribution": (N_U,) columns c, c_se, (c_vr, c_vr_se), advantage, reward, T,
    mean/min token log-prob, entropy, proxy; summary (base, slope, Spearman ρ(proxy, c)) in meta.
    Under torch.distributed rank 0 computes it alone.
    """
    log = log or _NULL_LOG

    def attribute_U() -> ArtifactRef:
        model, _ = get_model(ckpt, dtype=dtype, device=device)
        dev = _model_device(model)
        E, U, theta = load_batch(e_ref), load_batch(u_ref), load_scores(theta_ref)
        vt, vmeta = load_artifact(v_ref)
        parts, _ = load_artifact(ArtifactRef.from_dict(vmeta["parts"]))
        upd = UpdateResult(vector={n: t.to(dev) for n, t in vt.items()}, stats=vmeta["stats"],
                           precond={n: parts[f"precond/{n}"].to(dev) for n in vt})
        v_base = {n: parts[f"base/{n}"].to(dev) for n in vt}
        res, mb = _halving_on_oom(
            lambda m: attribute(model, E, U, upd, theta, v_base=v_base, groups=groups,
                                variance_reduced=variance_reduced, temperature=temperature, microbatch_size=m),
            microbatch_size, what="attribution", log=log)
        Ut = res.u_scores                                                     # per-token S, H of U at θ
        st, m = Ut.per_sequence(), Ut.mask
        token_S = Ut.S.masked_fill(~m, float("inf"))
        proxy = covariance_proxy(Ut.S, m, U.advantages)
        cols = {"c": res.c, "c_se": res.c_se, "advantage": U.advantages, "reward": U.rewards, "T": st.T,
                "logp_mean": st.S / st.T, "logp_min": token_S.min(-1).values, "entropy_mean": st.H / st.T,
                "prompt_index": U.prompt_index, "group": U.group, "proxy": proxy}
        if res.c_vr is not None:
            cols.update(c_vr=res.c_vr, c_vr_se=res.c_vr_se)
        summary = {"base": res.base, "slope": res.slope, "sum_c": float(res.c.sum()), "base_vr": res.base_vr,
                   "slope_vr": res.slope_vr, "spearman_proxy_c": spearman(proxy, res.c), "groups": groups,
                   "passes": res.passes}
        meta = {"summary": summary, "texts": list(U.texts), "microbatch_used": mb}
        ref = save_artifact(root, "attribution", cols, meta, inputs={"checkpoint": ckpt.sha256, "E": e_ref, "U": u_ref,
                                                                     "update_vector": v_ref, "theta": theta_ref})
        log.log("attribution", slope=res.slope, base=res.base, spearman=summary["spearman_proxy_c"],
                artifact=ref.sha256[:12])
        return ref
    return on_rank0(attribute_U)


# ------------------------------------------------------------------------------------------------ estimate
def _check_finite(obj: Any, what: str, path: str = "") -> None:
    bad: list[str] = []

    def walk(x, p):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(f"{p} = {x}")
        elif isinstance(x, Mapping):
            for k, y in x.items():
                walk(y, f"{p}.{k}" if p else str(k))
        elif isinstance(x, (list, tuple)):
            for i, y in enumerate(x):
                walk(y, f"{p}[{i}]")
    walk(obj, path)
    if bad:
        raise NonFiniteResultError(f"{what}: {len(bad)} non-finite values: {', '.join(bad)}. A NaN/inf estimate is "
                                   "never a result (DESIGN §2.9); with B_E < 2 no standard error exists")


def estimate(e_ref: ArtifactRef, theta_ref: ArtifactRef, eta_refs: Sequence[tuple[float, ArtifactRef]], *,
             v_ref: ArtifactRef, linear_ref: ArtifactRef | None, logw_clip: float | None, report_linear: bool,
             report_quadratic: bool, root: str | os.PathLike, log: DetailedLogger | None = None) -> ArtifactRef:
    """Ĥ(θ) and SNIS ΔĤ(η) for every η from the score artifacts (DESIGN §1.2), plus the linear / quadratic
    estimates and the update's stats, assembled into the body of results.json.

    E was sampled from π_θ itself, so u_i = 1 (logq is not used as a proposal); the ESS of
    exp(S(θ) − logq) is reported as a check that sampling and scoring are the same policy.
    Returns artifact "estimates": the per-sequence table (T, S, H, logw and H at each η, dS, dH) and,
    in meta, entropy / true / linear / quadratic / update / texts.
    Raises: NonFiniteResultError naming every non-finite estimate.
    Under torch.distributed rank 0 computes it alone (it reads artifacts only).
    """
    log = log or _NULL_LOG

    def assemble() -> ArtifactRef:
        E = load_batch(e_ref)
        base = load_scores(theta_ref).per_sequence()
        H0 = entropy_base(base)
        entropy = {"H_base": H0.value, "H_base_se": H0.se, "tokens": int(base.T.sum()), "sequences": len(E),
                   "proposal_ess": ess(base.S - E.logq),
                   "proposal_logq_max_abs_diff": float((base.S - E.logq).abs().max())}
        true, logw, H_eta = [], [], []
        for eta, ref in eta_refs:
            shifted = load_scores(ref).per_sequence()
            p = snis_delta(base, shifted, eta, logw_clip=logw_clip)
            true.append({"eta": p.eta, "delta_h": p.delta_h, "se": p.se, "ess": p.ess, "logw_min": p.logw_min,
                         "logw_median": p.logw_median, "logw_max": p.logw_max, "H_eta": p.H_eta,
                         "clip_fraction": p.clip_fraction})
            logw.append(shifted.S - base.S)                                 # (N,) log w at this η, DESIGN §1.2
            H_eta.append(shifted.H)
        tensors = {"prompt_index": E.prompt_index, "T": base.T, "S": base.S, "H": base.H, "logq": E.logq}
        if eta_refs:
            tensors.update(logw=torch.stack(logw, -1), H_eta=torch.stack(H_eta, -1))    # (N, n_eta)
        lin = quad = None
        if linear_ref is not None:
            lt, lmeta = load_artifact(linear_ref)
            tensors.update({k: lt[k] for k in ("dS", "dH") if k in lt})
            e = lmeta["estimates"]
            if report_linear:
                lin = {"slope_exact": e["slope_exact"]["value"], "slope_exact_se": e["slope_exact"]["se"],
                       "slope_fd": e["slope_fd"]["value"], "slope_fd_se": e["slope_fd"]["se"],
                       "slope_vr": (e["slope_vr"] or {}).get("value"), "slope_vr_se": (e["slope_vr"] or {}).get("se"),
                       "fd_step": e["fd_step"]}
            if report_quadratic and e["curvature"] is not None:
                quad = {"curvature": e["curvature"]["value"], "curvature_se": e["curvature"]["se"],
                        "curvature_fd": e["curvature_fd"]["value"], "curvature_fd_se": e["curvature_fd"]["se"]}
            for row in true:                                                # predictions beside the truth
                eta = row["eta"]
                row["pred_linear"] = eta * e["slope_exact"]["value"]
                if e["curvature"] is not None:
                    row["pred_quadratic"] = row["pred_linear"] + eta ** 2 * e["curvature"]["value"] / 2
        _, vmeta = load_artifact(v_ref)
        s = vmeta["stats"]
        update = {"norm": s["norm"], "num_tensors": s["num_tensors"], "loss": s["loss"], "grad_norm": s["grad_norm"],
                  "clip_scale": s["clip_scale"], "sequences": s["num_sequences"], "tokens": s["tokens"],
                  "lr": vmeta["lr"], "rewards_mean": vmeta["rewards_mean"]}
        body = {"entropy": entropy, "true": true, "linear": lin, "quadratic": quad, "update": update}
        _check_finite(body, "estimates")
        meta = {**body, "etas": [float(eta) for eta, _ in eta_refs], "texts": list(E.texts), "logw_clip": logw_clip}
        inputs = {"E": e_ref, "theta": theta_ref, "update_vector": v_ref,
                  **({"linear": linear_ref} if linear_ref is not None else {}),
                  **{f"eta[{eta!r}]": ref for eta, ref in eta_refs}}
        ref = save_artifact(root, "estimates", tensors, meta, inputs=inputs)
        log.log("estimate", H_base=H0.value, etas=len(true), artifact=ref.sha256[:12])
        return ref
    return on_rank0(assemble)
