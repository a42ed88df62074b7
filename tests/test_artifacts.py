"""entropy_core.artifacts: exact round trip, content addressing, corruption, failed writes, concurrency,
run-directory guard and strict JSON. Failed disks are simulated by monkeypatching `os` (tests run as root,
so chmod alone would not stop a write)."""
from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from entropy_core.artifacts import (
    RUN_MANIFEST_NAME, ArtifactCorruptError, ArtifactRef, ArtifactWriteError, RunDirectoryConflict,
    artifact_exists, hash_directory, hash_file, load_artifact, read_run_manifest, read_sidecar, save_artifact,
    verify_artifact, write_json_atomic, write_run_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def _tensors() -> dict[str, torch.Tensor]:
    base = torch.arange(12, dtype=torch.float32)
    return {
        "f64": torch.randn(3, 5, dtype=torch.float64),
        "f32": torch.randn(7),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16": torch.randn(3).to(torch.float16),
        "i64": torch.tensor([-(2 ** 62), 0, 2 ** 62 + 1]),
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0]),   # tensors may hold them; JSON may not
        "transposed": torch.randn(3, 4).t(),                               # non-contiguous
        "view_a": base[:6], "view_b": base[6:],                            # shared storage
        "grad": torch.randn(2, requires_grad=True),
    }


def _only_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.is_file())


def test_round_trip_is_exact(tmp_path):
    tensors = _tensors()
    meta = {"texts": ["2 + 2 = 4", "héllo"], "stats": {"norm": 1.5e-7, "n": 3}, "pair": (1, 2)}
    ref = save_artifact(tmp_path, "update", tensors, meta)
    loaded, loaded_meta = load_artifact(ref)
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        got = loaded[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        torch.testing.assert_close(got, t.detach(), rtol=0, atol=0, equal_nan=True, msg=name)
    assert loaded_meta == {**meta, "pair": [1, 2]}        # JSON: tuples come back as lists
    side = read_sidecar(ref)
    assert side["tensors"]["bf16"] == ["bfloat16", [4, 2]]
    assert side["sha256"] == ref.sha256 == hash_file(ref.path)
    assert side["versions"]["torch"] == torch.__version__
    assert Path(ref.path) == tmp_path / "update" / f"{ref.sha256[:32]}.safetensors"


def test_ref_is_small_stable_and_json(tmp_path):
    ref = save_artifact(tmp_path, "batch", {"x": torch.ones(3)}, {"a": 1})
    assert ArtifactRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    assert hash(ref) == int(ref.sha256[:16], 16)           # not str hashing: same in every process
    assert {ref: 1}[ArtifactRef(**ref.to_dict())] == 1
    with pytest.raises(ValueError, match="64 lowercase hex"):
        ArtifactRef(kind="batch", sha256="abc", path=ref.path)
    with pytest.raises(ValueError, match="unexpected"):
        ArtifactRef.from_dict({**ref.to_dict(), "extra": 1})


def test_same_content_same_ref_and_no_rewrite(tmp_path):
    tensors = {"v": torch.arange(10, dtype=torch.float64)}
    ref = save_artifact(tmp_path, "update", tensors, {"lr": 1e-3})
    before = [os.stat(p) for p in (ref.path, ref.sidecar_path)]
    time.sleep(0.01)
    again = save_artifact(tmp_path, "update", {"v": torch.arange(10, dtype=torch.float64)}, {"lr": 1e-3})
    after = [os.stat(p) for p in (ref.path, ref.sidecar_path)]
    assert again == ref
    assert [(s.st_ino, s.st_mtime_ns) for s in before] == [(s.st_ino, s.st_mtime_ns) for s in after]
    # meta and inputs are part of the content: different provenance, different artifact
    assert save_artifact(tmp_path, "update", tensors, {"lr": 2e-3}) != ref
    assert save_artifact(tmp_path, "update", tensors, {"lr": 1e-3}, inputs={"u": ref}) != ref
    assert read_sidecar(save_artifact(tmp_path, "update", tensors, {"lr": 1e-3}, inputs={"u": ref}))["inputs"] \
        == {"u": {"kind": "update", "sha256": ref.sha256}}


def test_flipped_byte_is_detected_and_repaired(tmp_path):
    tensors = {"v": torch.randn(64, dtype=torch.float64)}
    ref = save_artifact(tmp_path, "update", tensors, {})
    data = bytearray(Path(ref.path).read_bytes())
    data[-100] ^= 0x01                                      # one bit in the tensor data
    Path(ref.path).write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ArtifactCorruptError) as info:
        load_artifact(ref)
    assert ref.path in str(info.value) and ref.sha256 in str(info.value) and actual in str(info.value)
    assert not artifact_exists(ref)
    with pytest.raises(ArtifactCorruptError):
        verify_artifact(ref)
    assert save_artifact(tmp_path, "update", tensors, {}) == ref   # a corrupt file is rewritten
    assert artifact_exists(ref)


