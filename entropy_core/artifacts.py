"""Content-addressed safetensors store: how tensors travel between pipeline stages (DESIGN §3).

One artifact = two files under `root/<kind>/`:
    <sha256[:32]>.safetensors   the tensors; its name is the hash of its own bytes
    <sha256[:32]>.json          sidecar: kind, sha256, created, versions, tensors {name: [dtype, shape]},
                                inputs {name: content hash}, meta (the caller's JSON)
A stage returns an `ArtifactRef` (kind, sha256, absolute path): small, JSON-serialisable, and hashed by
its content hash, so Prefect caches on references and never on tensors (STYLE rule 8).

Guarantees
* Both files are written to a unique temp name in the same directory, flushed, fsync'ed, renamed with
  `os.replace` and the directory fsync'ed. A reader sees a whole file or none; any `OSError` (disk full,
  read-only directory) removes the temp file and raises `ArtifactWriteError` naming the path.
* Identical content gives the identical reference; an existing file that verifies is not rewritten, so
  concurrent writers of the same content (threads or processes) all succeed.
* Every read verifies the sha256 of the bytes (`ArtifactCorruptError` otherwise). The safetensors header
  stores the sha256 of the canonical JSON of (kind, meta, inputs), so the sidecar is verified as well,
  and equal tensors saved with different meta are different artifacts.
* Tensors are never hashed themselves: only the file bytes (hashing tensors in memory is slow and not
  stable across processes).

Non-tensor data (response texts, stats, the config section) goes in `meta`, which must be JSON: str keys,
finite floats, lists, dicts; tuples come back as lists, pydantic models and dataclasses are dumped.
safetensors caps its header at 100 MB, but meta lives in the sidecar, so only tensor count matters.
No pickle anywhere (STYLE rule 13).

Also here: `hash_file` / `hash_directory` (a checkpoint's content hash), `write_json_atomic` (results.json)
and the run-directory manifest that refuses reuse with a different config.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import threading
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
from safetensors.torch import load as load_safetensors_bytes   # safetensors, never pickle
import torch

__all__ = [
    "ArtifactRef", "ArtifactWriteError", "ArtifactCorruptError", "RunDirectoryConflict",
    "save_artifact", "load_artifact", "artifact_exists", "verify_artifact", "read_sidecar",
    "hash_file", "hash_directory", "write_json_atomic", "write_bytes_atomic", "write_run_manifest",
    "read_run_manifest",
    "RUN_MANIFEST_NAME",
]

RUN_MANIFEST_NAME = "run_manifest.json"
_HEADER_KEY = "entropy_core.descriptor_sha256"   # safetensors header: sha256 of canonical (kind, meta, inputs)
_SIDECAR_FORMAT = 1
_KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class ArtifactWriteError(OSError):
    """An artifact or JSON file could not be written; nothing was left under its final name."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        self.path, self.cause = str(path), cause
        reason = cause.strerror or str(cause)
        super().__init__(cause.errno, f"could not write {self.path}: {reason} ({type(cause).__name__}). "
                                      "Free disk space or choose a writable output directory.")

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):   # rebuild from (path, cause), e.g. when a worker ships the error to the flow
        return type(self), (self.path, self.cause)


class ArtifactCorruptError(ValueError):
    """An artifact's bytes or sidecar do not match its reference. Callers recompute it."""


class RunDirectoryConflict(ValueError):
    """A run directory was created with a different config than the one now given."""

    def __init__(self, message: str, path: str | os.PathLike, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.path, self.differences = str(path), differences

    def __reduce__(self):
        return type(self), (self.args[0], self.path, self.differences)


@dataclasses.dataclass(frozen=True, slots=True)
class ArtifactRef:
    """Reference to one stored artifact: what a stage returns and what caches key on.

    `hash()` is derived from `sha256` only, so it is the same in every process (str hashes are not).
    """
    kind: str
    sha256: str      # of the .safetensors file bytes
    path: str        # absolute path of the .safetensors file

    def __post_init__(self):
        if not _KIND_RE.match(self.kind or ""):
            raise ValueError(f"artifact kind {self.kind!r} must match {_KIND_RE.pattern} (it names a folder)")
        if not _SHA_RE.match(self.sha256 or ""):
            raise ValueError(f"sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if not os.path.isabs(self.path):
            raise ValueError(f"artifact path {self.path!r} must be absolute")

    def __hash__(self) -> int:
        return int(self.sha256[:16], 16)

    @property
    def sidecar_path(self) -> str:
        return self.path[: -len(".safetensors")] + ".json" if self.path.endswith(".safetensors") \
            else self.path + ".json"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "sha256": self.sha256, "path": self.path}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArtifactRef:
        missing = [k for k in ("kind", "sha256", "path") if k not in d]
        extra = sorted(set(d) - {"kind", "sha256", "path"})
        if missing or extra:
            raise ValueError(f"not an ArtifactRef dict: missing {missing}, unexpected {extra}")
        return cls(kind=d["kind"], sha256=d["sha256"], path=d["path"])


# ---------------------------------------------------------------------------------------------------
# JSON: one converter for meta, manifests and results; it lists every value it cannot store.

def _to_json(obj: Any, *, what: str) -> Any:
    """Plain-JSON copy of `obj`; raises ValueError listing every non-finite float / unsupported value."""
    problems: list[str] = []
    out = _convert(obj, "", problems)
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{what}: {len(problems)} value(s) cannot be written as JSON: {shown}")
    return out


def _convert(x: Any, path: str, problems: list[str]) -> Any:
    where = path or "<root>"
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, enum.Enum):
        return _convert(x.value, path, problems)
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        x = float(x)                                               # np.float64 is a float subclass
        if not math.isfinite(x):
            problems.append(f"{where} = {x!r} (non-finite float)")
            return None
        return float(x)
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                problems.append(f"{where}: key {k!r} is {type(k).__name__}; keys must be str")
                continue
            out[k] = _convert(v, f"{path}.{k}" if path else k, problems)
        return out
    if isinstance(x, (list, tuple)):
        return [_convert(v, f"{path}[{i}]", problems) for i, v in enumerate(x)]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (np.generic, np.ndarray)):
        return _convert(x.tolist(), path, problems)
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            return _convert(x.item(), path, problems)
        problems.append(f"{where}: tensor of shape {tuple(x.shape)}; put tensors in `tensors`, not in JSON")
        return None
    if hasattr(x, "model_dump"):                                   # pydantic model (a config section)
        return _convert(x.model_dump(mode="json"), path, problems)
    if isinstance(x, ArtifactRef):
        return x.to_dict()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _convert(dataclasses.asdict(x), path, problems)
    problems.append(f"{where}: unsupported type {type(x).__name__}")
    return None