def test_sidecar_missing_or_modified_is_corrupt(tmp_path):
    ref = save_artifact(tmp_path, "batch", {"x": torch.ones(2)}, {"texts": ["a"]})
    side = json.loads(Path(ref.sidecar_path).read_text())
    side["meta"]["texts"] = ["b"]
    Path(ref.sidecar_path).write_text(json.dumps(side))
    with pytest.raises(ArtifactCorruptError, match="modified"):
        load_artifact(ref)
    Path(ref.sidecar_path).write_text("{not json")
    with pytest.raises(ArtifactCorruptError, match="not valid JSON"):
        load_artifact(ref)
    os.unlink(ref.sidecar_path)
    with pytest.raises(ArtifactCorruptError, match="missing"):
        load_artifact(ref)
    assert not artifact_exists(ref)
    save_artifact(tmp_path, "batch", {"x": torch.ones(2)}, {"texts": ["a"]})
    assert load_artifact(ref)[1] == {"texts": ["a"]}
    os.unlink(ref.path)
    assert not artifact_exists(ref)
    with pytest.raises(FileNotFoundError, match="Recompute"):
        load_artifact(ref)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["replace", "fsync", "open"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, where):
    real_open = os.open
    if where == "open":   # an unwritable directory: creating the temp file fails
        monkeypatch.setattr(os, "open", lambda p, *a, **k: _enospc() if str(p).endswith(".tmp")
                            else real_open(p, *a, **k))
    else:
        monkeypatch.setattr(os, where, _enospc)
    with pytest.raises(ArtifactWriteError) as info:
        save_artifact(tmp_path, "update", {"v": torch.randn(1000)}, {"a": 1})
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(tmp_path / "update") in str(err) and "No space left" in str(err)
    assert _only_files(tmp_path) == []                      # no final file, no temp file
    assert isinstance(copy.deepcopy(err), ArtifactWriteError)   # rebuildable when shipped between processes


def test_failed_sidecar_write_counts_as_absent_then_repairs(tmp_path, monkeypatch):
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: _enospc() if str(b).endswith(".json") else real_replace(a, b))
    with pytest.raises(ArtifactWriteError, match=r"\.json"):
        ref_args = (tmp_path, "update", {"v": torch.ones(3)}, {"a": 1})
        save_artifact(*ref_args)
    assert [n.endswith(".safetensors") for n in _only_files(tmp_path)] == [True]   # complete data file only
    monkeypatch.setattr(os, "replace", real_replace)
    ref = save_artifact(*ref_args)
    assert artifact_exists(ref) and len(_only_files(tmp_path)) == 2


def test_concurrent_threads_same_content(tmp_path):
    n = 8
    tensors = {"v": torch.arange(200_000, dtype=torch.float64)}
    barrier, refs, errors = threading.Barrier(n), [None] * n, []

    def work(i):
        try:
            barrier.wait()
            refs[i] = save_artifact(tmp_path, "update", tensors, {"k": "same"})
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(refs)) == 1 and artifact_exists(refs[0])
    assert len(_only_files(tmp_path)) == 2                  # no temp files left


_WRITER = """
import json, os, sys, time, torch
from entropy_core.artifacts import save_artifact
root, go = sys.argv[1], sys.argv[2]
tensors = {"v": torch.arange(300_000, dtype=torch.float64), "m": torch.ones(3, dtype=torch.bool)}
open(go + f".ready{os.getpid()}", "w").close()    # imports done; wait so both write at the same moment
while not os.path.exists(go):
    time.sleep(0.001)
print(json.dumps(save_artifact(root, "update", tensors, {"texts": ["a", "b"]}).to_dict()))
"""