def _canonical(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces, ASCII) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=None)
def _versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (cheap: imports nothing)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "safetensors", "entropy-core"):
        try:
            out[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out


# ---------------------------------------------------------------------------------------------------
# Atomic writes

def _fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename durable: fsync the directory entry (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """temp file in the same directory -> write, flush, fsync -> os.replace -> fsync the directory.

    The temp name is unique per process and thread, so concurrent writers never share one.
    Raises ArtifactWriteError (after removing the temp file) on any OSError.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
    created = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # umask applies, unlike mkstemp
        created = True
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        created = False
        _fsync_dir(path.parent)
    except BaseException as e:
        if created:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, ArtifactWriteError):
            raise ArtifactWriteError(path, e) from e
        raise


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactWriteError(directory, e) from e


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write `obj` as strict JSON (temp + fsync + rename); creates parent folders.

    Raises: ValueError listing every NaN/inf or unsupported value (by dotted path); nothing is written.
            ArtifactWriteError on any OSError.
    """
    path = Path(path)
    data = json.dumps(_to_json(obj, what=str(path)), indent=indent, allow_nan=False) + "\n"
    _mkdir(path.parent)
    _write_bytes_atomic(path, data.encode("utf-8"))
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` (unique temp name + fsync + rename), creating parent folders; concurrent
    writers of the same path never share a temp file, and a reader sees a whole file or the old one.

    Raises: ArtifactWriteError on any OSError (the temp file is removed).
    """
    path = Path(path)
    _mkdir(path.parent)
    _write_bytes_atomic(path, data)
    return path


# ---------------------------------------------------------------------------------------------------
# Hashing: file bytes only

def hash_file(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    """sha256 hex digest of a file's bytes, read in `chunk`-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_directory(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    """Content hash of a directory tree, e.g. a checkpoint folder (the model cache key, STYLE rule 8).

    Included: every file at any depth, hidden ones too, in sorted order of its POSIX relative path;
    for each, the path (UTF-8), a NUL, its size (8 bytes little-endian), then its bytes. Symlinks to
    files are followed (HF cache snapshots are symlinks). Not included: empty directories, mtimes,
    permissions. Raises ValueError for anything that is not a regular file (broken symlinks, sockets,
    symlinks to directories) rather than skipping it.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"hash_directory: {root} is not a directory")
    files, odd = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                odd.append(os.path.relpath(os.path.join(dirpath, name), root) + " (symlink to a directory)")
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            if os.path.isfile(full):
                files.append((rel, full))
            else:
                odd.append(rel + (" (broken symlink)" if os.path.islink(full) else " (not a regular file)"))
    if odd:
        raise ValueError(f"hash_directory({root}): {len(odd)} entries are not regular files and would be "
                         f"left out of the hash: {', '.join(sorted(odd))}. Remove them or hash the target.")
    h = hashlib.sha256(b"entropy_core.hash_directory/v1\n")
    for rel, full in sorted(files):
        size = os.path.getsize(full)
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + size.to_bytes(8, "little"))
        n = 0
        with open(full, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
                n += len(block)
        if n != size:
            raise RuntimeError(f"hash_directory: {full} changed size while being hashed ({size} -> {n} bytes)")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Artifacts: save / load / exists / verify

def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous, no two tensors sharing storage (safetensors refuses shared storage)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict name -> torch.Tensor, got {type(tensors).__name__}")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in tensors.items()
           if not isinstance(k, str) or not k or k == "__metadata__" or not isinstance(v, torch.Tensor)]
    bad += [f"{k!r}: sparse layout {v.layout}" for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.layout != torch.strided]
    if bad:
        raise ValueError(f"{len(bad)} entries of `tensors` cannot be stored (need non-empty str name -> dense "
                         f"torch.Tensor; non-tensor data goes in meta): {', '.join(bad)}")
    out = {k: v.detach().to("cpu").resolve_conj().resolve_neg().contiguous() for k, v in tensors.items()}
    owners: dict[int, list[str]] = {}
    for k, v in out.items():
        if v.numel():
            owners.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    for names in owners.values():
        if len(names) > 1:
            for k in names:
                out[k] = out[k].clone()
    return out


def _inputs_json(inputs: Mapping[str, ArtifactRef | str] | None) -> dict[str, dict[str, str] | str]:
    out: dict[str, Any] = {}
    for name, ref in (inputs or {}).items():
        if isinstance(ref, ArtifactRef):
            out[name] = {"kind": ref.kind, "sha256": ref.sha256}   # no path: the same input elsewhere is equal
        elif isinstance(ref, str):
            out[name] = ref                                           # e.g. hash_directory(checkpoint)
        else:
            raise TypeError(f"inputs[{name!r}] must be an ArtifactRef or a content-hash str, "
                            f"got {type(ref).__name__}")
    return out


def _descriptor_sha(kind: str, meta: Any, inputs: Any) -> str:
    return hashlib.sha256(_canonical({"kind": kind, "meta": meta, "inputs": inputs})).hexdigest()


def _has_hash(path: Path, sha: str, size: int) -> bool:
    try:
        return os.path.getsize(path) == size and hash_file(path) == sha
    except FileNotFoundError:
        return False


def save_artifact(root: str | os.PathLike, kind: str, tensors: Mapping[str, torch.Tensor],
                  meta: Mapping[str, Any] | None = None, *,
                  inputs: Mapping[str, ArtifactRef | str] | None = None) -> ArtifactRef:
    """Store tensors (+ JSON meta) under `root/<kind>/<sha256[:32]>.safetensors` and return its reference.

    Args:   tensors: name -> tensor, any dtype/device (stored on CPU, contiguous, exactly as given).
            meta:    JSON-able provenance and non-tensor data (config section, stats, response texts).
            inputs:  name -> ArtifactRef or content-hash str of what this artifact was computed from.
    Returns: ArtifactRef; the same content (tensors, kind, meta, inputs) always gives the same ref.
    Raises:  ValueError for tensors/meta that cannot be stored (every offender listed);
             ArtifactWriteError on any OSError, leaving nothing under the final names.
    """
    if not _KIND_RE.match(kind or ""):
        raise ValueError(f"artifact kind {kind!r} must match {_KIND_RE.pattern} (it names a folder)")
    prepared = _prepare_tensors(tensors)
    meta_json = _to_json(dict(meta or {}), what=f"meta of artifact kind {kind!r}")
    inputs_json = _inputs_json(inputs)
    descriptor = _descriptor_sha(kind, meta_json, inputs_json)
    data = safetensors.torch.save(prepared, metadata={_HEADER_KEY: descriptor})
    sha = hashlib.sha256(data).hexdigest()
    directory = Path(os.path.abspath(root)) / kind
    ref = ArtifactRef(kind=kind, sha256=sha, path=str(directory / f"{sha[:32]}.safetensors"))

    _mkdir(directory)
    if not _has_hash(Path(ref.path), sha, len(data)):   # missing or corrupt -> (re)write; else keep as is
        _write_bytes_atomic(Path(ref.path), data)
    try:
        _check_sidecar(ref, descriptor)
    except (ArtifactCorruptError, FileNotFoundError):
        sidecar = {
            "format": _SIDECAR_FORMAT, "kind": kind, "sha256": sha, "created": _now(), "versions": _versions(),
            "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in prepared.items()},
            "inputs": inputs_json, "meta": meta_json,
        }
        _write_bytes_atomic(Path(ref.sidecar_path), (json.dumps(sidecar, indent=1) + "\n").encode("utf-8"))
    return ref


def _header_descriptor(data: bytes, ref: ArtifactRef) -> str:
    """The descriptor hash stored in the safetensors header by save_artifact."""
    try:
        n = int.from_bytes(data[:8], "little")
        value = json.loads(data[8:8 + n]).get("__metadata__", {}).get(_HEADER_KEY)
    except (ValueError, AttributeError) as e:
        raise ArtifactCorruptError(f"{ref.path}: unreadable safetensors header ({e})") from e
    if not isinstance(value, str):
        raise ArtifactCorruptError(f"{ref.path}: no {_HEADER_KEY} in its header; not written by save_artifact")
    return value


def _check_sidecar(ref: ArtifactRef, descriptor: str) -> dict[str, Any]:
    """Parse the sidecar and check it belongs to `ref` (kind, sha256, and the descriptor hash)."""
    try:
        with open(ref.sidecar_path, "rb") as f:
            sidecar = json.loads(f.read())
    except FileNotFoundError as e:
        raise ArtifactCorruptError(f"{ref.path}: sidecar {ref.sidecar_path} is missing") from e
    except ValueError as e:
        raise ArtifactCorruptError(f"{ref.path}: sidecar {ref.sidecar_path} is not valid JSON ({e})") from e
    if not isinstance(sidecar, dict) or not {"kind", "sha256", "meta", "inputs"} <= set(sidecar):
        raise ArtifactCorruptError(f"{ref.path}: sidecar {ref.sidecar_path} lacks kind/sha256/meta/inputs")
    if sidecar["kind"] != ref.kind or sidecar["sha256"] != ref.sha256:
        raise ArtifactCorruptError(f"{ref.path}: sidecar says kind={sidecar['kind']!r} sha256={sidecar['sha256']}, "
                                   f"reference says kind={ref.kind!r} sha256={ref.sha256}")
    actual = _descriptor_sha(sidecar["kind"], sidecar["meta"], sidecar["inputs"])
    if actual != descriptor:
        raise ArtifactCorruptError(f"{ref.path}: sidecar meta/inputs were modified: their hash is {actual}, "
                                   f"the artifact header expects {descriptor}")
    return sidecar


def _check_hash(ref: ArtifactRef, actual: str) -> None:
    if actual != ref.sha256:
        raise ArtifactCorruptError(f"{ref.path}: sha256 mismatch, expected {ref.sha256}, got {actual}. "
                                   "The file is corrupt or was modified; delete it and recompute the stage.")


def _missing(ref: ArtifactRef, e: FileNotFoundError) -> FileNotFoundError:
    return FileNotFoundError(e.errno, f"artifact {ref.kind}/{ref.sha256[:12]} is missing: {ref.path}. "
                             "Recompute the stage that produced it.", ref.path)


def _read(ref: ArtifactRef, n: int | None = None) -> bytes:
    try:
        with open(ref.path, "rb") as f:
            return f.read() if n is None else f.read(n)
    except FileNotFoundError as e:
        raise _missing(ref, e) from e


def read_sidecar(ref: ArtifactRef) -> dict[str, Any]:
    """The full verified sidecar: format, kind, sha256, created, versions, tensors, inputs, meta."""
    head = _read(ref, n=8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    return _check_sidecar(ref, _header_descriptor(_read(ref, n=8 + n), ref))


def load_artifact(ref: ArtifactRef) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read, verify and return (tensors on CPU, meta) exactly as saved (JSON tuples come back as lists).

    Raises: FileNotFoundError if the file is gone; ArtifactCorruptError if the bytes do not hash to
            ref.sha256 (names path, expected and actual hash) or the sidecar is missing/invalid/modified.
    """
    data = _read(ref)
    _check_hash(ref, hashlib.sha256(data).hexdigest())
    sidecar = _check_sidecar(ref, _header_descriptor(data, ref))
    return load_safetensors_bytes(data), sidecar["meta"]


def verify_artifact(ref: ArtifactRef) -> None:
    """Hash the file (streamed) and check the sidecar; raise as `load_artifact` does, return None if sound."""
    try:
        actual = hash_file(ref.path)
    except FileNotFoundError as e:
        raise _missing(ref, e) from e
    _check_hash(ref, actual)
    read_sidecar(ref)


def artifact_exists(ref: ArtifactRef) -> bool:
    """True iff the file is present, hashes to ref.sha256 and its sidecar verifies.

    A corrupt or half-written artifact counts as absent, so callers recompute it. Other OSErrors
    (e.g. permission denied) propagate: recomputing would not fix them.
    """
    try:
        verify_artifact(ref)
    except (FileNotFoundError, ArtifactCorruptError):
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# Run directory: remember the config that produced it, refuse a different one (STYLE rule 13)

def _diff(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Differences between two JSON values as (dotted path, old, new); absent keys appear as `_ABSENT`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            sub = f"{path}.{k}" if path else k
            if k in old and k in new:
                out += _diff(old[k], new[k], sub)
            else:
                out.append((sub, old.get(k, _ABSENT), new.get(k, _ABSENT)))
        return out
    return [] if old == new and type(old) is type(new) else [(path or "<root>", old, new)]


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _show(value: Any, limit: int = 200) -> str:
    s = repr(value) if value is _ABSENT else json.dumps(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def read_run_manifest(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest written by `write_run_manifest` ({config, created, versions}), or None if absent."""
    path = Path(run_dir) / RUN_MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise RunDirectoryConflict(f"{path} is not valid JSON ({e}). Delete it, or pass another output_dir.",
                                   path, []) from e
    if not isinstance(manifest, dict) or "config" not in manifest:
        raise RunDirectoryConflict(f"{path} is not a run manifest (no 'config' key). Delete it, or pass "
                                   "another output_dir.", path, [])
    return manifest


def write_run_manifest(run_dir: str | os.PathLike, config: Any, *,
                       allow_changes: Iterable[str] = ()) -> Path:
    """Record the resolved config in `run_dir/run_manifest.json`; refuse to reuse the folder with another one.

    Args:   config: the resolved config (dict, pydantic model or dataclass; stored as JSON).
            allow_changes: dotted prefixes (e.g. "estimator.eta_list") that may differ from the manifest;
                           if only those differ, the manifest is updated to the new config.
    Returns: path of the manifest.
    Raises:  RunDirectoryConflict listing every differing key with both values, and the fix.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_MANIFEST_NAME
    new = _to_json(config, what=f"config for {run_dir}")
    old = read_run_manifest(run_dir)
    if old is not None:
        diffs = _diff(old["config"], new)
        if not diffs:
            return path
        allowed = tuple(allow_changes)
        blocking = [d for d in diffs if not any(d[0] == a or d[0].startswith(a + ".") or d[0].startswith(a + "[")
                                                for a in allowed)]
        if blocking:
            lines = "\n".join(f"  {k}: manifest={_show(a)}, now={_show(b)}" for k, a, b in blocking)
            raise RunDirectoryConflict(
                f"run directory {run_dir} was created with a different config ({len(blocking)} key(s) differ):\n"
                f"{lines}\nFix: pass another output_dir, or delete {path} to reuse this directory with the new "
                "config (artifacts are content-addressed, so cached ones stay valid).", path, blocking)
    write_json_atomic(path, {"config": new, "created": _now(), "versions": _versions()})
    return path