def test_concurrent_processes_same_content(tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "store"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    refs = [ArtifactRef.from_dict(json.loads(out.strip().splitlines()[-1])) for out, _ in outs]
    assert refs[0] == refs[1] and artifact_exists(refs[0])
    # the bytes are the same in every process, so this process gets the same reference too
    here = save_artifact(tmp_path / "store", "update",
                         {"v": torch.arange(300_000, dtype=torch.float64), "m": torch.ones(3, dtype=torch.bool)},
                         {"texts": ["a", "b"]})
    assert here == refs[0]
    assert len(_only_files(tmp_path / "store")) == 2


def test_rejects_what_it_cannot_store(tmp_path):
    with pytest.raises(ValueError) as info:
        save_artifact(tmp_path, "batch", {"ok": torch.ones(1), "texts": ["a"], "n": 3}, {})
    assert "'texts'" in str(info.value) and "'n'" in str(info.value) and "meta" in str(info.value)
    with pytest.raises(ValueError) as info:
        save_artifact(tmp_path, "batch", {}, {"t": torch.ones(3), "x": float("nan"), 1: "a"})
    msg = str(info.value)
    assert "3 value(s)" in msg and "t: tensor" in msg and "x = nan" in msg and "key 1" in msg
    with pytest.raises(ValueError, match="kind"):
        save_artifact(tmp_path, "../escape", {}, {})
    assert _only_files(tmp_path) == []


def test_meta_only_artifact_and_config_objects(tmp_path):
    @dataclasses.dataclass
    class Section:
        lr: float = 1e-3
        path: Path = Path("/x")

    ref = save_artifact(tmp_path, "texts", {}, {"section": Section(), "n": np.int64(3), "f": np.float32(0.5)})
    assert load_artifact(ref) == ({}, {"section": {"lr": 1e-3, "path": "/x"}, "n": 3, "f": 0.5})


def test_run_manifest_conflict_shows_both_values(tmp_path):
    cfg = {"model": {"name": "tiny", "lora": {"r": 8}}, "update": {"lr": 1e-3}, "estimator": {"eta_list": [1e-4]}}
    path = write_run_manifest(tmp_path, cfg)
    assert path == tmp_path / RUN_MANIFEST_NAME and read_run_manifest(tmp_path)["config"] == cfg
    assert write_run_manifest(tmp_path, json.loads(json.dumps(cfg))) == path     # same config: fine
    changed = copy.deepcopy(cfg)
    changed["update"]["lr"] = 2e-3
    changed["model"]["lora"]["r"] = 16
    del changed["estimator"]
    changed["seed"] = 1
    with pytest.raises(RunDirectoryConflict) as info:
        write_run_manifest(tmp_path, changed)
    msg = str(info.value)
    assert "4 key(s) differ" in msg
    assert "update.lr: manifest=0.001, now=0.002" in msg
    assert "model.lora.r: manifest=8, now=16" in msg
    assert 'estimator: manifest={"eta_list": [0.0001]}, now=<absent>' in msg
    assert "seed: manifest=<absent>, now=1" in msg
    assert "another output_dir" in msg and str(path) in msg
    assert [d[0] for d in info.value.differences] == ["estimator", "model.lora.r", "seed", "update.lr"]
    assert str(copy.deepcopy(info.value)) == msg
    assert read_run_manifest(tmp_path)["config"] == cfg            # the manifest is untouched


def test_run_manifest_allow_changes_and_bad_manifest(tmp_path):
    cfg = {"update": {"lr": 1e-3}, "estimator": {"eta_list": [1e-4]}}
    write_run_manifest(tmp_path, cfg)
    new = {"update": {"lr": 1e-3}, "estimator": {"eta_list": [1e-4, 1e-3]}}
    write_run_manifest(tmp_path, new, allow_changes=["estimator.eta_list"])
    assert read_run_manifest(tmp_path)["config"] == new
    (tmp_path / RUN_MANIFEST_NAME).write_text("[]")
    with pytest.raises(RunDirectoryConflict, match="Delete it"):
        write_run_manifest(tmp_path, cfg)


def test_write_json_atomic_rejects_nonfinite(tmp_path):
    path = tmp_path / "out" / "results.json"
    with pytest.raises(ValueError) as info:
        write_json_atomic(path, {"a": {"b": float("nan")}, "c": [1.0, float("inf")], "d": np.float64(-np.inf)})
    msg = str(info.value)
    assert "3 value(s)" in msg and "a.b = nan" in msg and "c[1] = inf" in msg and "d = -inf" in msg
    assert not path.exists()
    write_json_atomic(path, {"delta_H": [np.float64(-1e-7), 2.5], "n": np.int32(4), "ok": True})
    assert json.loads(path.read_text()) == {"delta_H": [-1e-7, 2.5], "n": 4, "ok": True}
    assert _only_files(tmp_path) == ["results.json"]


def test_hash_file_and_directory(tmp_path):
    ckpt = tmp_path / "checkpoint-10"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"\x00" * 3000)
    (ckpt / ".hidden").write_text("h")
    (ckpt / "sub" / "optimizer.pt").write_bytes(b"state")
    assert hash_file(ckpt / "sub" / "optimizer.pt", chunk=2) == hashlib.sha256(b"state").hexdigest()
    h0 = hash_directory(ckpt)
    assert hash_directory(ckpt) == h0 and len(h0) == 64
    (ckpt / ".hidden").write_text("H")                            # hidden files count
    h1 = hash_directory(ckpt)
    assert h1 != h0
    (ckpt / "sub" / "optimizer.pt").rename(ckpt / "optimizer.pt")  # so do names
    assert hash_directory(ckpt) != h1
    (ckpt / "optimizer.pt").rename(ckpt / "sub" / "optimizer.pt")
    assert hash_directory(ckpt) == h1
    (ckpt / "link").symlink_to(ckpt / ".hidden")                   # file symlinks are followed
    assert hash_directory(ckpt) != h1
    (ckpt / "broken").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="broken symlink"):
        hash_directory(ckpt)
    with pytest.raises(NotADirectoryError):
        hash_directory(ckpt / ".hidden")
